"""Moments of a trial that a test can act at, behind one object in the trial bundle.

A sweep's trials call :class:`TrialHooks` at fixed moments: on their fresh students' initial weights, before
training, after each reported epoch. The default, :data:`NO_HOOKS`, does nothing: every real sweep's trials run
with it. The tests drive Ray Tune's retries, errored trials, divergence and pauses through a real sweep with
:class:`FaultInjection`, which the driver builds from two environment variables (:func:`from_environment`):

- ``KD_TUNE_TEST_FAULT="<trial or member label>:<mode>[,...]"`` with the modes
  ``always`` (every attempt crashes before training), ``once`` (the first attempt crashes right after its first
  reported epoch; a marker file in the trial's folder remembers that it happened, across processes and nodes) and
  ``nan`` (the student's initial weights are NaN, so its loss diverges at epoch 1: alone, in a pack);
- ``KD_TUNE_TEST_GATE=<path>``: every trial waits after each epoch while that file exists (a test pauses
  training at a moment of its choosing, e.g. to restart a server before the sweep can end); while it waits, the file
  ``<path>.<trial label>`` holds the epoch it reported last (what it has really trained, whatever the tracking shows)
  and the trial's process id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd_tune.files import atomic_write_bytes
from kd_tune.sweep.state.storage import Storage

FAULT_ENV = "KD_TUNE_TEST_FAULT"
GATE_ENV = "KD_TUNE_TEST_GATE"


class TrialHooks:
    """What a trial calls at fixed moments; every method here does nothing."""

    def initial_weights(self, labels: Sequence[str], states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Fresh students' initial weights (``states[k]`` of the student ``labels[k]``), before training starts;
        the hook may change them in place."""

    def before_training(self, label: str, trial_dir: str) -> None:
        """Trial ``label`` (its folder ``trial_dir`` relative to the storage root) is about to train."""

    def after_epoch(self, label: str, trial_dir: str, epoch: int) -> None:
        """Trial ``label`` has reported epoch ``epoch``, with its checkpoint."""


NO_HOOKS = TrialHooks()


@dataclass(frozen=True)
class FaultInjection(TrialHooks):
    """Test-only faults (see the module's docstring): per label, a mode; and a gate file that holds every trial."""

    storage: Storage
    """Where a ``once`` fault leaves its marker (in the trial's folder)."""
    modes: Mapping[str, str] = field(default_factory=dict)
    """Trial (or pack member) label -> ``always``, ``once`` or ``nan``."""
    gate: str | None = None

    def initial_weights(self, labels: Sequence[str], states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for label, state in zip(labels, states, strict=True):
                if self.modes.get(label) == "nan":
                    for t in state.values():
                        if t.is_floating_point():
                            t.fill_(float("nan"))

    def before_training(self, label: str, trial_dir: str) -> None:
        if self.modes.get(label) == "always":
            self._crash(label, trial_dir)

    def after_epoch(self, label: str, trial_dir: str, epoch: int) -> None:
        if self.modes.get(label) == "once" and not self.storage.exists(self._marker(trial_dir)):
            self._crash(label, trial_dir)
        if not (self.gate and os.path.exists(self.gate)):
            return
        held = f"{self.gate}.{label}"
        # The test reads which epoch each held trial reported last, and which process holds it.
        atomic_write_bytes(Path(held), f"{epoch} {os.getpid()}".encode())
        try:
            while os.path.exists(self.gate):
                time.sleep(0.05)  # held by a test until it removes the file
        finally:
            os.remove(held)

    @staticmethod
    def _marker(trial_dir: str) -> str:
        return f"{trial_dir}/.kd_tune_fault_injected"

    def _crash(self, label: str, trial_dir: str) -> None:
        self.storage.write_text("1", self._marker(trial_dir))
        raise RuntimeError(f"injected fault ({FAULT_ENV}={label}:{self.modes[label]})")


def from_environment(storage: Storage) -> TrialHooks:
    """The sweep's hooks: :class:`FaultInjection` when a test set :data:`FAULT_ENV` or :data:`GATE_ENV`, else :data:`NO_HOOKS`."""
    faults, gate = os.environ.get(FAULT_ENV, ""), os.environ.get(GATE_ENV) or None
    if not faults and not gate:
        return NO_HOOKS
    modes = {}
    for item in faults.split(","):
        label, _, mode = item.rpartition(":")
        if label:
            modes[label] = mode
    return FaultInjection(storage, modes, gate)
