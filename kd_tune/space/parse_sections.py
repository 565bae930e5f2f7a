"""The model sections of a search space read and validated: ``student``, ``teacher`` (trained here, or ``from`` a
file or an MLflow model) and the ``grid.student`` / ``grid.teacher`` axes, names to overrides of those sections."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kd_tune.space.architectures import ALLOWED as ARCH_ALLOWED
from kd_tune.space.architectures import FAMILIES, ArgError, is_factory
from kd_tune.space.reader import Reader, T
from kd_tune.space.sections import (
    AUGMENTATIONS,
    CACHED_TEACHER,
    PRECISIONS,
    PRETRAINED_ALLOWED,
    ModelSpec,
    StudentSpec,
    TeacherSpec,
    is_model_uri,
)

TRAINED_TEACHER_KEYS = ("epochs", "lr", "batch_size", "seed", "ensemble", "ensemble_weights", "clean", "augment", "augment_pad")
STUDENT_KEYS = ("lr", "batch_size", "precision", "augment", "augment_pad")
VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,39}$")
VARIANT_ALLOWED = "1-40 letters, digits, '_' or '.', starting with a letter or digit (it names the grid point's runs)"
FACTORY_ARG = (str, int, float, bool)


def read_model(r: Reader, key: str, raw: object, other_keys: tuple[str, ...], required: tuple[str, ...] = ()) -> tuple[dict[str, Any], ModelSpec]:
    """A section that names a model (``arch`` and its arguments) beside ``other_keys``: the section checked (known keys only,
    ``required`` present) and its :class:`ModelSpec`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise r.fail(key, raw, f"a mapping with keys arch, {', '.join(other_keys)} and the architecture's arguments")
    arch = raw.get("arch", "cnn")
    if not isinstance(arch, str) or not (arch in FAMILIES or is_factory(arch)):
        raise r.fail(f"{key}.arch", arch, ARCH_ALLOWED)
    arg_names = ("args",) if is_factory(arch) else tuple(FAMILIES[arch].args)
    section = r.section({key: raw}, key, ("arch", *arg_names, *other_keys), required=required)
    if is_factory(arch):
        args = section.get("args", {}) or {}
        if not isinstance(args, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in args):
            raise r.fail(f"{key}.args", args, "a mapping of the factory's keyword arguments (names to numbers, strings, booleans or lists of them)")
        for k, v in args.items():
            if not (isinstance(v, FACTORY_ARG) or (isinstance(v, list) and all(isinstance(x, FACTORY_ARG) for x in v))):
                raise r.fail(f"{key}.args.{k}", v, "a number, string, boolean or a list of them")
        return section, ModelSpec(arch, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in args.items())))
    values = {}
    for name, (check, default) in FAMILIES[arch].args.items():
        if name not in section:
            values[name] = default
            continue
        try:
            values[name] = check(f"{key}.{name}", section[name])
        except ArgError as e:
            raise r.fail(e.key, e.value, e.allowed) from None
    return section, ModelSpec(arch, tuple(sorted(values.items())))


