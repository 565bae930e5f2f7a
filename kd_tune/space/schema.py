"""What a sweep is: the typed, frozen config objects a search-space file is read into, and the sweep's plan.

A :class:`SweepSpec` knows its grid points, the trials that serve them (epoch sharing), how they pack and what
they cost; :mod:`kd_tune.space.parse` makes one from YAML (validating every key). Plain Python: validating a space
or printing ``--help`` imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from kd_tune.space.methods import DEFAULT_METHOD, Knobs, canonical_knobs
from kd_tune.space.schedules import Schedule, Value
from kd_tune.space.sections import StudentSpec, TeacherSpec, section_params
from kd_tune.space.trials import TrialPoint, encode_pack, encode_point, student_point

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_ALLOWED = "1-100 letters, digits, '_', '.', '-', starting with a letter or digit (no path separators)"
BASELINES = ("scratch",)
ALGORITHMS = ("grid", "random", "optuna")
"""How the students' alpha and T are chosen: every point of a grid, or sampled (uniformly / by Optuna's TPE)."""
POPULATION_SCHEDULERS = ("pbt", "pb2")
SCHEDULERS = ("asha", *POPULATION_SCHEDULERS)
METRICS = ("val_acc", "test_acc")
MAX_PACK = 1024
GPU_PACK = 64
"""``resources.pack`` when unset and trials get a GPU. On a GPU one small student is launch-bound; a pack of 64
takes most of what larger packs gain while a grid still spreads over several GPUs (benchmarks/RESULTS.md, "packed
students on a GPU", H100)."""


def is_valid_name(name: object) -> bool:
    """A sweep name: also a folder name, so never a path out of the storage folder."""
    return isinstance(name, str) and bool(NAME_PATTERN.match(name)) and ".." not in name


@dataclass(frozen=True)
class DatasetSpec:
    """Which data the teacher and the students learn from."""

    name: str = "mnist"
    """Dataset name, one of the registry's (``kd_tune.data.registry.REGISTRY``)."""
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
    path: str | None = None
    """Your own data instead of a registry's: a folder in ImageFolder's layout or a .npz file (``kd_tune.data.custom``)."""
    test_split: float = 0.0
    """With ``path`` and no test set in it: the fraction of its images held out as the test set (seeded, stratified)."""
    max_gb: float | None = None
    """With ``path``: the memory the data may take as kd-tune holds it (default: half of the machine's)."""


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
KnobAxis = tuple[Any, ...] | Range
"""A knob's values in a ``grid.method`` entry: listed (numbers, true / false or a categorical knob's names) or a range."""


@dataclass(frozen=True)
class MethodEntry:
    """One entry of the ``grid.method`` axis: a method, the axes of its knobs (those it leaves out keep their
    defaults), and its own alpha and T axes where it sets them (else the grid's)."""

    method: str = DEFAULT_METHOD
    knobs: tuple[tuple[str, KnobAxis], ...] = ()
    alpha: Axis | None = None
    temperature: Axis | None = None

    def axes(self, grid: GridSpec) -> tuple[Axis, Axis]:
        """The entry's (alpha, temperature) axes: its own, else the grid's."""
        return (self.alpha if self.alpha is not None else grid.alpha, self.temperature if self.temperature is not None else grid.temperature)

    def points(self, grid: GridSpec) -> list[tuple[Value, Value, Knobs]]:
        """Every (alpha, T, knobs) of a grid's entry (alpha or T a number or a schedule), in order: alpha, then T, then the knobs as listed (a knob that
        does not apply given the others, e.g. ``skew`` with forward_kl, is dropped, and the combinations it would
        repeat with it)."""
        alpha, temperature = self.axes(grid)
        names = [name for name, _ in self.knobs]
        combos = list(dict.fromkeys(canonical_knobs(self.method, dict(zip(names, values, strict=True)))
                                    for values in itertools.product(*(_listed(v) for _, v in self.knobs))))
        # The grid's schedules are more values of its axes (an entry with its own alpha or T axis has none).
        alphas: list[Value] = [*_listed(alpha), *(grid.alpha_schedules if self.alpha is None else ())]
        temperatures: list[Value] = [*_listed(temperature), *(grid.temperature_schedules if self.temperature is None else ())]
        return [(a, t, k) for a, t, k in itertools.product(alphas, temperatures, combos)]

    @property
    def is_default(self) -> bool:
        return self.method == DEFAULT_METHOD and not self.knobs and self.alpha is None and self.temperature is None


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
    student: tuple[str, ...] = ()
    """Names of the students of the ``grid.student`` axis (empty: the ``student`` section alone)."""
    teacher: tuple[str, ...] = ()
    """Names of the teachers of the ``grid.teacher`` axis (empty: the ``teacher`` section alone)."""
    method: tuple[MethodEntry, ...] = ()
    """The ``grid.method`` axis: each entry a method with its knobs' axes (empty: ``kd`` with its defaults, on the
    grid's alpha and T)."""
    alpha_schedules: tuple[Schedule, ...] = ()
    """Schedules of alpha listed in ``grid.alpha`` beside its numbers (:mod:`kd_tune.space.schedules`): more values of the axis."""
    temperature_schedules: tuple[Schedule, ...] = ()
    """Schedules of T listed in ``grid.temperature``."""

    def methods(self) -> tuple[MethodEntry, ...]:
        """The method axis' entries (``kd`` with its defaults where there is no axis)."""
        return self.method or (MethodEntry(),)


@dataclass(frozen=True)
class SearchSpec:
    """How the students' configurations are chosen: the grid, or a seeded search run by Ray Tune."""

    algorithm: str = "grid"
    """grid (every point), random (uniform sampling) or optuna (TPE): see ``kd_tune.sweep.search``."""
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
    """Ray Tune's scheduler of a search: ``asha`` stops search trials early (one rung check per epoch); ``pbt`` and ``pb2``
    train a population whose alpha, T (and knobs) change during training (``kd_tune.sweep.population``)."""

    name: str = "asha"
    grace_period: int = 1
    """asha: epochs every trial trains before it can be stopped."""
    reduction_factor: int = 3
    """asha: keep about the best 1 / reduction_factor of the trials at each rung."""
    perturbation_interval: int = 0
    """pbt, pb2: epochs between two exploit/explore decisions of a member."""
    quantile_fraction: float = 0.25
    """pbt, pb2: the bottom fraction of the population that clones the top fraction."""
    resample_probability: float = 0.25
    """pbt: how often an explored value is drawn anew from its range instead of scaled by 0.8 or 1.2."""
    mutate: tuple[str, ...] = ()
    """pbt, pb2: what changes during training: alpha, temperature, and numeric knobs of the method."""

    def params(self) -> dict[str, Any]:
        """The keys that apply to this scheduler (its MLflow params: an ASHA sweep's are what they were before PBT)."""
        keys = ("name", "perturbation_interval", "quantile_fraction", "mutate") if self.population else ("name", "grace_period", "reduction_factor")
        out = {k: getattr(self, k) for k in keys}
        if self.name == "pbt":
            out["resample_probability"] = self.resample_probability
        return out

    @property
    def population(self) -> bool:
        """Whether it trains a population (PBT, PB2) rather than stopping trials early."""
        return self.name in POPULATION_SCHEDULERS


@dataclass(frozen=True)
class ResourcesSpec:
    """What one trial asks of Ray; fractions of a GPU pack several trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0
    pack: int | None = None
    """Grid points trained together as one packed model per trial (``kd_tune.distill.packed``); 1 = one student per
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
    student_variants: tuple[tuple[str, StudentSpec], ...] = ()
    """The ``grid.student`` axis: (name, student) pairs, each the ``student`` section with that entry's overrides."""
    teacher_variants: tuple[tuple[str, TeacherSpec], ...] = ()
    """The ``grid.teacher`` axis: (name, teacher) pairs."""

    def students(self) -> dict[str, StudentSpec]:
        """Every student of the sweep by axis name (``""``: the ``student`` section, when there is no axis)."""
        return dict(self.student_variants) or {"": self.student}

    def teachers(self) -> dict[str, TeacherSpec]:
        """Every teacher of the sweep by axis name (``""``: the ``teacher`` section, when there is no axis)."""
        return dict(self.teacher_variants) or {"": self.teacher}

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
        students, teachers = list(self.students()), list(self.teachers())
        methods = [] if self.is_search else [(m.method, point) for m in g.methods() for point in m.points(g)]
        points = [
            student_point(a, t, e, s, label_noise=n, student=st, teacher=te, method=method, knobs=knobs)
            for n, te, st, (method, (a, t, knobs)), s, e in itertools.product(self.noise_levels(), teachers, students, methods, g.seed,
                                                                              sorted(g.epochs))
        ]
        if "scratch" in self.baselines:
            # Training on hard labels alone ignores the teacher and the temperature.
            points += [TrialPoint("scratch", 1.0, None, e, s, label_noise=n, student=st)
                       for n, st, s, e in itertools.product(self.noise_levels(), students, g.seed, sorted(g.epochs))]
        return points

    def trials(self) -> list[TrialPoint]:
        """The trials that serve the grid points: one per point, or one per epochs group when shared."""
        points = self.grid_points()
        if not self.share_epochs:
            return points
        groups: dict[tuple[Any, ...], list[int]] = {}
        for p in points:
            # A schedule over each trial's own epochs differs per epochs value: such a point is a trial of its own.
            alone = None if p.shareable else p.epochs
            groups.setdefault((p.role, p.alpha, p.temperature, p.seed, p.label_noise, p.student, p.teacher, p.method, p.knobs,
                               p.alpha_schedule, p.temperature_schedule, alone), []).append(p.epochs)
        return [TrialPoint(r, a, t, max(es), s, tuple(sorted(es)), n, st, te, m, k, asch, tsch)
                for (r, a, t, s, n, st, te, m, k, asch, tsch, _), es in groups.items()]

    def packs(self) -> list[tuple[TrialPoint, ...]]:
        """The Ray trials of a grid: the trials of :meth:`trials` in grid order, grouped into packs of up to
        ``resources.pack`` members that train the same number of epochs (a pack trains its members for the same
        epochs, each reporting its own milestones). A pack holds students of one ``grid.student`` entry (one
        architecture, one optimizer's settings), whatever their methods (a pack computes each member's own loss);
        students of an architecture that does not pack, a search's baselines and pack 1 give one trial each."""
        students = self.students()
        groups: dict[tuple[int, str], list[TrialPoint]] = {}
        for t in self.trials():
            groups.setdefault((t.epochs, t.student), []).append(t)
        out: list[tuple[TrialPoint, ...]] = []
        for (_, student), members in groups.items():
            size = self.resources.pack_size if self.packed and students[student].model.packs else 1
            out += [tuple(members[i : i + size]) for i in range(0, len(members), size)]
        return out

    @property
    def packed(self) -> bool:
        """Whether the trials are encoded as packs (config ``{"pack": [...]}``; a pack of one is one point's trial)
        rather than single points (``{"point": ...}``): with a pack size above 1, in a grid with a student that packs."""
        return self.resources.pack_size > 1 and not self.is_search and any(s.model.packs for s in self.students().values())

    def unpacked_students(self) -> list[str]:
        """The students whose architecture does not pack although the pack size asks for packs (one per trial instead)."""
        if self.resources.pack_size == 1 or self.is_search:
            return []
        return [name for name, s in self.students().items() if not s.model.packs]

    def tune_configs(self) -> list[dict[str, Any]]:
        """The Tune configs of the grid's trials: ``{"point": ...}`` each without packing (as always), else ``{"pack": [...]}``."""
        if not self.packed:
            return [encode_point(p) for p in self.trials()]
        return [encode_pack(members) for members in self.packs()]

    def repeated_trainings(self) -> list[list[TrialPoint]]:
        """Groups of two or more trials that train the same weights. alpha weighs the hard labels, so at 1 ``kd``'s
        teacher term is weighted 0: the ``kd`` trials of alpha 1 (whatever their temperature and divergence) and the
        scratch baseline of the same seed, label noise and epochs train, bit for bit, one student. (Other methods
        weight their distillation terms with their own knobs: alpha 1 still distills.)"""
        groups: dict[tuple[Any, ...], list[TrialPoint]] = {}
        for t in self.trials():
            if t.alpha == 1.0 and t.method == DEFAULT_METHOD and t.alpha_schedule is None:
                groups.setdefault((t.seed, t.label_noise, t.milestones, t.student), []).append(t)
        return [g for g in groups.values() if len(g) > 1]

    def student_epochs(self) -> int:
        """Student epochs the sweep trains (the cost that epoch sharing cuts); for a search, at most
        (every search trial trained to the largest epochs value: early stopping only lowers it)."""
        return sum(t.epochs for t in self.trials()) + self.search.num_samples * max(self.grid.epochs)

    def planned_rows(self) -> int:
        """Rows of the results: the grid points (with baselines), plus one per search trial."""
        return len(self.grid_points()) + self.search.num_samples

    def run_params(self) -> dict[tuple[str, str], dict[str, Any]]:
        """:meth:`flat_params` of every (student, teacher) a grid point may have: what its MLflow run's params start from."""
        teachers = ["", *(name for name, _ in self.teacher_variants)]
        return {(st, te): self.flat_params(st, te) for st in self.students() for te in teachers}

    def flat_params(self, student: str = "", teacher: str = "") -> dict[str, Any]:
        """Every static config value as ``section.key`` -> value (for MLflow params), with the ``grid.student`` /
        ``grid.teacher`` entries ``student`` / ``teacher`` in place of those sections (their names themselves are params of
        the grid point). A model's arguments are params of their own (``student.arch``, ``student.hidden``, ...)."""
        out: dict[str, Any] = {"name": self.name, "baselines": ",".join(self.baselines), "max_failures": self.max_failures,
                               "share_epochs": self.share_epochs}
        chosen = {"student": self.students()[student] if student else self.student,
                  "teacher": self.teachers()[teacher] if teacher else self.teacher}
        sections = ["dataset", "teacher", "student", "resources"] + (["search"] if self.is_search else [])
        for section in sections:
            spec = chosen.get(section, getattr(self, section))
            for k, v in section_params(spec).items():
                if (section, k) == ("resources", "pack"):
                    continue  # how grid points are grouped into trials: the same grid point, packed or not, has the same params
                out[f"{section}.{k}"] = list(v) if isinstance(v, tuple) else v
        if self.scheduler is not None:
            out |= {f"scheduler.{k}": list(v) if isinstance(v, tuple) else v for k, v in self.scheduler.params().items()}
        return out


def _listed(axis: Axis) -> tuple[float, ...]:
    """The values of a listed axis (a range has none: only a search samples from it)."""
    if isinstance(axis, Range):
        raise ValueError(f"a range {axis.show()} has no list of values: only a search samples from it")
    return axis
