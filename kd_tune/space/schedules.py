"""Alpha and temperature that change during training: a value per epoch instead of one number. Plain Python (the
training layer reads it each epoch, the search space parses it).

A :class:`Schedule` goes from ``start`` to ``end`` in one of four shapes, after ``warmup`` epochs held at ``start``:

- ``constant``: ``start`` every epoch (what a plain number means);
- ``linear``:   ``start + (end - start) * p``;
- ``cosine``:   ``end + (start - end) * (1 + cos(pi * p)) / 2`` (SGDR's half cosine, Loshchilov & Hutter, ICLR 2017);
- ``step``:     ``steps`` equal jumps: the ramp is cut into ``steps + 1`` equal plateaus, the first at ``start``, the last
  at ``end``;
- ``table``:    ``values[e - 1]`` at epoch e, then the last value (a replayed PBT schedule, ``kd-tune replay``).

where ``p`` in [0, 1] is the progress of epoch e through the ramp: ``p = (e - warmup - 1) / (over - 1)``, so the first
epoch after the warm-up trains with ``start`` and epoch ``warmup + over`` with ``end``; later epochs keep ``end``.

**Per epoch index, or over the trial's epochs.** With ``over`` set, the value at epoch e is a function of e alone: a
100-epoch run is exactly the first 100 epochs of the 1000-epoch run with the same schedule, so epoch sharing (one trial
serving several ``grid.epochs`` values) and packs stay exact. Without ``over`` the ramp spans the trial's own epochs
(``over = epochs - warmup``): then a 100-epoch and a 1000-epoch point have *different* schedules, and each trains in
a trial of its own (:meth:`Schedule.shareable`; ``kd_tune.space.schema.SweepSpec.trials``).

The annealing of Jafari et al. (EACL 2021) is a schedule of the teacher's weight (here ``1 - alpha``) or of T; the
curriculum temperature of CTKD (Li et al., AAAI 2023) learns T per step adversarially; a cosine or step schedule of T
is its fixed-schedule counterpart.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SHAPES = ("constant", "linear", "cosine", "step", "table")
SHORT = {"constant": "const", "linear": "lin", "cosine": "cos", "step": "step", "table": "tbl"}
"""Each shape's tag in a trial's label (``alin0to0.7o20``)."""


@dataclass(frozen=True)
class Schedule:
    """A value per epoch (1-based): see the module's docstring for the shapes."""

    shape: str
    start: float
    end: float | None = None
    """The value the ramp ends at (``constant``: None, the start throughout)."""
    over: int | None = None
    """Epochs of the ramp after the warm-up; None: the rest of the trial's epochs (then the schedule depends on them)."""
    warmup: int = 0
    """Epochs held at ``start`` before the ramp."""
    steps: int = 1
    """``step``: how many jumps from ``start`` to ``end``."""
    values: tuple[float, ...] = ()
    """``table``: the value of each epoch."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape {self.shape!r}: allowed {', '.join(SHAPES)}")
        if self.shape == "table" and not self.values:
            raise ValueError("a table schedule needs its values, one per epoch")
        if self.shape not in ("constant", "table") and self.end is None:
            raise ValueError(f"a {self.shape} schedule needs an end value")

    @property
    def shareable(self) -> bool:
        """Whether the value at epoch e depends on e alone (not on how many epochs the trial trains)."""
        return self.shape in ("constant", "table") or self.over is not None

    def at(self, epoch: int, epochs: int) -> float:
        """The value at epoch ``epoch`` (1-based) of a trial that trains ``epochs`` epochs."""
        if self.shape == "table":
            return float(self.values[min(epoch, len(self.values)) - 1])
        if self.shape == "constant" or epoch <= self.warmup or self.end is None:
            return float(self.start)
        length = self.over if self.over is not None else max(1, epochs - self.warmup)
        p = 1.0 if length <= 1 else min(1.0, (epoch - self.warmup - 1) / (length - 1))
        start, end = float(self.start), float(self.end)
        if self.shape == "linear":
            return start + (end - start) * p
        if self.shape == "cosine":
            return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
        return start + (end - start) * min(self.steps, math.floor(p * (self.steps + 1) + 1e-9)) / self.steps

    def as_config(self) -> dict[str, Any]:
        """The schedule as plain values (a trial's config, a checkpoint, an artifact); defaults left out."""
        out: dict[str, Any] = {"shape": self.shape, "start": self.start}
        if self.end is not None:
            out["end"] = self.end
        if self.over is not None:
            out["over"] = self.over
        if self.warmup:
            out["warmup"] = self.warmup
        if self.shape == "step":
            out["steps"] = self.steps
        if self.values:
            out["values"] = list(self.values)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        return cls(shape=str(config["shape"]), start=float(config.get("start", (config.get("values") or [0.0])[0])),
                   end=None if config.get("end") is None else float(config["end"]),
                   over=None if config.get("over") is None else int(config["over"]), warmup=int(config.get("warmup", 0)),
                   steps=int(config.get("steps", 1)), values=tuple(float(v) for v in config.get("values") or ()))

    def text(self) -> str:
        """One readable line (an MLflow param, the plan): ``linear 0 -> 0.7 over 20 epochs after 2 warm-up epochs``."""
        if self.shape == "table":
            shown = " ".join(f"{v:g}" for v in self.values[:8]) + (" ..." if len(self.values) > 8 else "")  # no comma: a report's knobs key holds it
            return f"table of {len(self.values)} epochs [{shown}] (sha {self.digest()})"
        if self.shape == "constant":
            return f"constant {self.start:g}"
        span = f"over {self.over} epochs" if self.over is not None else "over the trial's epochs"
        steps = f" in {self.steps} steps" if self.shape == "step" else ""
        warm = f" after {self.warmup} warm-up epochs" if self.warmup else ""
        return f"{self.shape} {self.start:g} -> {self.end:g}{steps} {span}{warm}"

    def tag(self) -> str:
        """A short form for labels: ``lin0to0.7o20w2``, ``cos4to1``, ``step0.9to0.1k2``, ``tbl3f2a9c1e``."""
        if self.shape == "table":
            return f"tbl{self.digest()}"
        if self.shape == "constant":
            return f"{self.start:g}"
        out = f"{SHORT[self.shape]}{self.start:g}to{self.end:g}"
        out += f"k{self.steps}" if self.shape == "step" else ""
        out += f"o{self.over}" if self.over is not None else ""
        return out + (f"w{self.warmup}" if self.warmup else "")

    def digest(self) -> str:
        """8 hex digits naming a table's values (two tables with the same digest are the same schedule)."""
        return hashlib.sha256(",".join(repr(float(v)) for v in self.values).encode()).hexdigest()[:8]


Value = float | Schedule
"""An alpha or a temperature: one number for every epoch, or a schedule."""


def value_at(value: Value, epoch: int, epochs: int) -> float:
    """``value`` at epoch ``epoch`` (1-based) of a trial of ``epochs`` epochs: the number itself, or the schedule's."""
    return value.at(epoch, epochs) if isinstance(value, Schedule) else float(value)


def schedule_of(config: Mapping[str, Any] | None) -> Schedule | None:
    """A schedule from its config (None or empty: none)."""
    return Schedule.from_config(config) if config else None
