"""How much each swept axis matters: fANOVA importances, as Optuna computes them.

The finished student runs become the trials of an in-memory Optuna study (``value``: the validation accuracy; the test
accuracy where the sweep has no validation split, which the report then says), whose parameters are the axes that vary
over the sweep and that every run has: ``method``, ``student``, ``teacher`` as categorical; ``alpha``, ``temperature``,
``epochs``, ``label_noise`` as numeric (``FloatDistribution(min, max)``); and ``seed``, categorical too, so that the
reader sees the noise floor beside the knobs: an axis whose importance is not above seed's is not told apart from
seed-to-seed noise. Then, per method with more than one configuration, the same within that method, with its own knobs
that vary (:data:`kd_tune.space.methods.METHODS`). ``optuna.importance.FanovaImportanceEvaluator(seed=0)`` (Hutter, Hoos &
Leyton-Brown, ICML 2014: the share of the variance of the value, over a random forest fitted to the trials, that each
parameter explains alone; they sum to 1), so the same runs give the same numbers. With fewer than :data:`MIN_RUNS` runs,
or no axis that varies, there is nothing to estimate and the report says so instead of printing noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kd_tune.report.configs import KNOB_OF, knob_values, method_order, with_config_columns
from kd_tune.report.tables import markdown_table
from kd_tune.space.methods import ALL_KNOBS, METHODS

MIN_RUNS = 8
"""Fewer finished student runs than this: no importance (a random forest on a handful of points fits noise)."""
AXES = ("method", "alpha", "temperature", "epochs", "student", "teacher", "label_noise")
"""The axes the whole sweep's importance is taken over (those that vary and that every run has), besides ``seed``."""
CATEGORICAL = {"method", "student", "teacher", "seed"}
ALL_SCOPE = "all methods"
IMPORTANCE_COLUMNS = ["scope", "axis", "importance", "runs", "metric"]


@dataclass(frozen=True)
class Importance:
    """The importances of one scope (the whole sweep, or one method's runs)."""

    scope: str
    runs: int
    metric: str
    importances: dict[str, float] = field(default_factory=dict)
    """Axis -> importance, highest first; empty where it could not be estimated (``reason`` says why)."""
    reason: str = ""


def _categorical(name: str) -> bool:
    knob = KNOB_OF.get(name)
    return name in CATEGORICAL or (knob is not None and knob.kind in ("choice", "bool"))


def _value(v: Any, categorical: bool) -> Any:
    """A value as an Optuna parameter holds it: a plain str, bool or int for a category, a float for a number."""
    if not categorical:
        return float(v)
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, int) or type(v).__name__.startswith("int"):
        return int(v)
    return str(v)


def varying_axes(runs: pd.DataFrame, candidates: list[str] | tuple[str, ...]) -> list[str]:
    """The candidate columns that every run has (no missing value) and that take more than one value."""
    return [c for c in candidates if c in runs and runs[c].notna().all() and runs[c].nunique() > 1]


def fanova(runs: pd.DataFrame, axes: list[str], metric: str) -> dict[str, float]:
    """Optuna's fANOVA importances (seed 0) of ``axes`` over ``runs``' ``metric``, highest first."""
    import optuna

    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for axis in axes:
        if _categorical(axis):
            choices = sorted({_value(v, True) for v in runs[axis]}, key=lambda v: (type(v).__name__, v))
            distributions[axis] = optuna.distributions.CategoricalDistribution(choices)
        else:
            distributions[axis] = optuna.distributions.FloatDistribution(float(runs[axis].min()), float(runs[axis].max()))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" per scope
    try:
        study = optuna.create_study(direction="maximize")
        # A canonical order of the trials, so that the forest sees the same data in the same order whatever the runs' order.
        ordered = runs.sort_values([*axes, metric], kind="stable")
        for _, row in ordered.iterrows():
            params = {axis: _value(row[axis], _categorical(axis)) for axis in axes}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[metric])))
        found = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return dict(sorted(((k, float(v)) for k, v in found.items()), key=lambda kv: (-kv[1], kv[0])))


