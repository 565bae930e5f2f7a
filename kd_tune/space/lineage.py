"""What trained a student's weights, epoch by epoch: the alpha and T of each epoch, and (Population Based Training) each
exploit, where the weights were cloned from another member of the population. Plain Python.

A trial's checkpoint carries its :class:`Lineage`. When PBT clones member A's checkpoint into member B at epoch k, B
inherits A's lineage (A's alpha and T of epochs 1..k trained those weights) and adds the exploit; B's own MLflow run
keeps what B itself reported before (its metrics are the run's, step = epoch). So the lineage of the best member at the
end is the whole schedule that produced its weights: what ``kd-tune replay`` trains again from scratch with fresh seeds,
to tell the schedule apart from the luck of the population.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kd_tune.space.schedules import Schedule


@dataclass(frozen=True)
class Exploit:
    """At the end of ``epoch`` the weights of ``donor`` (its trial's label and Ray trial id) replaced those of ``member``.
    A lineage inherits its donor's exploits: the chain of clones behind the final weights, whoever made each."""

    epoch: int
    donor: str
    donor_trial: str = ""
    member: str = ""

    def as_config(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "donor": self.donor, "donor_trial": self.donor_trial, "member": self.member}

    def text(self) -> str:
        """``epoch 4: a0.31-T5-e10-s0 cloned a0.84-T5-e10-s0``."""
        return f"epoch {self.epoch}: {self.member or 'cloned'}{' cloned' if self.member else ''} {self.donor}"


@dataclass(frozen=True)
class Lineage:
    """Per epoch the (alpha, T, knobs) that trained these weights, and the exploits on the way."""

    epochs: tuple[tuple[int, float, float], ...] = ()
    """(epoch, alpha, T) of each epoch, in order."""
    exploits: tuple[Exploit, ...] = ()
    knobs: tuple[tuple[int, tuple[tuple[str, Any], ...]], ...] = field(default=())
    """(epoch, the method's knobs in force) where a knob changed (PBT mutating a method's knob); empty: the point's throughout."""

    def trained(self, epoch: int, alpha: float, temperature: float, knobs: Sequence[tuple[str, Any]] = ()) -> Lineage:
        """With epoch ``epoch`` trained at ``alpha`` and ``temperature`` (a replayed epoch replaces its entry)."""
        kept = tuple(e for e in self.epochs if e[0] < epoch)
        changed = tuple(k for k in self.knobs if k[0] < epoch)
        knobs = tuple(knobs)
        if knobs and (not changed or changed[-1][1] != knobs):
            changed += ((epoch, knobs),)
        return replace(self, epochs=(*kept, (epoch, float(alpha), float(temperature))), knobs=changed)

    def exploited(self, exploit: Exploit) -> Lineage:
        return replace(self, exploits=(*self.exploits, exploit))

    def schedules(self) -> tuple[Schedule, Schedule]:
        """alpha and T as table schedules (one value per epoch): what a replay trains."""
        if not self.epochs:
            raise ValueError("an empty lineage has no schedule")
        return (Schedule("table", self.epochs[0][1], values=tuple(a for _, a, _ in self.epochs)),
                Schedule("table", self.epochs[0][2], values=tuple(t for _, _, t in self.epochs)))

    def as_config(self) -> dict[str, Any]:
        """Plain values (a checkpoint's ``lineage``, the ``schedule.json`` artifact)."""
        return {"epochs": [list(e) for e in self.epochs], "exploits": [x.as_config() for x in self.exploits],
                "knobs": [[e, [list(k) for k in ks]] for e, ks in self.knobs]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Lineage:
        if not config:
            return cls()
        return cls(epochs=tuple((int(e), float(a), float(t)) for e, a, t in config.get("epochs", ())),
                   exploits=tuple(Exploit(int(x["epoch"]), str(x["donor"]), str(x.get("donor_trial", "")), str(x.get("member", "")))
                                  for x in config.get("exploits", ())),
                   knobs=tuple((int(e), tuple((str(k), v) for k, v in ks)) for e, ks in config.get("knobs", ())))
