"""Search spaces: a YAML file in ``search_spaces/`` loaded into typed, frozen config objects.

Everything is validated before anything starts: a bad value raises :class:`SpaceError`
naming the file, the key, the value and what is allowed. See ``search_spaces/smoke.yaml``
for a commented example of every key.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kd_tune.datasets import REGISTRY
from kd_tune.errors import SpaceError, first_line

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_ALLOWED = "1-100 letters, digits, '_', '.', '-', starting with a letter or digit (no path separators)"
BASELINES = ("scratch",)
ALGORITHMS = ("grid", "random", "optuna")
"""How the students' alpha and T are chosen: every point of a grid, or sampled (uniformly / by Optuna's TPE)."""
SCHEDULERS = ("asha",)
METRICS = ("val_acc", "test_acc")
MAX_PACK = 1024
GPU_PACK = 64
"""``resources.pack`` when unset and trials get a GPU. On an H100 one 16/32 student is launch-bound (2.5-2.9
epochs/s of 16,384 images); a pack of 64 trains 25-39x as many student epochs per second, 256 28-52x
(benchmarks/RESULTS.md): 64 takes most of that while a grid still spreads over several GPUs."""


def is_valid_name(name: object) -> bool:
    """A sweep name: also a folder name, so never a path out of the storage folder."""
    return isinstance(name, str) and bool(NAME_PATTERN.match(name)) and ".." not in name
ROLES = ("student", "scratch")

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetSpec:
    """Which data the teacher and the students learn from."""

    name: str = "mnist"
    """Dataset name, one of the registry's (``kd_tune.datasets.REGISTRY``)."""
    train_size: int | None = None
    """Size of a fixed, seeded, class-stratified subset of the training set; null = all of it."""
    label_noise: float = 0.0
    """Fraction in [0, 1) of training labels flipped to another class (fixed seed); test labels never."""
    seed: int = 0
    """Seed of the validation split, the subset and the label noise (the same for every trial of a sweep)."""
    normalize: bool = False
    """Preprocessing: false = pixel / 255 only (the study's and the Keras example's); true = per-channel
    mean/std standardization. Small as it looks, it can flip whether distillation helps."""
    val_size: int = 5000
    """Training images held out as a validation split (stratified, seeded; the same for teacher and
    students, none of which trains on them); 0 = none. Reports select on it and report on test."""


@dataclass(frozen=True)
class TeacherSpec:
    """The big network trained once (and cached) whose logits the students learn from."""

    widths: tuple[int, ...] = (256, 512)
    """Filters of the two convolutions."""
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    ensemble: int = 1
    """Number of teachers (seeds seed, seed + 1, ...) whose logits are averaged; each is cached on its own."""
    clean: bool = False
    """Train the teacher on the clean labels even when the students see noisy ones (label noise)."""

    def members(self) -> list[TeacherSpec]:
        """One single-teacher spec per member of the ensemble."""
        # `clean` only chooses which labels a member learns from (the sweep passes those in), so it
        # is no part of a member's identity: the clean teacher is the noise-free one, cached once.
        return [replace(self, seed=self.seed + i, ensemble=1, clean=False) for i in range(self.ensemble)]


@dataclass(frozen=True)
class StudentSpec:
    """The small network every trial trains."""

    widths: tuple[int, ...] = (16, 32)
    lr: float = 1e-3
    batch_size: int = 128
    precision: str = "float32"
    """The training step's arithmetic: ``float32`` (the default; reproducible) or ``bfloat16`` (autocast: the forward's
    convolutions and matmuls, and so their gradients, in bfloat16; weights, Adam and every evaluation float32). Faster
    only where the hardware has bfloat16 units; results differ from float32 ones, so it is a param of every run."""


PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class Range:
    """A continuous interval a search samples from (``{low, high, log}`` in YAML)."""

    low: float
    high: float
    log: bool = False
    """Sample log-uniformly (equal odds for each factor of the range), else uniformly."""

    def show(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


Axis = tuple[float, ...] | Range
"""A grid axis: listed values (a categorical choice in a search) or, for a search only, a range."""


@dataclass(frozen=True)
class GridSpec:
    """The axes of the sweep; every combination is one trial (a search samples from them instead)."""

    alpha: Axis
    """Weight of the hard-label loss, each in [0, 1] (1 = no distillation); a range for a search."""
    temperature: Axis = (3.0,)
    """Softmax temperature(s) of the distillation loss, each > 0; a range for a search."""
    epochs: tuple[int, ...] = (1,)
    """Training lengths in epochs, each >= 1."""
    seed: tuple[int, ...] = (0,)
    """Repeats: the seed sets the student's initial weights and its data order."""
    label_noise: tuple[float, ...] = ()
    """Fractions of flipped training labels as an axis (empty: dataset.label_noise for every trial)."""


@dataclass(frozen=True)
class SearchSpec:
    """How the students' configurations are chosen: the grid, or a seeded search run by Ray Tune."""

    algorithm: str = "grid"
    """grid (every point), random (uniform sampling) or optuna (TPE): see ``kd_tune.search``."""
    num_samples: int = 0
    """Student trials a search runs (the scratch baselines come on top); 0 for a grid."""
    metric: str = "val_acc"
    """What the searcher and the scheduler maximize: val_acc, or test_acc where there is no validation split."""
    max_concurrent: int = 4
    """Search trials suggested but not finished at any time (later suggestions learn from earlier results)."""
    seed: int = 0
    """The searcher's own seed: the same file gives the same suggestions (in the same completion order)."""

    @property
    def is_search(self) -> bool:
        return self.algorithm != "grid"


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping of search trials (ASHA on the search metric, one rung check per epoch)."""

    name: str = "asha"
    grace_period: int = 1
    """Epochs every trial trains before it can be stopped."""
    reduction_factor: int = 3
    """Keep about the best 1 / reduction_factor of the trials at each rung."""


@dataclass(frozen=True)
class ResourcesSpec:
    """What one trial asks of Ray; fractions of a GPU pack several trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0
    pack: int | None = None
    """Grid points trained together as one packed model per trial (``kd_tune.packed``); 1 = one student per
    trial. Unset: ``GPU_PACK`` (64) when trials get a GPU, else 1 (:attr:`pack_size`). Packing pays where one
    student cannot keep the device busy (a GPU); on a CPU it does not (benchmarks/RESULTS.md). A search keeps
    one student per trial."""

    @property
    def pack_size(self) -> int:
        """``pack``, or where unset the default of the device the trials get: ``GPU_PACK`` with a GPU, else 1."""
        if self.pack is not None:
            return self.pack
        return GPU_PACK if self.gpu > 0 else 1


@dataclass(frozen=True)
class TrialPoint:
    """One trial: a point of the grid or a baseline, trained to ``epochs``.

    With epoch sharing, one trial serves every grid point that differs only in its number of
    epochs: ``milestones`` lists them (the largest is ``epochs``), and each gets its own MLflow run.
    """

    role: str
    alpha: float
    temperature: float | None
    epochs: int
    seed: int
    milestones: tuple[int, ...] = ()
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.milestones:
            object.__setattr__(self, "milestones", (self.epochs,))

    def as_config(self) -> dict[str, Any]:
        return {**asdict(self), "milestones": list(self.milestones)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrialPoint:
        """From :meth:`as_config`'s dict, or from a Tune trial config holding it under ``point``."""
        config = config.get("point", config)
        fields = {k: config[k] for k in ("role", "alpha", "temperature", "epochs", "seed")}
        return cls(**fields, milestones=tuple(config.get("milestones") or ()), label_noise=float(config.get("label_noise", 0.0)))

    def at(self, epochs: int) -> TrialPoint:
        """The grid point this trial serves at one of its milestones."""
        return TrialPoint(self.role, self.alpha, self.temperature, epochs, self.seed, label_noise=self.label_noise)

    def stopped_at(self, last_result: Mapping[str, Any]) -> int | None:
        """The epoch at which a scheduler stopped this trial early, or None: its last result ended it
        (``done``, which Tune sets on a scheduler's STOP) before its epochs, and it did not diverge."""
        epoch = int(last_result.get("epoch", 0) or 0)
        if last_result.get("done") and not last_result.get("diverged") and 0 < epoch < self.epochs:
            return epoch
        return None

    def grid_config(self) -> dict[str, Any]:
        """The grid point's own values (what a user sees as the run's params)."""
        return {k: v for k, v in asdict(self).items() if k != "milestones"}

    @property
    def label(self) -> str:
        """A short name, used for Ray trials and MLflow runs alike (``e1+2`` for shared epochs)."""
        e = "+".join(str(m) for m in self.milestones)
        noise = f"-n{self.label_noise:g}" if self.label_noise else ""
        if self.role == "scratch":
            return f"scratch-e{e}-s{self.seed}{noise}"
        return f"a{self.alpha:g}-T{self.temperature:g}-e{e}-s{self.seed}{noise}"


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep, as read from a search-space file."""

    name: str
    dataset: DatasetSpec
    teacher: TeacherSpec
    student: StudentSpec
    grid: GridSpec
    baselines: tuple[str, ...] = ()
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_failures: int = 1
    """How often a crashed trial is retried from its last checkpoint before it counts as errored."""
    share_epochs: bool = True
    """Serve grid points that differ only in epochs with one trial trained to the largest value.

    Exact with the constant-lr Adam used here: epoch e's data order depends on (seed, e) alone, so
    the state after e epochs is the same whatever the total. A learning-rate schedule that depends
    on the total number of epochs would have to turn this off. In a search it serves the baselines."""
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec | None = None
    """Early stopping of search trials; None = every trial trains its epochs."""

    @property
    def is_search(self) -> bool:
        return self.search.is_search

    def noise_levels(self) -> tuple[float, ...]:
        """The label-noise values the trials see (an axis of the grid, or the dataset's one value)."""
        return self.grid.label_noise or (self.dataset.label_noise,)

    def grid_points(self) -> list[TrialPoint]:
        """Every point of the grid, then one baseline per (epochs, seed, noise): a row each in the results.

        A search has no grid of students (Ray Tune samples them): its points are the baselines alone."""
        g = self.grid
        points = [] if self.is_search else [
            TrialPoint("student", a, t, e, s, label_noise=n)
            for n, a, t, s, e in itertools.product(self.noise_levels(), _listed(g.alpha), _listed(g.temperature), g.seed, sorted(g.epochs))
        ]
        if "scratch" in self.baselines:
            # Training on hard labels alone ignores the teacher and the temperature.
            points += [TrialPoint("scratch", 1.0, None, e, s, label_noise=n)
                       for n, s, e in itertools.product(self.noise_levels(), g.seed, sorted(g.epochs))]
        return points

    def trials(self) -> list[TrialPoint]:
        """The trials that serve the grid points: one per point, or one per epochs group when shared."""
        points = self.grid_points()
        if not self.share_epochs:
            return points
        groups: dict[tuple[Any, ...], list[int]] = {}
        for p in points:
            groups.setdefault((p.role, p.alpha, p.temperature, p.seed, p.label_noise), []).append(p.epochs)
        return [TrialPoint(r, a, t, max(es), s, tuple(sorted(es)), n) for (r, a, t, s, n), es in groups.items()]

    def packs(self) -> list[tuple[TrialPoint, ...]]:
        """The Ray trials of a grid: the trials of :meth:`trials` in grid order, grouped into packs of up to
        ``resources.pack`` members that train the same number of epochs (a pack trains its members for the same
        epochs, each reporting its own milestones). With pack 1 (and for a search's baselines) one trial each."""
        size = 1 if self.is_search else self.resources.pack_size
        groups: dict[int, list[TrialPoint]] = {}
        for t in self.trials():
            groups.setdefault(t.epochs, []).append(t)
        out: list[tuple[TrialPoint, ...]] = []
        for members in groups.values():
            out += [tuple(members[i : i + size]) for i in range(0, len(members), size)]
        return out

    @property
    def packed(self) -> bool:
        """Whether the trials are packs (config ``{"pack": [...]}``) rather than single points (``{"point": ...}``)."""
        return self.resources.pack_size > 1 and not self.is_search

    def tune_configs(self) -> list[dict[str, Any]]:
        """The Tune configs of the grid's trials: ``{"point": ...}`` each without packing (as always), else ``{"pack": [...]}``."""
        if not self.packed:
            return [{"point": p.as_config()} for p in self.trials()]
        return [pack_config(members) for members in self.packs()]

    def repeated_trainings(self) -> list[list[TrialPoint]]:
        """Groups of two or more trials that train the same weights. alpha weighs the hard labels, so at 1 the
        teacher's term is weighted 0: the distilled trials of alpha 1 (whatever their temperature) and the
        scratch baseline of the same seed, label noise and epochs train, bit for bit, one student."""
        groups: dict[tuple[Any, ...], list[TrialPoint]] = {}
        for t in self.trials():
            if t.alpha == 1.0:
                groups.setdefault((t.seed, t.label_noise, t.milestones), []).append(t)
        return [g for g in groups.values() if len(g) > 1]

    def student_epochs(self) -> int:
        """Student epochs the sweep trains (the cost that epoch sharing cuts); for a search, at most
        (every search trial trained to the largest epochs value: early stopping only lowers it)."""
        return sum(t.epochs for t in self.trials()) + self.search.num_samples * max(self.grid.epochs)

    def planned_rows(self) -> int:
        """Rows of the results: the grid points (with baselines), plus one per search trial."""
        return len(self.grid_points()) + self.search.num_samples

    def flat_params(self) -> dict[str, Any]:
        """Every static config value as ``section.key`` -> value (for MLflow params)."""
        out: dict[str, Any] = {"name": self.name, "baselines": ",".join(self.baselines), "max_failures": self.max_failures,
                               "share_epochs": self.share_epochs}
        sections = ["dataset", "teacher", "student", "resources"] + (["search"] if self.is_search else [])
        for section in sections:
            for k, v in asdict(getattr(self, section)).items():
                if (section, k) == ("resources", "pack"):
                    continue  # how grid points are grouped into trials: the same grid point, packed or not, has the same params
                out[f"{section}.{k}"] = list(v) if isinstance(v, tuple) else v
        if self.scheduler is not None:
            out |= {f"scheduler.{k}": v for k, v in asdict(self.scheduler).items()}
        return out


def pack_config(members: tuple[TrialPoint, ...] | list[TrialPoint]) -> dict[str, Any]:
    """A pack trial's Tune config."""
    return {"pack": [p.as_config() for p in members]}


def is_pack(config: Mapping[str, Any]) -> bool:
    """Whether a Tune trial config is a pack's (else one point's)."""
    return "pack" in config


def trial_points(config: Mapping[str, Any]) -> list[TrialPoint]:
    """The trials a Tune config trains: its pack's members, or its one point."""
    if is_pack(config):
        return [TrialPoint.from_config(c) for c in config["pack"]]
    return [TrialPoint.from_config(config)]


def trial_label(config: Mapping[str, Any]) -> str:
    """A Ray trial's name: the point's label, or for a pack ``pack<K>-<first member's label>`` (unique: a label is)."""
    points = trial_points(config)
    return f"pack{len(points)}-{points[0].label}" if is_pack(config) else points[0].label


# ---------------------------------------------------------------------------------------------
# Validation: small typed readers that know the file and the key they are reading.


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

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

    d = r.section(top, "dataset", ("name", "train_size", "label_noise", "seed", "normalize", "val_size"), required=("name",))
    ds_name = r.choice("dataset.name", d["name"], tuple(REGISTRY))
    info = REGISTRY[ds_name]
    train_size = d.get("train_size")
    if train_size is not None:
        train_size = r.integer("dataset.train_size", train_size, info.num_classes, info.train_count)
    normalize = d.get("normalize", DatasetSpec.normalize)
    if not isinstance(normalize, bool):
        raise r.fail("dataset.normalize", normalize, "true (mean/std standardization) or false (pixel / 255 only)")
    # The validation images come out of the training set first; what is left must still hold
    # train_size images (or, without a subset, one image per class).
    max_val = info.train_count - (train_size or info.num_classes)
    val_size = d.get("val_size", min(DatasetSpec.val_size, max_val))
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size <= max_val:
        left = f"train_size = {train_size}" if train_size else "one image per class"
        raise r.fail("dataset.val_size", val_size, f"an integer in [0, {max_val}] (of the {info.train_count} training images, "
                                                   f"what is left must hold {left})")
    dataset = DatasetSpec(
        name=ds_name,
        train_size=train_size,
        label_noise=r.number("dataset.label_noise", d.get("label_noise", 0.0), 0.0, 1.0, hi_open=True),
        seed=r.integer("dataset.seed", d.get("seed", 0), 0),
        normalize=normalize,
        val_size=val_size,
    )

    def widths(key: str, value: object) -> tuple[int, ...]:
        return r.items(key, value, lambda k, v: r.integer(k, v, 1, 65536), unique=False)

    t = r.section(top, "teacher", ("widths", "epochs", "lr", "batch_size", "seed", "ensemble", "clean"), required=("widths", "epochs"))
    clean = t.get("clean", False)
    if not isinstance(clean, bool):
        raise r.fail("teacher.clean", clean, "true or false")
    teacher = TeacherSpec(
        widths=_two(r, "teacher.widths", widths("teacher.widths", t["widths"])),
        epochs=r.integer("teacher.epochs", t["epochs"], 1),
        lr=r.number("teacher.lr", t.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
        batch_size=r.integer("teacher.batch_size", t.get("batch_size", 128), 1),
        seed=r.integer("teacher.seed", t.get("seed", 0), 0),
        ensemble=r.integer("teacher.ensemble", t.get("ensemble", 1), 1, 16),
        clean=clean,
    )

    s = r.section(top, "student", ("widths", "lr", "batch_size", "precision"), required=("widths",))
    precision = s.get("precision", StudentSpec.precision)
    if precision not in PRECISIONS:
        raise r.fail("student.precision", precision, "float32 (the default) or bfloat16 (autocast)")
    student = StudentSpec(
        widths=_two(r, "student.widths", widths("student.widths", s["widths"])),
        lr=r.number("student.lr", s.get("lr", 1e-3), 0.0, 10.0, lo_open=True),
        batch_size=r.integer("student.batch_size", s.get("batch_size", 128), 1),
        precision=precision,
    )

    search = _search(r, top, dataset)
    g = r.section(top, "grid", ("alpha", "temperature", "epochs", "seed", "label_noise"), required=("alpha",))
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
    )
    if search.is_search and not any(isinstance(v, Range) or len(v) > 1 for v in (grid.alpha, grid.temperature, grid.epochs, grid.seed)):
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
    return SweepSpec(name, dataset, teacher, student, grid, baselines, resources, max_failures, share, search, scheduler)


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


def _listed(axis: Axis) -> tuple[float, ...]:
    """The values of a listed axis (a range has none: only a search samples from it)."""
    if isinstance(axis, Range):
        raise ValueError(f"a range {axis.show()} has no list of values: only a search samples from it")
    return axis


def _two(r: _Reader, key: str, widths: tuple[int, ...]) -> tuple[int, ...]:
    if len(widths) != 2:
        raise r.fail(key, list(widths), "a list of 2 positive integers (filters of the two convolutions)")
    return widths


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


def space_to_yaml(spec: SweepSpec) -> str:
    """The spec as YAML, as stored beside a sweep so that ``resume`` needs no original file."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    data = plain(asdict(spec))
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
