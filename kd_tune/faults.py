"""Test-only fault injection for trials, kept out of the trainable's reading path.

``KD_TUNE_TEST_FAULT="<trial label>:<mode>[,...]"`` makes the named trials fail on purpose, so that
the tests can drive Ray Tune's retries, errored trials and divergence through the real sweep:

- ``always``: every attempt crashes before training;
- ``once``: the first attempt crashes right after its first reported epoch (a marker file in the
  trial's folder remembers that it happened, across processes and nodes);
- ``nan``: the images are NaN, so the loss diverges.

``KD_TUNE_TEST_GATE=<path>`` holds every trial after each epoch while that file exists (a test pauses
training at a moment of its choosing, e.g. to restart a server before the sweep can end).

Without the variables every hook is a no-op.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from kd_tune.storage import Storage
from kd_tune.train import TensorData

FAULT_ENV = "KD_TUNE_TEST_FAULT"
GATE_ENV = "KD_TUNE_TEST_GATE"


@dataclass(frozen=True)
class FaultHook:
    """The fault (if any) asked for one trial."""

    mode: str
    """"" (none), "always", "once" or "nan"."""
    label: str
    storage: Storage
    trial_dir: str
    """The trial's folder, relative to the storage root (where the ``once`` marker goes)."""

    @classmethod
    def for_trial(cls, label: str, storage: Storage, trial_dir: str) -> FaultHook:
        mode = ""
        for item in os.environ.get(FAULT_ENV, "").split(","):
            name, _, how = item.rpartition(":")
            if name == label:
                mode = how
        return cls(mode, label, storage, trial_dir)

    def before_training(self) -> None:
        if self.mode == "always":
            self._crash()

    def after_epoch(self) -> None:
        if self.mode == "once" and not self.storage.exists(self._marker):
            self._crash()
        gate = os.environ.get(GATE_ENV)
        while gate and os.path.exists(gate):
            time.sleep(0.05)  # held by a test until it removes the file

    def data(self, data: TensorData) -> TensorData:
        if self.mode != "nan":
            return data
        return replace(data, train_x=data.train_x.clone().fill_(float("nan")))

    @property
    def _marker(self) -> str:
        return f"{self.trial_dir}/.kd_tune_fault_injected"

    def _crash(self) -> None:
        self.storage.write_text("1", self._marker)
        raise RuntimeError(f"injected fault ({FAULT_ENV}={self.label}:{self.mode})")