def _scope(scope: str, runs: pd.DataFrame, axes: list[str], metric: str) -> Importance:
    if len(runs) < MIN_RUNS:
        return Importance(scope, len(runs), metric, reason=f"{len(runs)} finished student run{'s' if len(runs) != 1 else ''}, "
                                                           f"fewer than {MIN_RUNS}")
    if not axes:
        return Importance(scope, len(runs), metric, reason="no swept axis varies over its runs")
    seed = ["seed"] if "seed" in runs and runs["seed"].notna().all() and runs["seed"].nunique() > 1 else []
    return Importance(scope, len(runs), metric, fanova(runs, [*axes, *seed], metric))


def importance(runs: pd.DataFrame, select_on: str = "validation") -> list[Importance]:
    """The whole sweep's importances, then each method's with more than one configuration (its own knobs included)."""
    runs = with_config_columns(runs)
    missing = [k for k in ALL_KNOBS if k not in runs]
    if missing and len(runs):  # a frame with only the knobs' string: their values read back from it
        runs = runs.merge(knob_values(runs)[["method", "knobs", *missing]], on=["method", "knobs"], how="left")
    metric = "val_acc" if select_on == "validation" else "test_acc"
    if metric == "val_acc" and ("val_acc" not in runs or runs.loc[runs["role"] == "student", "val_acc"].isna().all()):
        metric = "test_acc"
    students = runs[(runs["role"] == "student") & (runs["status"] == "FINISHED")]
    students = students[students[metric].notna()] if metric in students else students.iloc[0:0]
    results = [_scope(ALL_SCOPE, students, varying_axes(students, AXES), metric)]
    for method in method_order(students["method"]):
        mine = students[students["method"] == method]
        if method not in METHODS or mine[["knobs", *[a for a in AXES if a in mine]]].drop_duplicates().shape[0] < 2:
            continue
        knobs = varying_axes(mine, METHODS[method].knob_names)
        if len(mine) == len(students) and not knobs:  # the sweep's one method, without knobs of its own: the scope above again
            continue
        axes = varying_axes(mine, [a for a in AXES if a != "method"]) + knobs
        results.append(_scope(method, mine, axes, metric))
    return results


def importance_table(results: list[Importance]) -> pd.DataFrame:
    """One row per scope and axis (what ``importance.csv`` holds); a scope that could not be estimated has none."""
    rows = [{"scope": r.scope, "axis": axis, "importance": value, "runs": r.runs, "metric": r.metric}
            for r in results for axis, value in r.importances.items()]
    return pd.DataFrame(rows, columns=IMPORTANCE_COLUMNS)


def importance_markdown(results: list[Importance]) -> str:
    """The importances in Markdown: one table over every scope that could be estimated, a line for each that could not."""
    if not results:
        return ""
    metric = results[0].metric
    what = ("validation accuracy" if metric == "val_acc" else
            "TEST accuracy (the sweep has no validation split, so the importances are of the test set's numbers)")
    lines = [f"Importance of each swept axis (fANOVA as Optuna computes it, seed 0: the share of the variance of the {what} of the "
             "finished student runs that each axis explains alone, summing to 1 per scope; seed is the noise floor: an axis not "
             "above it is not told apart from seed-to-seed noise):", ""]
    table = importance_table(results)
    if len(table):
        shown = pd.DataFrame({"scope": [f"{s} ({n} runs)" for s, n in zip(table["scope"], table["runs"], strict=True)],
                              "axis": table["axis"], "importance": table["importance"].map(lambda v: "n/a" if math.isnan(v) else f"{v:.3f}")})
        lines += [markdown_table(shown)]
    for r in results:
        if not r.importances:
            lines += ["", f"Importance ({r.scope}): cannot be estimated: {r.reason}."]
    return "\n".join(lines)
