"""Search spaces: a YAML file in ``search_spaces/`` read and validated into a :class:`~kd_tune.space.schema.SweepSpec`.

Everything is validated before anything starts: a bad value raises :class:`~kd_tune.errors.SpaceError` naming the
file, the key, the value and what is allowed. See ``search_spaces/smoke.yaml`` for a commented example of every key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from kd_tune.data.registry import REGISTRY
from kd_tune.errors import SpaceError, first_line
from kd_tune.space.methods import METHODS
from kd_tune.space.parse_methods import read_methods
from kd_tune.space.parse_schedules import read_schedule, split_axis
from kd_tune.space.parse_sections import read_student, read_teacher, read_variants
from kd_tune.space.reader import Reader
from kd_tune.space.schema import (
    ALGORITHMS,
    BASELINES,
    MAX_PACK,
    METRICS,
    NAME_ALLOWED,
    POPULATION_SCHEDULERS,
    SCHEDULERS,
    Axis,
    DatasetSpec,
    GridSpec,
    MethodEntry,
    Range,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    SweepSpec,
    is_valid_name,
)
from kd_tune.space.sections import StudentSpec, TeacherSpec
from kd_tune.space.trials import student_point


def parse_space(data: object, source: str) -> SweepSpec:
    """Validate a search space already parsed from YAML into a :class:`SweepSpec`."""
    r = Reader(source)
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

    teacher = read_teacher(r, "teacher", top.get("teacher"))
    student = read_student(r, "student", top.get("student"))

    search = _search(r, top, dataset)
    g = r.section(top, "grid", ("alpha", "temperature", "epochs", "seed", "label_noise", "student", "teacher", "method"))
    students = read_variants(r, "grid.student", g.get("student"), top["student"], read_student)
    teachers = read_variants(r, "grid.teacher", g.get("teacher"), top["teacher"], read_teacher)
    noise_axis: tuple[float, ...] = ()
    if "label_noise" in g:
        noise_axis = r.items("grid.label_noise", g["label_noise"], lambda k, v: r.number(k, v, 0.0, 1.0, hi_open=True))
        if dataset.label_noise:
            raise r.fail("grid.label_noise", g["label_noise"], "either dataset.label_noise or grid.label_noise, not both")
        if search.is_search:
            raise r.fail("grid.label_noise", g["label_noise"], f"no label-noise axis with search.algorithm {search.algorithm} "
                                                               "(dataset.label_noise gives every trial one level; an axis needs algorithm grid)")

    def alpha(k: str, v: object, lo_open: bool = False) -> float:
        return r.number(k, v, 0.0, 1.0, lo_open=lo_open)

    def temperature(k: str, v: object, lo_open: bool = True) -> float:
        return r.number(k, v, 0.0, math.inf, lo_open=True)

    def axis(k: str, v: object, read: Callable[..., float]) -> Axis:
        return _axis(r, k, v, search, read)

    methods = read_methods(r, g.get("method"), search, axis, alpha, temperature)
    if "alpha" not in g and not (methods and all(m.alpha is not None for m in methods)):
        raise r.fail("grid.alpha", "<missing>", "this key is required (unless every grid.method entry sets its own alpha)")
    # A schedule is a mapping among the numbers of grid.alpha / grid.temperature (kd_tune.space.parse_schedules).
    alpha_raw, alpha_entries = split_axis(r, "grid.alpha", g.get("alpha"), search.is_search)
    temperature_raw, temperature_entries = split_axis(r, "grid.temperature", g.get("temperature", [3.0]), search.is_search)
    grid = GridSpec(
        alpha=axis("grid.alpha", alpha_raw, alpha) if "alpha" in g and alpha_raw is not None else (),
        temperature=axis("grid.temperature", temperature_raw, temperature) if temperature_raw is not None else (),
        alpha_schedules=tuple(read_schedule(r, f"grid.alpha[{i}]", v, alpha) for i, v in alpha_entries),
        temperature_schedules=tuple(read_schedule(r, f"grid.temperature[{i}]", v, temperature) for i, v in temperature_entries),
        epochs=r.items("grid.epochs", g.get("epochs", [1]), lambda k, v: r.integer(k, v, 1)),
        seed=r.items("grid.seed", g.get("seed", [0]), lambda k, v: r.integer(k, v, 0)),
        label_noise=noise_axis,
        student=tuple(name for name, _ in students),
        teacher=tuple(name for name, _ in teachers),
        method=methods,
    )
    if search.is_search and not _searches_something(grid):
        raise r.fail("grid", g, f"with search.algorithm {search.algorithm}, at least one of grid.alpha, grid.temperature "
                                "(a range {low, high} or several values), grid.epochs or grid.seed (several values), or several "
                                "grid.method entries or knob values to search over")
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
    spec = SweepSpec(name, dataset, teacher, student, grid, baselines, resources, max_failures, share, search, scheduler,
                     student_variants=students, teacher_variants=teachers)
    _check_distinct(r, spec, g.get("method"))
    return spec


def _searches_something(grid: GridSpec) -> bool:
    """Whether a search has anything to choose: an axis with a range or several values, several methods or knob values."""
    def varies(axis: object) -> bool:
        return isinstance(axis, Range) or (isinstance(axis, tuple) and len(axis) > 1)

    methods = grid.methods()
    return (len(methods) > 1 or any(varies(v) for m in methods for _, v in m.knobs)
            or any(varies(a) for m in methods for a in m.axes(grid)) or any(varies(a) for a in (grid.epochs, grid.seed, grid.student, grid.teacher)))


def _check_distinct(r: Reader, spec: SweepSpec, raw_methods: object) -> None:
    """Two ``grid.method`` entries that give the same trial would train it twice (and share its runs): refused."""
    if not raw_methods:
        return
    if spec.is_search:
        entries = spec.grid.method
        for i, entry in enumerate(entries):
            if entry in entries[:i]:
                raise r.fail(f"grid.method[{i}]", raw_methods[i], f"an entry unlike grid.method[{entries.index(entry)}]")  # type: ignore[index]
        return
    seen: dict[str, int] = {}
    for i, entry in enumerate(spec.grid.method):
        for a, t, knobs in entry.points(spec.grid):
            label = student_point(a, t, 1, 0, method=entry.method, knobs=knobs).label
            if label in seen:
                raise r.fail(f"grid.method[{i}]", raw_methods[i], f"an entry whose trials are its own: grid.method[{seen[label]}] also "  # type: ignore[index]
                                                                 f"gives {label.removesuffix('-e1-s0')}")
            seen[label] = i


def _dataset(r: Reader, top: Mapping[str, Any]) -> DatasetSpec:
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


def _own_dataset(r: Reader, d: Mapping[str, Any], common: dict[str, Any]) -> DatasetSpec:
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


def _search(r: Reader, top: Mapping[str, Any], dataset: DatasetSpec) -> SearchSpec:
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


def _axis(r: Reader, key: str, value: object, search: SearchSpec, read: Callable[..., float]) -> Axis:
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


def _scheduler(r: Reader, top: Mapping[str, Any], search: SearchSpec, grid: GridSpec) -> SchedulerSpec | None:
    """The optional ``scheduler`` section: early stopping (asha) of a search's trials, or a population (pbt, pb2)."""
    if top.get("scheduler") is None:
        return None
    raw = top["scheduler"]
    name = r.choice("scheduler.name", (raw or {}).get("name") if isinstance(raw, Mapping) else raw, SCHEDULERS)
    if name in POPULATION_SCHEDULERS:
        return _population(r, top, search, grid, name)
    s = r.section(top, "scheduler", ("name", "grace_period", "reduction_factor"), required=("name",))
    if not search.is_search:
        raise r.fail("scheduler", top["scheduler"], "no scheduler with search.algorithm grid (epoch-shared grid trials serve every "
                                                    "epochs value); a scheduler needs search.algorithm random or optuna")
    longest = max(grid.epochs)
    if longest < 2:
        raise r.fail("scheduler", top["scheduler"], f"none: the largest grid.epochs is {longest}, too short to stop a trial early "
                                                    "(early stopping needs at least 2 epochs)")
    grace = r.integer("scheduler.grace_period", s.get("grace_period", 1), 1, longest - 1)
    return SchedulerSpec(name, grace, r.integer("scheduler.reduction_factor", s.get("reduction_factor", 3), 2, 100))


