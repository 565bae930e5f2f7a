"""A sweep's trials and the one codec of their Ray Tune configs.

:class:`TrialPoint` is one trial of the grid (or a baseline). A Ray trial's config is what Tune stores, shows and
hands the trainable: ``{"point": {...}}`` for one student, ``{"pack": [{...}, ...]}`` for a pack of students
trained as one model. The driver encodes it (:func:`encode_point`, :func:`encode_pack`); everything else decodes it
with :meth:`TrialConfig.decode`: the trainable, the tracking, the results, ``sync``, the search's scheduler. Trial
folder names are made here too (:func:`trial_folder_name`), so that the trial (which writes there), Tune (which names
the folder) and ``sync`` (which reads it back) cannot disagree.

Plain Python: Tune pickles :mod:`kd_tune.sweep.names`' functions, which import this module, into its experiment
state; reading that state back must not import torch, Ray or MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from kd_tune.space.methods import DEFAULT_METHOD, Knobs, canonical_knobs, method_label, variant
from kd_tune.space.schedules import Schedule, Value, schedule_of
from kd_tune.space.trial_report import TrialReport

POINT = "point"
"""The key of a one-student trial's config."""
PACK = "pack"
"""The key of a pack trial's config."""
MUTABLE = "pbt"
"""The key, in a point's config, of what Population Based Training mutates: ``{"alpha", "temperature", <knob>...}``, the
values in force now. The rest of the point stays the member's first values: its label, folder and MLflow params never
change (MLflow refuses a param's new value), while these follow the population's exploits and explorations."""


