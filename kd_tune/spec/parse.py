"""Search spaces: a YAML file in ``search_spaces/`` read and validated into a :class:`~kd_tune.spec.schema.SweepSpec`.

Everything is validated before anything starts: a bad value raises :class:`~kd_tune.errors.SpaceError` naming the
file, the key, the value and what is allowed. See ``search_spaces/smoke.yaml`` for a commented example of every key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kd_tune.data.registry import REGISTRY
from kd_tune.errors import SpaceError, first_line
from kd_tune.spec.architectures import ALLOWED as ARCH_ALLOWED
from kd_tune.spec.architectures import FAMILIES, ArgError, is_factory
from kd_tune.spec.schema import (
    ALGORITHMS,
    AUGMENTATIONS,
    BASELINES,
    MAX_PACK,
    METRICS,
    NAME_ALLOWED,
    PRECISIONS,
    PRETRAINED_ALLOWED,
    SCHEDULERS,
    Axis,
    DatasetSpec,
    GridSpec,
    ModelSpec,
    Range,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    StudentSpec,
    SweepSpec,
    TeacherSpec,
    is_model_uri,
    is_valid_name,
)

T = TypeVar("T")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.default_pad = 2
        """An ``augment_pad`` left out: 4 for the dataset's images of 32 pixels or more (CIFAR's crops), else 2 (digits' shifts)."""

    def fail(self, key: str, value: object, allowed: str) -> SpaceError:
        return SpaceError(self.source, key, value, allowed)

    def section(self, data: Mapping[str, Any], key: str, allowed_keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
        value = data.get(key, {}) if key else data
        if value is None and key:
            value = {}
        if not isinstance(value, Mapping):
            raise self.fail(key, value, f"a mapping with keys {', '.join(allowed_keys)}")
        for k in value:
            if k not in allowed_keys:
                raise self.fail(_join(key, str(k)), value[k], f"known keys of '{key or 'top level'}': {', '.join(allowed_keys)}")
        for k in required:
            if k not in value:
                raise self.fail(_join(key, k), "<missing>", "this key is required")
        return dict(value)

    def number(self, key: str, value: object, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
        allowed = f"a number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, value, allowed)
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise self.fail(key, value, allowed)
        return float(value)

    def integer(self, key: str, value: object, lo: int, hi: int | None = None) -> int:
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise self.fail(key, value, allowed)
        return value

    def choice(self, key: str, value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, value, f"one of {', '.join(choices)}")
        return value

    def items(self, key: str, value: object, read: Callable[[str, object], T], *, unique: bool = True) -> tuple[T, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, value, "a non-empty list")
        out = tuple(read(f"{key}[{i}]", v) for i, v in enumerate(value))
        if unique and len(set(out)) != len(out):
            raise self.fail(key, value, "a list without repeated values")
        return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:g}"


def parse_space(data: object, source: str) -> SweepSpec:
    """Validate a search space already parsed from YAML into a :class:`SweepSpec`."""
    r = _Reader(source)
    if not isinstance(data, Mapping):
        raise r.fail("", data, "a YAML mapping with keys name, dataset, teacher, student, grid, ...")
    top = r.section(
        data, "", ("name", "dataset", "teacher", "student", "grid", "baselines", "resources", "max_failures", "share_epochs", "search",
                   "scheduler"),
        required=("name", "dataset", "teacher", "student", "grid"),
    )
    name = top["name"]
    if not is_valid_name(name):
        raise r.fail("name", name, NAME_ALLOWED)

    dataset = _dataset(r, top)

    teacher = _teacher(r, "teacher", top.get("teacher"))
    student = _student(r, "student", top.get("student"))

    search = _search(r, top, dataset)
    g = r.section(top, "grid", ("alpha", "temperature", "epochs", "seed", "label_noise", "student", "teacher"), required=("alpha",))
    students = _variants(r, "grid.student", g.get("student"), top["student"], _student)
    teachers = _variants(r, "grid.teacher", g.get("teacher"), top["teacher"], _teacher)
    noise_axis: tuple[float, ...] = ()
    if "label_noise" in g:
        noise_axis = r.items("grid.label_noise", g["label_noise"], lambda k, v: r.number(k, v, 0.0, 1.0, hi_open=True))
        if dataset.label_noise:
            raise r.fail("grid.label_noise", g["label_noise"], "either dataset.label_noise or grid.label_noise, not both")
        if search.is_search:
            raise r.fail("grid.label_noise", g["label_noise"], f"no label-noise axis with search.algorithm {search.algorithm} "
                                                               "(dataset.label_noise gives every trial one level; an axis needs algorithm grid)")
    grid = GridSpec(
        alpha=_axis(r, "grid.alpha", g["alpha"], search, lambda k, v, lo_open=False: r.number(k, v, 0.0, 1.0, lo_open=lo_open)),
        temperature=_axis(r, "grid.temperature", g.get("temperature", [3.0]), search,
                          lambda k, v, lo_open=True: r.number(k, v, 0.0, math.inf, lo_open=True)),
        epochs=r.items("grid.epochs", g.get("epochs", [1]), lambda k, v: r.integer(k, v, 1)),
        seed=r.items("grid.seed", g.get("seed", [0]), lambda k, v: r.integer(k, v, 0)),
        label_noise=noise_axis,
        student=tuple(name for name, _ in students),
        teacher=tuple(name for name, _ in teachers),
    )
    if search.is_search and not any(isinstance(v, Range) or len(v) > 1 for v in (grid.alpha, grid.temperature, grid.epochs, grid.seed,
                                                                               grid.student, grid.teacher)):
        raise r.fail("grid", g, f"with search.algorithm {search.algorithm}, at least one of grid.alpha, grid.temperature "
                                "(a range {low, high} or several values), grid.epochs or grid.seed (several values) to search over")
    scheduler = _scheduler(r, top, search, grid)

    baselines_raw = top.get("baselines", [])
    baselines: tuple[str, ...] = ()
    if baselines_raw:
        baselines = r.items("baselines", baselines_raw, lambda k, v: r.choice(k, v, BASELINES))

    res = r.section(top, "resources", ("cpu", "gpu", "pack"))
    resources = ResourcesSpec(
        cpu=r.number("resources.cpu", res.get("cpu", 1.0), 0.0, 1024.0, lo_open=True),
        gpu=r.number("resources.gpu", res.get("gpu", 0.0), 0.0, 64.0),
        pack=None if res.get("pack") is None else r.integer("resources.pack", res["pack"], 1, MAX_PACK),
    )
    if resources.pack is not None and resources.pack > 1 and search.is_search:
        raise r.fail("resources.pack", resources.pack, f"1 with search.algorithm {search.algorithm} (packs serve a grid; "
                                                       "a search trains one student per trial)")
    max_failures = r.integer("max_failures", top.get("max_failures", 1), 0, 100)
    share = top.get("share_epochs", True)
    if not isinstance(share, bool):
        raise r.fail("share_epochs", share, "true or false")
    return SweepSpec(name, dataset, teacher, student, grid, baselines, resources, max_failures, share, search, scheduler,
                     student_variants=students, teacher_variants=teachers)


def _dataset(r: _Reader, top: Mapping[str, Any]) -> DatasetSpec:
    """The ``dataset`` section: a registry's dataset by name, or your own (``path``: an ImageFolder folder or a .npz file)."""
    d = r.section(top, "dataset", ("name", "train_size", "label_noise", "seed", "normalize", "val_size", "path", "test_split", "max_gb"),
                  required=("name",))
    normalize = d.get("normalize", DatasetSpec.normalize)
    if not isinstance(normalize, bool):
        raise r.fail("dataset.normalize", normalize, "true (mean/std standardization) or false (pixel / 255 only)")
    common: dict[str, Any] = {"label_noise": r.number("dataset.label_noise", d.get("label_noise", 0.0), 0.0, 1.0, hi_open=True),
              "seed": r.integer("dataset.seed", d.get("seed", 0), 0), "normalize": normalize}
    if d.get("path") is not None:
        return _own_dataset(r, d, common)
    for k in ("test_split", "max_gb"):
        if d.get(k) is not None:
            raise r.fail(f"dataset.{k}", d[k], "this key only with dataset.path (your own data; the registry's have their test sets)")
    ds_name = r.choice("dataset.name", d["name"], tuple(REGISTRY))
    info = REGISTRY[ds_name]
    train_size = d.get("train_size")
    if train_size is not None:
        train_size = r.integer("dataset.train_size", train_size, info.num_classes, info.train_count)
    # The validation images come out of the training set first; what is left must still hold
    # train_size images (or, without a subset, one image per class).
    max_val = info.train_count - (train_size or info.num_classes)
    val_size = d.get("val_size", min(DatasetSpec.val_size, max_val))
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size <= max_val:
        left = f"train_size = {train_size}" if train_size else "one image per class"
        raise r.fail("dataset.val_size", val_size, f"an integer in [0, {max_val}] (of the {info.train_count} training images, "
                                                   f"what is left must hold {left})")
    r.default_pad = 4 if min(info.shape[1:]) >= 32 else 2
    return DatasetSpec(name=ds_name, train_size=train_size, val_size=val_size, **common)


def _own_dataset(r: _Reader, d: Mapping[str, Any], common: dict[str, Any]) -> DatasetSpec:
    """Your own data: its counts are the files' (checked when the sweep starts, before anything else), so here only the
    keys' types, and that the path exists."""
    name = d["name"]
    if not is_valid_name(name) or name in REGISTRY:
        raise r.fail("dataset.name", name, f"a name of your own with dataset.path ({NAME_ALLOWED}), not a registry dataset's")
    raw = d["path"]
    if not isinstance(raw, str) or not raw.strip() or not Path(raw).expanduser().exists():
        raise r.fail("dataset.path", raw, "an existing folder in ImageFolder's layout (train/ and test/ class folders) or a .npz file")
    if "val_size" not in d:
        raise r.fail("dataset.val_size", "<missing>", "this key is required with dataset.path: training images held out for validation "
                                                      "(e.g. a tenth of them; 0 for none, then selection is on test)")
    train_size = d.get("train_size")
    return DatasetSpec(name=name, train_size=None if train_size is None else r.integer("dataset.train_size", train_size, 1),
                       val_size=r.integer("dataset.val_size", d["val_size"], 0), path=str(Path(raw).expanduser().resolve()),
                       test_split=r.number("dataset.test_split", d.get("test_split", 0.0), 0.0, 1.0, hi_open=True),
                       max_gb=None if d.get("max_gb") is None else r.number("dataset.max_gb", d["max_gb"], 0.0, 1e6, lo_open=True), **common)


def _search(r: _Reader, top: Mapping[str, Any], dataset: DatasetSpec) -> SearchSpec:
    """The ``search`` section: the grid by default; random / optuna sample ``num_samples`` students."""
    s = r.section(top, "search", ("algorithm", "num_samples", "metric", "max_concurrent", "seed"))
    algorithm = r.choice("search.algorithm", s.get("algorithm", "grid"), ALGORITHMS)
    if algorithm == "grid":
        for k in ("num_samples", "metric", "max_concurrent", "seed"):
            if k in s:
                raise r.fail(f"search.{k}", s[k], "this key only with search.algorithm random or optuna (a grid trains every point)")
        return SearchSpec()
    if "num_samples" not in s:
        raise r.fail("search.num_samples", "<missing>", f"this key is required with search.algorithm {algorithm}: an integer in [1, 10000]")
    default_metric = "val_acc" if dataset.val_size > 0 else "test_acc"
    metric = r.choice("search.metric", s.get("metric", default_metric), METRICS)
    if metric == "val_acc" and dataset.val_size == 0:
        raise r.fail("search.metric", metric, "test_acc (dataset.val_size is 0: there is no validation split)")
    if metric == "test_acc" and dataset.val_size > 0:
        raise r.fail("search.metric", metric, "val_acc (a validation split exists: searching on test would select on the test set)")
    return SearchSpec(
        algorithm=algorithm,
        num_samples=r.integer("search.num_samples", s["num_samples"], 1, 10000),
        metric=metric,
        max_concurrent=r.integer("search.max_concurrent", s.get("max_concurrent", 4), 1, 1024),
        seed=r.integer("search.seed", s.get("seed", 0), 0, 2**32 - 1),
    )


def _axis(r: _Reader, key: str, value: object, search: SearchSpec, read: Callable[..., float]) -> Axis:
    """Listed values, or (for a search) a range ``{low, high, log}`` inside the key's allowed interval."""
    if not isinstance(value, Mapping):
        return r.items(key, value, read)
    if not search.is_search:
        raise r.fail(key, dict(value), "a list of numbers with search.algorithm grid (a range {low, high} needs search.algorithm random or optuna)")
    v = r.section({key: value}, key, ("low", "high", "log"), required=("low", "high"))
    log = v.get("log", False)
    if not isinstance(log, bool):
        raise r.fail(f"{key}.log", log, "true (sample log-uniformly) or false (uniformly)")
    low, high = read(f"{key}.low", v["low"], lo_open=log), read(f"{key}.high", v["high"])
    if not low < high:
        raise r.fail(f"{key}.high", v["high"], f"a number above {key}.low ({low:g})")
    return Range(low, high, log)


def _scheduler(r: _Reader, top: Mapping[str, Any], search: SearchSpec, grid: GridSpec) -> SchedulerSpec | None:
    """The optional ``scheduler`` section (early stopping), for searches only."""
    if top.get("scheduler") is None:
        return None
    s = r.section(top, "scheduler", ("name", "grace_period", "reduction_factor"), required=("name",))
    if not search.is_search:
        raise r.fail("scheduler", top["scheduler"], "no scheduler with search.algorithm grid (epoch-shared grid trials serve every "
                                                    "epochs value); a scheduler needs search.algorithm random or optuna")
    name = r.choice("scheduler.name", s["name"], SCHEDULERS)
    longest = max(grid.epochs)
    if longest < 2:
        raise r.fail("scheduler", top["scheduler"], f"none: the largest grid.epochs is {longest}, too short to stop a trial early "
                                                    "(early stopping needs at least 2 epochs)")
    grace = r.integer("scheduler.grace_period", s.get("grace_period", 1), 1, longest - 1)
    return SchedulerSpec(name, grace, r.integer("scheduler.reduction_factor", s.get("reduction_factor", 3), 2, 100))


TRAINED_TEACHER_KEYS = ("epochs", "lr", "batch_size", "seed", "ensemble", "clean", "augment", "augment_pad")
STUDENT_KEYS = ("lr", "batch_size", "precision", "augment", "augment_pad")
VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,39}$")
VARIANT_ALLOWED = "1-40 letters, digits, '_' or '.', starting with a letter or digit (it names the grid point's runs)"
FACTORY_ARG = (str, int, float, bool)


def _model(r: _Reader, key: str, raw: object, other_keys: tuple[str, ...], required: tuple[str, ...] = ()) -> tuple[dict[str, Any], ModelSpec]:
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


def _student(r: _Reader, key: str, raw: object) -> StudentSpec:
    cnn = not isinstance(raw, Mapping) or raw.get("arch", "cnn") == "cnn"
    s, model = _model(r, key, raw, STUDENT_KEYS, required=("widths",) if cnn else ())
    precision = s.get("precision", StudentSpec.precision)
    if precision not in PRECISIONS:
        raise r.fail(f"{key}.precision", precision, "float32 (the default) or bfloat16 (autocast)")
    return StudentSpec(model, lr=r.number(f"{key}.lr", s.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
                       batch_size=r.integer(f"{key}.batch_size", s.get("batch_size", 128), 1), precision=precision,
                       augment=r.choice(f"{key}.augment", s.get("augment", "none"), AUGMENTATIONS),
                       augment_pad=r.integer(f"{key}.augment_pad", s.get("augment_pad", r.default_pad), 1, 16))


def _teacher(r: _Reader, key: str, raw: object) -> TeacherSpec:
    if isinstance(raw, Mapping) and "from" in raw:
        return _pretrained(r, key, raw)
    cnn = not isinstance(raw, Mapping) or raw.get("arch", "cnn") == "cnn"
    t, model = _model(r, key, raw, (*TRAINED_TEACHER_KEYS, "from"), required=("epochs", "widths") if cnn else ("epochs",))
    clean = t.get("clean", False)
    if not isinstance(clean, bool):
        raise r.fail(f"{key}.clean", clean, "true or false")
    augment = r.choice(f"{key}.augment", t.get("augment", "none"), AUGMENTATIONS)
    return TeacherSpec(
        model,
        epochs=r.integer(f"{key}.epochs", t["epochs"], 1),
        lr=r.number(f"{key}.lr", t.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
        batch_size=r.integer(f"{key}.batch_size", t.get("batch_size", 128), 1),
        seed=r.integer(f"{key}.seed", t.get("seed", 0), 0),
        ensemble=r.integer(f"{key}.ensemble", t.get("ensemble", 1), 1, 16),
        clean=clean,
        augment=augment,
        augment_pad=r.integer(f"{key}.augment_pad", t.get("augment_pad", r.default_pad), 1, 16),
    )


def _pretrained(r: _Reader, key: str, raw: Mapping[str, Any]) -> TeacherSpec:
    """``teacher: {from: PATH_OR_URI}``: nothing else (the file says the architecture; it is not trained here)."""
    for k, v in raw.items():
        if k != "from":
            raise r.fail(f"{key}.{k}", v, f"no other key with {key}.from (a pre-trained teacher is loaded, not trained here)")
    source = raw["from"]
    if not isinstance(source, str) or not source.strip():
        raise r.fail(f"{key}.from", source, PRETRAINED_ALLOWED)
    if not is_model_uri(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise r.fail(f"{key}.from", source, f"{PRETRAINED_ALLOWED} (no such file)")
        source = str(path.resolve())  # the stored space resumes from anywhere
    return TeacherSpec(source=source)


def _variants(r: _Reader, key: str, raw: object, base: object, read: Callable[[_Reader, str, object], T]) -> tuple[tuple[str, T], ...]:
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


def load_space(path: str | Path) -> SweepSpec:
    """Read and validate a search-space YAML file (``yaml.safe_load``: no arbitrary objects)."""
    p = Path(path)
    source = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(source, "", "<no such file>", "the path of a search-space YAML file, e.g. search_spaces/smoke.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(source, "", f"<unreadable: {e}>", "a readable UTF-8 YAML file") from None
    return load_space_text(text, source)


def load_space_text(text: str, source: str) -> SweepSpec:
    """Validate a search space given as YAML text; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or first_line(e)
        raise SpaceError(source, "", f"<YAML syntax error at {where}: {problem}>", "valid YAML") from None
    return parse_space(data, source)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _section_yaml(spec: StudentSpec | TeacherSpec) -> dict[str, Any]:
    """A student or teacher section as YAML reads it back: the model's arguments beside ``arch`` (a factory's under ``args``)."""
    if isinstance(spec, TeacherSpec) and spec.source is not None:
        return {"from": spec.source}
    data = _plain(asdict(spec))
    data.pop("source", None)
    model = data.pop("model")
    args = dict(spec.model.kwargs())
    return {"arch": model["arch"], **({"args": args} if spec.model.is_factory else args), **data}


def space_to_yaml(spec: SweepSpec) -> str:
    """The spec as YAML, as stored beside a sweep so that ``resume`` needs no original file."""
    data = _plain(asdict(spec))
    data["teacher"], data["student"] = _section_yaml(spec.teacher), _section_yaml(spec.student)
    if spec.dataset.path is None:
        for k in ("path", "test_split", "max_gb"):  # your own data's keys
            del data["dataset"][k]
    del data["student_variants"], data["teacher_variants"]
    for axis, variants in (("student", spec.student_variants), ("teacher", spec.teacher_variants)):
        del data["grid"][axis]
        if variants:
            data["grid"][axis] = {name: _section_yaml(v) for name, v in variants}
    if not data["grid"]["label_noise"]:
        del data["grid"]["label_noise"]  # no noise axis: dataset.label_noise holds the one value
    if not spec.is_search:
        data["search"] = {"algorithm": "grid"}  # the other keys belong to a search only
    if data["scheduler"] is None:
        del data["scheduler"]
    if spec.is_search:
        del data["resources"]["pack"]  # one student per trial, whatever the device
    else:
        data["resources"]["pack"] = spec.resources.pack_size  # as trained: a resume with other --gpus-per-trial keeps the packs
    return yaml.safe_dump(data, sort_keys=False)