def _population(r: Reader, top: Mapping[str, Any], search: SearchSpec, grid: GridSpec, name: str) -> SchedulerSpec:
    """``scheduler: {name: pbt | pb2, perturbation_interval, quantile_fraction, resample_probability, mutate}``: a population
    of ``search.num_samples`` students (``kd_tune.sweep.population``)."""
    keys = ("name", "perturbation_interval", "quantile_fraction", "mutate") + (("resample_probability",) if name == "pbt" else ())
    s = r.section(top, "scheduler", keys, required=("name", "perturbation_interval"))
    if search.algorithm != "random":
        raise r.fail("search.algorithm", search.algorithm, f"random with scheduler {name} (the population's first values are drawn "
                                                           "uniformly; the scheduler then changes them)")
    if search.num_samples < 2:
        raise r.fail("search.num_samples", search.num_samples, f"at least 2 with scheduler {name} (the population's size)")
    if len(grid.epochs) != 1:
        raise r.fail("grid.epochs", list(grid.epochs), f"one value with scheduler {name} (every member trains as long)")
    epochs = grid.epochs[0]
    if epochs < 2:
        raise r.fail("grid.epochs", list(grid.epochs), f"at least 2 epochs with scheduler {name} (a member changes between epochs)")
    if len(grid.method) > 1:
        raise r.fail("grid.method", [m.method for m in grid.method], f"one method with scheduler {name} (a member's method never changes)")
    if top.get("baselines"):
        raise r.fail("baselines", top["baselines"], f"none with scheduler {name} (a population is its members alone; "
                                                    "kd-tune replay trains the best member's schedule beside scratch students of the same seeds)")
    interval = r.integer("scheduler.perturbation_interval", s["perturbation_interval"], 1, epochs - 1)
    quantile = r.number("scheduler.quantile_fraction", s.get("quantile_fraction", 0.25), 0.0, 0.5, lo_open=True)
    resample = r.number("scheduler.resample_probability", s.get("resample_probability", 0.25), 0.0, 1.0)
    entry = grid.methods()[0]
    alpha, temperature = entry.axes(grid)
    axes: dict[str, object] = {"alpha": alpha, "temperature": temperature, **{k: v for k, v in entry.knobs}}
    numeric = [k for k, v in axes.items() if k in ("alpha", "temperature") or METHODS[entry.method].knob(k).kind in ("float", "int")]
    raw_mutate = s.get("mutate", [k for k in ("alpha", "temperature") if _varies(axes[k])])
    mutate = r.items("scheduler.mutate", raw_mutate, lambda k, v: r.choice(k, v, tuple(numeric)))
    for i, k in enumerate(mutate):
        if not _varies(axes[k]):
            raise r.fail(f"scheduler.mutate[{i}]", k, f"a value with a range {{low, high}} or several values to mutate within "
                                                      f"(give grid.{k if k in ('alpha', 'temperature') else 'method[0].' + k} one)")
    if not mutate:
        raise r.fail("scheduler.mutate", raw_mutate, "at least one of alpha, temperature (a range or several values in grid)")
    return SchedulerSpec(name, perturbation_interval=interval, quantile_fraction=quantile, resample_probability=resample, mutate=mutate)