def mutable_values(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The values PBT set in a trial's config (None outside PBT)."""
    values = (config.get(POINT) or {}).get(MUTABLE)
    return dict(values) if values else None


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
    student: str = ""
    """The ``grid.student`` entry it trains ("": the ``student`` section, without that axis)."""
    teacher: str = ""
    """The ``grid.teacher`` entry it learns from ("": the ``teacher`` section, without that axis; always for scratch)."""
    method: str = DEFAULT_METHOD
    """The distillation method (:data:`kd_tune.space.methods.METHODS`); scratch baselines are ``kd``'s (alpha 1, no teacher)."""
    knobs: Knobs = ()
    """The method's knobs, every one that applies (:func:`~kd_tune.space.methods.canonical_knobs`: left out, the defaults)."""
    alpha_schedule: Schedule | None = None
    """alpha as a schedule over the epochs (:mod:`kd_tune.space.schedules`; ``alpha`` is then its start value); None: ``alpha`` throughout."""
    temperature_schedule: Schedule | None = None
    """T as a schedule (``temperature`` is then its start value); None: ``temperature`` throughout."""

    def __post_init__(self) -> None:
        if not self.milestones:
            object.__setattr__(self, "milestones", (self.epochs,))
        object.__setattr__(self, "knobs", canonical_knobs(self.method, self.knobs))

    def as_config(self) -> dict[str, Any]:
        """The point as plain values (what Tune stores under ``point``, or as a member of ``pack``); a schedule's key only
        where it has one (a config of before schedules is the same dict)."""
        out = {**asdict(self), "milestones": list(self.milestones), "knobs": dict(self.knobs)}
        for key in ("alpha_schedule", "temperature_schedule"):
            schedule = getattr(self, key)
            if schedule is None:
                del out[key]
            else:
                out[key] = schedule.as_config()
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrialPoint:
        """From :meth:`as_config`'s dict (a config of a sweep from before methods were an axis is ``kd``'s, its defaults)."""
        fields = {k: config[k] for k in ("role", "alpha", "temperature", "epochs", "seed")}
        return cls(**fields, milestones=tuple(config.get("milestones") or ()), label_noise=float(config.get("label_noise", 0.0)),
                   student=str(config.get("student") or ""), teacher=str(config.get("teacher") or ""),
                   method=str(config.get("method") or DEFAULT_METHOD), knobs=tuple(dict(config.get("knobs") or {}).items()),
                   alpha_schedule=schedule_of(config.get("alpha_schedule")), temperature_schedule=schedule_of(config.get("temperature_schedule")))

    @property
    def alpha_value(self) -> Value:
        """What trains: the alpha schedule, else the number."""
        return self.alpha_schedule or self.alpha

    @property
    def temperature_value(self) -> Value:
        """What trains: the T schedule, else the number (1 for a scratch baseline, whose loss ignores it)."""
        return self.temperature_schedule or (self.temperature or 1.0)

    @property
    def shareable(self) -> bool:
        """Whether one trial may serve this point at several epochs values: its schedules, if any, are per epoch index."""
        return all(s is None or s.shareable for s in (self.alpha_schedule, self.temperature_schedule))

    @property
    def scheduled(self) -> bool:
        """Whether alpha or T changes during training."""
        return self.alpha_schedule is not None or self.temperature_schedule is not None

    def at(self, epochs: int) -> TrialPoint:
        """The grid point this trial serves at one of its milestones."""
        return replace(self, epochs=epochs, milestones=(epochs,))

    @property
    def variant(self) -> str:
        """The method as a report compares it (``kd``, ``kd+ls``, ``dkd``: :func:`kd_tune.space.methods.variant`)."""
        return variant(self.method, self.knobs)

    def stopped_at(self, last_result: Mapping[str, Any]) -> int | None:
        """The epoch at which a scheduler stopped this trial early, or None: its last result ended it
        (``done``, which Tune sets on a scheduler's STOP) before its epochs, and it did not diverge."""
        epoch = int(last_result.get("epoch", 0) or 0)
        if last_result.get("done") and not TrialReport.decode(last_result).diverged and 0 < epoch < self.epochs:
            return epoch
        return None

    def grid_config(self) -> dict[str, Any]:
        """The grid point's own values (what a user sees as the run's params): its method and each of the method's knobs
        as a param of its own; ``student`` and ``teacher`` where those are axes of the grid."""
        own = {k: v for k, v in asdict(self).items() if k not in ("milestones", "knobs", "alpha_schedule", "temperature_schedule")
               and not (k in ("student", "teacher") and not v)}
        # A schedule is a param of its own, as one readable line; a constant point has none (its params as before).
        own |= {k: s.text() for k, s in (("alpha_schedule", self.alpha_schedule), ("temperature_schedule", self.temperature_schedule)) if s}
        return own | dict(self.knobs)

    @property
    def label(self) -> str:
        """A short name, used for Ray trials and MLflow runs alike (``e1+2`` for shared epochs)."""
        e = "+".join(str(m) for m in self.milestones)
        noise = f"-n{self.label_noise:g}" if self.label_noise else ""
        models = (f"-S{self.student}" if self.student else "") + (f"-t{self.teacher}" if self.teacher else "")
        if self.role == "scratch":
            return f"scratch-e{e}-s{self.seed}{noise}{models}"
        a = self.alpha_schedule.tag() if self.alpha_schedule else f"{self.alpha:g}"
        t = self.temperature_schedule.tag() if self.temperature_schedule else f"{self.temperature:g}"
        return f"{method_label(self.method, self.knobs)}a{a}-T{t}-e{e}-s{self.seed}{noise}{models}"


def student_point(alpha: Value, temperature: Value, epochs: int, seed: int, **fields: Any) -> TrialPoint:
    """A student's grid point whose alpha and T are each a number or a schedule (the point's number is then the schedule's start)."""
    return TrialPoint("student", alpha.start if isinstance(alpha, Schedule) else alpha,
                      temperature.start if isinstance(temperature, Schedule) else temperature, epochs, seed,
                      alpha_schedule=alpha if isinstance(alpha, Schedule) else None,
                      temperature_schedule=temperature if isinstance(temperature, Schedule) else None, **fields)


def encode_point(point: TrialPoint) -> dict[str, Any]:
    """The Tune config of a trial that trains one student."""
    return {POINT: point.as_config()}


def encode_pack(members: tuple[TrialPoint, ...] | list[TrialPoint]) -> dict[str, Any]:
    """The Tune config of a pack trial: its members trained as one packed model."""
    return {PACK: [p.as_config() for p in members]}


@dataclass(frozen=True)
class TrialConfig:
    """A Ray trial's config, decoded: the grid points it trains (one, or a pack's members)."""

    points: tuple[TrialPoint, ...]
    packed: bool

    @classmethod
    def decode(cls, config: Mapping[str, Any]) -> TrialConfig:
        """From a Tune config made by :func:`encode_point` or :func:`encode_pack`. A pack of one is one point's trial (a grid's
        last, short pack; or, in a packed grid, a student whose architecture does not pack): it trains and records as one."""
        if PACK in config:
            points = tuple(TrialPoint.from_config(c) for c in config[PACK])
            return cls(points, len(points) > 1)
        return cls((TrialPoint.from_config(config[POINT]),), False)

    @property
    def point(self) -> TrialPoint:
        """The one point of a trial that is not a pack."""
        if self.packed:
            raise ValueError(f"trial {self.label} is a pack of {len(self.points)} students, not one point")
        return self.points[0]

    @property
    def label(self) -> str:
        """The trial's name: its point's label, or for a pack ``pack<K>-<first member's label>`` (unique, as a label is)."""
        return f"pack{len(self.points)}-{self.points[0].label}" if self.packed else self.points[0].label

    def members(self) -> list[tuple[str | None, TrialPoint]]:
        """(member label, point) of each student the trial trains: a pack's members by label, or its one point (member None)."""
        return [(p.label, p) for p in self.points] if self.packed else [(None, self.points[0])]

    @property
    def milestones(self) -> set[int]:
        """Every epochs value the trial reports as a grid point of its own."""
        return {m for p in self.points for m in p.milestones}

    @property
    def epochs(self) -> int:
        """How long the trial trains."""
        return max(p.epochs for p in self.points)

    @property
    def is_baseline(self) -> bool:
        """A scratch baseline (a search's scheduler and searcher leave those alone)."""
        return not self.packed and self.points[0].role != "student"


PARAM_COLUMNS = {f"{POINT}/role": "role", f"{POINT}/alpha": "alpha", f"{POINT}/temperature": "T", f"{POINT}/epochs": "epochs",
                 f"{POINT}/seed": "seed"}
"""A one-student trial's values as Tune's progress table names them (it flattens the config's keys with ``/``)."""


def trial_folder_name(config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's folder in its sweep's folder: readable, and computable inside the trial from its config and id."""
    return f"{TrialConfig.decode(config).label}_{trial_id}"
