"""What a configuration is beyond its alpha and T: its distillation method and that method's knobs, as a report's
frames hold them.

A run's frame row has ``method`` (``kd`` for runs logged before methods were an axis, and for scratch runs), one column
per knob name of :data:`~kd_tune.space.methods.ALL_KNOBS` (the value where the run's method has that knob and it
applies, else None/NaN), ``knobs`` (every knob of the method that applies, defaults filled in, as one canonical string:
``"divergence=forward_kl, standardize=False"``, what groupings key on) and ``variant`` (``kd``, ``kd+ls``,
``kd+reverse_kl``, ``dkd``: :func:`~kd_tune.space.methods.variant`, what the per-method section compares). Plain pandas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kd_tune.space.methods import ALL_KNOBS, DEFAULT_METHOD, METHODS, Knob, Knobs, canonical_knobs, variant

KNOB_OF: dict[str, Knob] = {k.name: k for m in reversed(list(METHODS.values())) for k in m.knobs}
"""Each knob name's definition (a name two methods share, such as ``standardize``, is the same knob in both)."""
CONFIG_KEYS = ["method", "knobs"]
"""What a configuration adds to its alpha, T and epochs: the columns every grouping of the report keys on."""


def knobs_key(knobs: Knobs) -> str:
    """The canonical string of a run's knobs: ``name=value`` in the method's order, numbers without a trailing ``.0``."""
    return ", ".join(f"{name}={_show(v)}" for name, v in knobs)


