"""The Tune callback that records every trial in MLflow, from the driver, without ever stalling Tune.

The callback turns each trial event into a write that an :class:`~kd_tune.tracking.outbox.Outbox` ships in order
on its own thread; the writes themselves are :class:`~kd_tune.tracking.recorder.RunRecorder`'s, which
``kd-tune sync`` also uses to rebuild a record from the trials' checkpoints. Ray's own ``MLflowLoggerCallback``
keeps trial -> run in memory only, so a restored sweep would get a second run per trial; this one finds a trial's
run by its tags and skips epochs already logged, so reattaching never duplicates a run or a step.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper

from kd_tune.distill.checkpoint import read_checkpoint
from kd_tune.space.trial_report import TrialReport
from kd_tune.space.trials import TrialConfig
from kd_tune.tracking.datasets import DataInput
from kd_tune.tracking.outbox import Outbox
from kd_tune.tracking.recorder import RunRecorder

RETRY_MAX_ENV = "KD_TUNE_TRACKING_RETRY_MAX_S"  # longest wait between retries while the store is away (default 30 s)
# The outbox of each sweep this process drives: the callback Ray restores is a copy unpickled from the
# experiment state, so the driver finds the live outbox by the sweep's name (see :func:`outbox_of`).
_OUTBOXES: dict[str, Outbox] = {}


def outbox_of(sweep: str) -> Outbox | None:
    """The outbox of the sweep's tracking callback in this process, once Tune has set the callback up
    (or the driver opened it, :func:`open_outbox`)."""
    return _OUTBOXES.get(sweep)


def open_outbox(sweep: str, tracking_uri: str) -> Outbox:
    """The sweep's outbox, opened by the driver before Tune starts, so that the driver's own writes (the
    teachers' runs) are shipped first, in the same order and with the same outage handling as the trials'
    writes; the tracking callback's :meth:`~MlflowTrackingCallback.setup` takes it over."""
    old = _OUTBOXES.pop(sweep, None)
    if old is not None:
        old.close()
    client = MlflowClient(tracking_uri)

    def probe() -> None:
        client.search_experiments(max_results=1)

    outbox = _OUTBOXES[sweep] = Outbox(tracking_uri, probe, lambda: None, _warn, max_backoff=_max_backoff())
    return outbox


def _max_backoff() -> float:
    return float(os.environ.get(RETRY_MAX_ENV, "30"))


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class MlflowTrackingCallback(tune.Callback):
    """Logs every trial to MLflow from the driver (params, per-epoch metrics, final model, status)
    without ever making Tune wait: each event becomes a write put in an :class:`~kd_tune.tracking.outbox.Outbox`
    that one thread ships to the store in order, retrying while the store is away.

    Ray pickles the callback with the experiment and calls :meth:`setup` both when a sweep starts and
    when ``Tuner.restore`` continues it: the recorder and the outbox are built there, so a restored
    callback starts from the store, not from stale memory.

    ``inputs`` maps each label-noise level to its runs' datasets; ``example`` is a model input (a
    couple of preprocessed images) for the logged models' signature. Both are small, plain data: they
    are pickled with the callback.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, static_params: Mapping[tuple[str, str], dict[str, Any]],
                 inputs: Mapping[float, Sequence[DataInput]] | None = None, example: np.ndarray | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.static_params = static_params
        self.inputs = {float(k): list(v) for k, v in (inputs or {}).items()}
        self.example = example
        self._outbox: Outbox | None = None
        self._reset()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the experiment: the outbox (a thread) and the recorder (a client) are rebuilt in setup().
        return {**self.__dict__, "_outbox": None, "_recorder": None}

    def _reset(self) -> None:
        self._recorder: RunRecorder | None = None
        self._epoch: dict[str, int] = {}  # trial id -> epoch of its latest result
        self._diverged: set[str] = set()  # trial ids

    def setup(self, stop: Stopper | None = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any) -> None:
        self._reset()
        recorder = self.recorder
        outbox = _OUTBOXES.get(self.sweep)
        if outbox is None or outbox.closed:
            outbox = _OUTBOXES[self.sweep] = Outbox(self.tracking_uri, recorder.probe, recorder.forget, _warn, max_backoff=_max_backoff())
        # The driver's outbox (open_outbox), its own writes maybe still queued: after a failed write the
        # recorder's cache is dropped too, so the retry reads the store again.
        outbox.probe, outbox.on_failure = recorder.probe, recorder.forget
        self._outbox = outbox

    @property
    def recorder(self) -> RunRecorder:
        if self._recorder is None:
            self._recorder = RunRecorder(tracking_uri=self.tracking_uri, experiment_id=self.experiment_id, parent_run_id=self.parent_run_id,
                                         sweep=self.sweep, static_params=self.static_params, inputs=self.inputs, example=self.example)
        return self._recorder

    def _put(self, run: Callable[[], object], what: str, steps: int = 0) -> None:
        if self._outbox is None:  # a callback used without Tune calling setup() (unit use): write at once
            run()
        else:
            self._outbox.put(run, what, steps)

    @staticmethod
    def _key(trial: Trial) -> tuple[str, dict[str, Any]]:
        # A copy: the write may run after Tune has moved on (or changed the trial).
        return str(trial.trial_id), copy.deepcopy(dict(trial.config))

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        tid, config = self._key(trial)

        def open_runs() -> None:
            self.recorder.open(tid, config)

        self._put(open_runs, f"the runs of trial {trial}")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any) -> None:
        tid, config = self._key(trial)
        report = TrialReport.decode(result)  # only what the record needs: plain values, kept apart from Tune's dict
        if report.diverged:
            self._diverged.add(tid)
            part = report.students[None]
            self._put(lambda: self.recorder.diverged(tid, config, part.epoch, part.diverged_loss), f"the divergence of trial {trial}")
            return
        self._epoch[tid] = report.epoch
        self._put(lambda: self.recorder.result(tid, config, report), f"epoch {report.epoch} of trial {trial}", steps=1)

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: tune.Checkpoint, **info: Any) -> None:
        """A shared trial passing a smaller epochs value: that grid point's run ends here, with its model."""
        tid, config = self._key(trial)
        trial_config = TrialConfig.decode(config)
        # The result of this checkpoint came just before it (Ray calls on_trial_result first): its epoch
        # says whether a smaller milestone ends here, so the checkpoint is only read when one does. It is
        # read now (Ray keeps two checkpoints: by the time the write is shipped this one may be gone).
        epoch = self._epoch.get(tid)
        if epoch not in trial_config.milestones or epoch == trial_config.epochs:
            return
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
        if state is None or state["epoch"] != epoch:
            return
        self._put(lambda: self.recorder.finish(tid, config, state, milestone=epoch), f"the end of epochs {epoch} of trial {trial}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        tid, config = self._key(trial)
        if tid in self._diverged:
            return  # its runs were ended FAILED with the divergence
        state = None
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                state = read_checkpoint(Path(folder))
        stopped = stopped_early(trial)  # ended by the scheduler: FINISHED, with the model of its last checkpoint
        self._put(lambda: self.recorder.finish(tid, config, state, stopped_at=stopped), f"the end of trial {trial}")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        tid, config = self._key(trial)
        failures = int(trial.run_metadata.num_failures)
        self._put(lambda: self.recorder.retried(tid, config, failures), f"a retry of trial {trial}")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        tid, config = self._key(trial)
        message = error_summary(trial)
        self._put(lambda: self.recorder.fail(tid, config, message), f"the error of trial {trial}")


def stopped_early(trial: Trial) -> int | None:
    """The epoch at which the scheduler stopped the trial (see :meth:`TrialPoint.stopped_at`), or None (always for a pack:
    packs serve grids, which have no scheduler)."""
    decoded = TrialConfig.decode(trial.config)
    return None if decoded.packed else decoded.point.stopped_at(trial.last_result or {})


def error_summary(trial: Trial) -> str:
    """The last line of the trial's error (the exception's own message), not the whole traceback.

    Tune writes the error into the driver's staging folder for the trial and copies it to the sweep's storage
    later, while ``Trial.get_error`` reads the storage: so in the driver, just after the error, the staging
    file is the one that exists (read from storage, the tag was "unknown error" now and then). A driver that
    reads an older sweep (``kd-tune sync``) finds no staging file and reads the storage."""
    text = ""
    try:
        local = trial.error_file
        if local is not None and os.path.exists(local):
            with open(local, encoding="utf-8", errors="replace") as f:
                text = f.read()
    except Exception:  # noqa: BLE001 - a summary must never raise: the storage's copy is tried next
        pass
    if not text.strip():
        try:
            text = str(trial.get_error() or "")
        except Exception:  # noqa: BLE001
            pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]