def read_student(r: Reader, key: str, raw: object) -> StudentSpec:
    cnn = not isinstance(raw, Mapping) or raw.get("arch", "cnn") == "cnn"
    s, model = read_model(r, key, raw, STUDENT_KEYS, required=("widths",) if cnn else ())
    precision = s.get("precision", StudentSpec.precision)
    if precision not in PRECISIONS:
        raise r.fail(f"{key}.precision", precision, "float32 (the default) or bfloat16 (autocast)")
    return StudentSpec(model, lr=r.number(f"{key}.lr", s.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
                       batch_size=r.integer(f"{key}.batch_size", s.get("batch_size", 128), 1), precision=precision,
                       augment=r.choice(f"{key}.augment", s.get("augment", "none"), AUGMENTATIONS),
                       augment_pad=r.integer(f"{key}.augment_pad", s.get("augment_pad", r.default_pad), 1, 16))


def read_teacher(r: Reader, key: str, raw: object) -> TeacherSpec:
    if isinstance(raw, Mapping) and "from" in raw:
        return read_pretrained(r, key, raw)
    cnn = not isinstance(raw, Mapping) or raw.get("arch", "cnn") == "cnn"
    t, model = read_model(r, key, raw, (*TRAINED_TEACHER_KEYS, "from"), required=("epochs", "widths") if cnn else ("epochs",))
    clean = t.get("clean", False)
    if not isinstance(clean, bool):
        raise r.fail(f"{key}.clean", clean, "true or false")
    augment = r.choice(f"{key}.augment", t.get("augment", "none"), AUGMENTATIONS)
    ensemble = r.integer(f"{key}.ensemble", t.get("ensemble", 1), 1, 16)
    weights: tuple[float, ...] = ()
    if t.get("ensemble_weights") is not None:
        weights = r.items(f"{key}.ensemble_weights", t["ensemble_weights"], lambda k, v: r.number(k, v, 0.0, math.inf), unique=False)
        if len(weights) != ensemble or not sum(weights) > 0:
            raise r.fail(f"{key}.ensemble_weights", t["ensemble_weights"], f"{ensemble} numbers >= 0 (one per member of {key}.ensemble = "
                                                                          f"{ensemble}), not all 0")
    return TeacherSpec(
        model,
        epochs=r.integer(f"{key}.epochs", t["epochs"], 1),
        lr=r.number(f"{key}.lr", t.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
        batch_size=r.integer(f"{key}.batch_size", t.get("batch_size", 128), 1),
        seed=r.integer(f"{key}.seed", t.get("seed", 0), 0),
        ensemble=ensemble,
        ensemble_weights=weights,
        clean=clean,
        augment=augment,
        augment_pad=r.integer(f"{key}.augment_pad", t.get("augment_pad", r.default_pad), 1, 16),
    )


def read_pretrained(r: Reader, key: str, raw: Mapping[str, Any]) -> TeacherSpec:
    """``teacher: {from: PATH_OR_URI}``: nothing else (the file says the architecture; it is not trained here)."""
    for k, v in raw.items():
        if k != "from":
            raise r.fail(f"{key}.{k}", v, f"no other key with {key}.from (a pre-trained teacher is loaded, not trained here)")
    source = raw["from"]
    if not isinstance(source, str) or not source.strip():
        raise r.fail(f"{key}.from", source, PRETRAINED_ALLOWED)
    if not is_model_uri(source):
        path = Path(source).expanduser()
        if path.is_dir() and (path / CACHED_TEACHER).is_file():
            path = path / CACHED_TEACHER  # a cached teacher's folder, <storage>/_teachers/<key>/
        if not path.is_file():
            raise r.fail(f"{key}.from", source, f"{PRETRAINED_ALLOWED} (no such file)")
        source = str(path.resolve())  # the stored space resumes from anywhere
    return TeacherSpec(source=source)


def read_variants(r: Reader, key: str, raw: object, base: object, read: Callable[[Reader, str, object], T]) -> tuple[tuple[str, T], ...]:
    """An axis of models (``grid.student`` / ``grid.teacher``): names to overrides of the base section, each read in full.

    An override that names another ``arch`` (or, for a teacher, ``from``) replaces the base's model keys."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise r.fail(key, raw, f"a mapping of names to overrides of '{key.split('.')[-1]}', e.g. {{small: {{hidden: [400, 400]}}}}")
    out = []
    for name, override in raw.items():
        if not isinstance(name, str) or not VARIANT_PATTERN.match(name):
            raise r.fail(f"{key}.{name}", name, VARIANT_ALLOWED)
        if override is None:
            override = {}
        if not isinstance(override, Mapping):
            raise r.fail(f"{key}.{name}", override, f"a mapping of keys of '{key.split('.')[-1]}' to override")
        merged = dict(base) if isinstance(base, Mapping) else {}
        if "from" in override:
            merged = {}
        elif "arch" in override or "from" in merged:
            keep = TRAINED_TEACHER_KEYS + STUDENT_KEYS
            merged = {k: v for k, v in merged.items() if k in keep}
        out.append((name, read(r, f"{key}.{name}", {**merged, **override})))
    return tuple(out)