def _show(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return format(v, ".12g")


DEFAULT_KNOBS = knobs_key(canonical_knobs(DEFAULT_METHOD))
"""The knobs of ``kd`` with its defaults: every run logged before methods were an axis, and every scratch run."""


def _missing(raw: object) -> bool:
    return raw is None or raw is pd.NA or (isinstance(raw, float) and math.isnan(raw)) or raw in ("", "None", "nan")


def parse_knob(name: str, raw: object) -> Any:
    """A knob's value from its MLflow param (a string: ``"8.0"``, ``"True"``, ``"reverse_kl"``) or an already typed value;
    None where it has none."""
    if _missing(raw):
        return None
    knob = KNOB_OF.get(name)
    kind = knob.kind if knob is not None else "choice"
    text = str(raw).strip()
    if kind == "bool":
        return text.lower() in ("true", "1", "1.0", "yes")
    if kind == "int":
        return int(float(text))
    if kind == "float":
        return float(text)
    return text


def canonical(method: str, given: Mapping[str, Any]) -> Knobs:
    """The run's knobs that apply, defaults filled in (an unknown method, from a newer kd-tune: none)."""
    if method not in METHODS:
        return ()
    own = {k: v for k, v in given.items() if k in METHODS[method].knob_names and v is not None}
    return canonical_knobs(method, own)


def method_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``method``, a column per knob of :data:`ALL_KNOBS`, ``knobs`` and ``variant`` of each row of ``frame``, which holds
    ``method`` (missing, None or "": ``kd``) and any knob columns (missing or None: the method's default), as MLflow's
    param strings or typed values."""
    methods = frame["method"] if "method" in frame else pd.Series(DEFAULT_METHOD, index=frame.index, dtype=object)
    methods = methods.map(lambda m: DEFAULT_METHOD if _missing(m) else str(m))
    rows = []
    for i, method in methods.items():
        given = {name: parse_knob(name, frame.at[i, name]) for name in ALL_KNOBS if name in frame}
        knobs = canonical(method, given)
        values = dict(knobs)
        rows.append({"method": method, **{name: values.get(name) for name in ALL_KNOBS}, "knobs": knobs_key(knobs) + _changing(frame, i),
                     "variant": variant(method, knobs) if method in METHODS else method})
    out = pd.DataFrame(rows, index=frame.index, columns=["method", *ALL_KNOBS, "knobs", "variant"])
    for name in ALL_KNOBS:
        kind = KNOB_OF[name].kind
        if kind == "float":
            out[name] = pd.to_numeric(out[name]).astype(float)
        elif kind == "int":
            out[name] = pd.to_numeric(out[name]).astype("Int64")
        else:
            out[name] = out[name].astype(object).where(out[name].notna(), None)
    return out.astype({"method": str, "knobs": str, "variant": str})


CHANGING = ("alpha_schedule", "temperature_schedule")
"""Params of a run whose alpha or T changed during training by a schedule (``kd_tune.space.schedules``: its text)."""
POPULATION = "population"
"""The knobs key's entry of a run that a population scheduler (PBT, PB2) changed: its alpha and T params are the first."""


def _changing(frame: pd.DataFrame, i: Any) -> str:
    """What the knobs key adds for a run whose alpha or T changed during training: its schedules (``, alpha_schedule=linear
    0.1 -> 0.7 over 10 epochs``), or ``, population=pbt`` for a member of a population. A configuration is thereby never
    pooled with the constant of its start value."""
    parts = [f"{name}={frame.at[i, name]}" for name in CHANGING if name in frame and not _missing(frame.at[i, name])]
    scheduler = frame.at[i, "scheduler.name"] if "scheduler.name" in frame else None
    if scheduler in ("pbt", "pb2") and ("role" not in frame or frame.at[i, "role"] == "student"):
        parts.append(f"{POPULATION}={scheduler}")
    return "".join(f", {p}" for p in parts)


def with_config_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``student`` and ``teacher`` ("" where it has none: a sweep without those axes) and ``method``,
    ``knobs`` and ``variant`` (where it has none: from its ``method`` and knob columns, else ``kd`` with its defaults, as
    a sweep from before methods were an axis)."""
    missing: dict[str, Any] = {c: "" for c in ("student", "teacher") if c not in frame}
    if "knobs" not in frame or "variant" not in frame or "method" not in frame:
        columns = method_columns(frame) if len(frame) else pd.DataFrame(columns=["method", "knobs", "variant"], dtype=str)
        missing |= {c: columns[c] for c in ("method", "knobs", "variant") if c not in frame}
    return frame.assign(**missing) if missing else frame


def learns_from_teacher(frame: pd.DataFrame) -> pd.Series:
    """The student configurations that learn from the teacher at all: kd with alpha < 1 (alpha = 1 is hard labels alone),
    and every configuration of another method (their distillation terms have weights of their own)."""
    frame = with_config_columns(frame)
    return (frame["role"] == "student") & ((frame["method"] != DEFAULT_METHOD) | (frame["alpha"] < 1.0))


def has_method_axis(frame: pd.DataFrame) -> bool:
    """Whether the students of ``frame`` hold more than one method or knob setting (the report's method views are theirs)."""
    frame = with_config_columns(frame)
    students = frame[frame["role"] == "student"]
    return bool(students[CONFIG_KEYS].drop_duplicates().shape[0] > 1)


def parse_knobs_key(key: str) -> dict[str, Any]:
    """The knob values of a :func:`knobs_key` string, typed again (``"nckd_weight=8, warmup=20"`` -> 8.0 and 20)."""
    pairs = (part.split("=", 1) for part in str(key).split(", ") if "=" in part)
    return {name: parse_knob(name, value) for name, value in pairs}


def knob_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, knobs) of ``frame``: its variant and its knob columns, read back from its ``knobs`` string (to
    put a summary's configurations' knob values beside them)."""
    frame = with_config_columns(frame)
    pairs = frame[[*CONFIG_KEYS, "variant"]].drop_duplicates(CONFIG_KEYS).reset_index(drop=True)
    values = [{name: parse_knobs_key(key).get(name) for name in ALL_KNOBS} for key in pairs["knobs"]]
    typed = method_columns(pd.DataFrame(values, columns=list(ALL_KNOBS)).assign(method=pairs["method"]))
    return pd.concat([pairs, typed[list(ALL_KNOBS)]], axis=1)


def config_label(method: str, knobs: str) -> str:
    """A short name of a method and knob setting for a figure's legend: its variant, and each numeric knob that is not its
    default (``dkd nckd_weight=2``; ``kd+ls``)."""
    if method not in METHODS:
        return method
    m, values = METHODS[method], parse_knobs_key(knobs)
    typed = canonical(method, values)
    changed = [f"{name}={_show(v)}" for name, v in typed if m.knob(name).kind in ("int", "float") and v != m.knob(name).default]
    changing = [f"{name.split('_')[0].replace('temperature', 'T')} {values[name]}" for name in CHANGING if name in values]
    changing += [f"({values[POPULATION]})"] if POPULATION in values else []
    return " ".join([variant(method, typed), *changed, *changing])


def method_order(names: Any) -> list[str]:
    """Methods or variants in the report's order: ``kd`` (the reference) first, then by name."""
    return sorted({str(n) for n in names}, key=lambda n: (n != DEFAULT_METHOD, n))