def _varies(axis: object) -> bool:
    return isinstance(axis, Range) or (isinstance(axis, tuple) and len(axis) > 1)


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
    if not data.get("ensemble_weights", True):
        del data["ensemble_weights"]  # equal weights: the key left out, as a user leaves it
    model = data.pop("model")
    args = dict(spec.model.kwargs())
    return {"arch": model["arch"], **({"args": args} if spec.model.is_factory else args), **data}


def _method_yaml(entry: MethodEntry) -> dict[str, Any]:
    """A ``grid.method`` entry as YAML reads it back."""
    def axis(v: object) -> Any:
        return asdict(v) if isinstance(v, Range) else _plain(v)

    out: dict[str, Any] = {"method": entry.method}
    for key in ("alpha", "temperature"):
        if getattr(entry, key) is not None:
            out[key] = axis(getattr(entry, key))
    return out | {name: axis(values) for name, values in entry.knobs}


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
    del data["grid"]["method"]
    if spec.grid.method:
        data["grid"]["method"] = [_method_yaml(m) for m in spec.grid.method]
    # Schedules are entries of grid.alpha / grid.temperature, as written.
    for axis in ("alpha", "temperature"):
        schedules = data["grid"].pop(f"{axis}_schedules")
        if schedules:
            data["grid"][axis] = [*(data["grid"][axis] or []), *(s.as_config() for s in getattr(spec.grid, f"{axis}_schedules"))]
    if not data["grid"]["alpha"]:
        del data["grid"]["alpha"]  # every method entry has its own
    if not spec.is_search:
        data["search"] = {"algorithm": "grid"}  # the other keys belong to a search only
    if spec.scheduler is None:
        del data["scheduler"]
    else:
        data["scheduler"] = _plain(spec.scheduler.params())  # the keys of its kind
    if spec.is_search:
        del data["resources"]["pack"]  # one student per trial, whatever the device
    else:
        data["resources"]["pack"] = spec.resources.pack_size  # as trained: a resume with other --gpus-per-trial keeps the packs
    return yaml.safe_dump(data, sort_keys=False)
