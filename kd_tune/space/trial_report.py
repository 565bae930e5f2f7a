"""The one codec of what a trial reports to Ray Tune each epoch (:class:`TrialReport`), beside the one of its config
(:mod:`kd_tune.space.trials`).

The trainable encodes (:meth:`TrialReport.encode`); everything that reads a result back decodes it
(:meth:`TrialReport.decode`): the tracking callback and recorder, the results table and ``kd-tune status``, ``sync``,
the search, and a pack's checkpoint replayed as results. On the wire (what Tune stores and shows):

- a one-student trial's report is flat, ``{"epoch", <metrics>..., <where>...}``, so that a scheduler or a searcher
  finds its metric (``val_acc``) at the top, as Tune expects; a diverged student reports
  ``{"epoch", "diverged": 1.0, "diverged_loss"}``;
- a pack's report nests each member's part under ``members`` (``{label: {"epoch", <metrics>...}}``, or that member's
  divergence), with ``diverged_members``, the list of members gone so far.

Older sweeps wrote ``diverged_members`` as one comma-joined string: :meth:`TrialReport.decode` reads both.
Plain Python, like the config's codec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEDULE_METRICS = ("epoch_alpha", "epoch_T")
"""The alpha and T an epoch trained with, reported where they change during training (a schedule, PBT)."""
REPORTED_METRICS = ("train_loss", "train_hard_loss", "train_distill_loss", "test_acc", "test_loss", "teacher_agreement",
                    "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece", "epoch_seconds", "val_acc", "val_loss",
                    *SCHEDULE_METRICS)
"""A student's metrics of one epoch (the training layer's ``EpochMetrics`` fields but its epoch, then
:data:`SCHEDULE_METRICS`), as reported and logged."""
WHERE = ("device", "node_id", "node_ip", "hostname", "resumed_from", "train_images", "val_images")
"""What a report says of the attempt that made it: the trainable's part and Ray's (node_ip, hostname)."""
REPLAYED = "replayed"
"""Set on a report of an epoch trained before a restart, re-reported from the checkpoint's history (for the record):
schedulers that act on results (a population's) leave it alone."""
MEMBERS = "members"
DIVERGED = "diverged"
DIVERGED_LOSS = "diverged_loss"
DIVERGED_MEMBERS = "diverged_members"


@dataclass(frozen=True)
class StudentEpoch:
    """One student's part of a report: its metrics at ``epoch``, or (``diverged_loss`` set) that its loss went NaN or
    infinite in that epoch."""

    epoch: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    diverged_loss: float | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_loss is not None

    def encode(self) -> dict[str, Any]:
        if self.diverged:
            return {"epoch": self.epoch, DIVERGED: 1.0, DIVERGED_LOSS: float(self.diverged_loss or 0.0)}
        return {"epoch": self.epoch, **{k: float(v) for k, v in self.metrics.items()}}

    @classmethod
    def decode(cls, part: Mapping[str, Any]) -> StudentEpoch:
        epoch = int(part.get("epoch", 0) or 0)
        if part.get(DIVERGED):
            loss = part.get(DIVERGED_LOSS)
            return cls(epoch, {}, float("nan") if loss is None else float(loss))
        return cls(epoch, {k: float(part[k]) for k in REPORTED_METRICS if part.get(k) is not None})

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> StudentEpoch:
        """From a metrics dict with its ``epoch`` (``EpochMetrics.as_dict()``, a checkpoint's history entry)."""
        return cls.decode({k: v for k, v in values.items() if k not in (DIVERGED, DIVERGED_LOSS)})


@dataclass(frozen=True)
class TrialReport:
    """One report of a trial: its epoch, each student's part (``students``: by pack member label; a one-student trial's
    one part under the key None), the pack members gone so far, and where the attempt ran."""

    epoch: int
    students: Mapping[str | None, StudentEpoch]
    diverged_members: tuple[str, ...] = ()
    where: Mapping[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return None not in self.students

    @classmethod
    def one(cls, part: StudentEpoch, where: Mapping[str, Any] | None = None) -> TrialReport:
        """A one-student trial's report."""
        return cls(part.epoch, {None: part}, (), dict(where or {}))

    @classmethod
    def pack(cls, epoch: int, parts: Mapping[str, StudentEpoch], gone: Iterable[str], where: Mapping[str, Any] | None = None) -> TrialReport:
        """A pack's report: the members still training (and those that diverged this epoch), and every member gone so far."""
        students: dict[str | None, StudentEpoch] = {label: part for label, part in parts.items()}
        return cls(epoch, students, tuple(sorted(gone)), dict(where or {}))

    def encode(self) -> dict[str, Any]:
        """The dict ``tune.report`` gets (see the module's docstring)."""
        if not self.packed:
            return {**self.students[None].encode(), **self.where}
        return {"epoch": self.epoch, MEMBERS: {label: s.encode() for label, s in self.students.items()},
                DIVERGED_MEMBERS: list(self.diverged_members), **self.where}

    @classmethod
    def decode(cls, result: Mapping[str, Any]) -> TrialReport:
        """A report as Tune hands it back (``on_trial_result``, ``Trial.last_result``, a result file's line)."""
        where = {k: result[k] for k in WHERE if k in result}
        epoch = int(result.get("epoch", 0) or 0)
        if MEMBERS not in result:
            return cls(epoch, {None: StudentEpoch.decode(result)}, (), where)
        gone = result.get(DIVERGED_MEMBERS) or ()
        if isinstance(gone, str):  # written by kd-tune before the codec
            gone = [g for g in gone.split(",") if g]
        members: dict[str | None, StudentEpoch] = {str(label): StudentEpoch.decode(part) for label, part in (result.get(MEMBERS) or {}).items()}
        return cls(epoch, members, tuple(str(g) for g in gone), where)

    def of(self, label: str | None) -> StudentEpoch | None:
        """The part of the student ``label`` (a pack member), or the one student's (None or any label of a one-student trial)."""
        if not self.packed:
            return self.students[None]
        return None if label is None else self.students.get(label)

    def is_gone(self, label: str | None) -> bool:
        """Whether that student has diverged by this report (this epoch or before)."""
        if not self.packed:
            return self.students[None].diverged
        return label in self.diverged_members or bool((part := self.students.get(label or "")) and part.diverged)

    @property
    def diverged(self) -> bool:
        """A one-student trial whose student diverged (a pack never does as a whole)."""
        return not self.packed and self.students[None].diverged
