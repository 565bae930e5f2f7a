"""A sweep's MLflow record completed from its storage, without training anything.

Every epoch a trial reports is first written into its checkpoint (with the whole history so far),
and a finished grid point's model is its checkpoint of that epoch. So whatever a driver never got to
MLflow (it was killed while the store was away, or it ended with writes still held back) can be
written afterwards from storage: by ``kd-tune sync NAME``, and by ``kd-tune resume`` before it restores
the trials. The writes are :class:`~kd_tune.tracking.recorder.RunRecorder`'s, which skip what the store has:
syncing twice, or a sync after a complete sweep, writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kd_tune.distill.checkpoint import trial_results
from kd_tune.space.parse import load_space_text
from kd_tune.space.schema import SweepSpec
from kd_tune.space.trial_report import TrialReport
from kd_tune.space.trials import TrialConfig
from kd_tune.sweep.callback import error_summary
from kd_tune.sweep.checks import run_params
from kd_tune.sweep.names import trial_dirname
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.sweep_files import (
    SPACE_FILE,
    SweepRecord,
    claim_driver,
    load_tracking_inputs,
    refuse_second_driver,
    release_driver,
    resume_command,
)
from kd_tune.sweep.state.trial_state import persisted_states
from kd_tune.sweep.state.tune_state import require_sweep
from kd_tune.tracking.recorder import RunRecorder
from kd_tune.tracking.runs import close_running_runs
from kd_tune.tracking.store import open_store
from kd_tune.tracking.store_checks import check_tracking_store

Log = Callable[[str], None]


@dataclass(frozen=True)
class Replayed:
    trials: int
    """Trials that had anything in storage."""
    steps: int
    """Metric steps (epoch x run) written now."""
    ended: int
    """Runs ended now (FINISHED, or FAILED for an errored or diverged trial)."""


def recorder_for(storage: Storage, record: SweepRecord, spec: SweepSpec) -> RunRecorder:
    inputs, example = load_tracking_inputs(storage, record.name)
    return RunRecorder(tracking_uri=record.tracking_uri, experiment_id=record.experiment_id, parent_run_id=record.parent_run_id,
                       sweep=record.name, static_params=run_params(spec), inputs=inputs, example=example)


def replay(recorder: RunRecorder, storage: Storage, name: str, trials: Iterable[Any]) -> Replayed:
    """Write what the trials' checkpoints hold and the store lacks: every epoch's metrics, and the end of
    each trial that Ray's state says has ended (FINISHED with its model, or FAILED with its error).

    ``trials`` are Ray's (``ExperimentAnalysis(...).trials``). A trial still running or pending in that
    state only gets its epochs: a resume continues it and ends its runs.
    """
    touched = steps = ended = 0
    for t in trials:
        tid, config = str(t.trial_id), dict(t.config)
        decoded = TrialConfig.decode(config)
        states = persisted_states(storage, f"{name}/{trial_dirname(t)}")
        last = t.last_result or {}
        if not states and t.status == "PENDING":
            continue  # never started: nothing to record yet
        touched += 1
        newest = states[max(states)] if states else None
        # A pack's checkpoint holds its members' histories (and divergences): the results it reported, rebuilt.
        history = trial_results(newest)
        for m in history:
            steps += recorder.result(tid, config, m)
        stopped = None if decoded.packed else decoded.point.stopped_at(last)
        report = TrialReport.decode(last)
        if report.diverged:
            ended += recorder.diverged(tid, config, report.epoch, report.students[None].diverged_loss)
        elif t.status == "TERMINATED" and stopped is not None:  # a search trial the scheduler stopped
            ended += recorder.finish(tid, config, newest, stopped_at=stopped)
        elif t.status == "TERMINATED":
            for milestone in sorted(decoded.milestones):  # each grid point with the model of its own epoch, where kept
                ended += recorder.finish(tid, config, states.get(milestone), milestone=milestone)
        elif t.status == "ERROR":
            ended += recorder.fail(tid, config, error_summary(t))
    return Replayed(touched, steps, ended)


@dataclass(frozen=True)
class SyncOutcome:
    name: str
    tracking_uri: str
    replayed: Replayed
    finished: int
    total: int
    resume_command: str

    def lines(self) -> list[str]:
        r = self.replayed
        out = [f"sweep {self.name!r}: {r.steps} epochs of metrics and {r.ended} run ends written to {self.tracking_uri} "
               f"from the checkpoints of {r.trials} trials" + (" (the record was complete already)" if not r.steps and not r.ended else "")]
        if self.finished < self.total:
            out.append(f"{self.finished} of {self.total} trials finished; to train the rest: {self.resume_command}")
        return out


def sync_sweep(name: str, root: Storage, log: Log = print) -> SyncOutcome:
    """Complete sweep NAME's MLflow record from its storage (nothing is trained).

    Raises :class:`~kd_tune.errors.UsageError` when there is no such sweep or a driver runs it now (that
    driver records its own runs), :class:`~kd_tune.errors.TrackingUnavailableError` when the store
    cannot be reached.
    """
    from ray import tune

    path = require_sweep(root, name, " (start one with kd-tune sweep)")
    refuse_second_driver(root, name)
    record = SweepRecord.load(root, name)
    spec = load_space_text(root.read_text(name, SPACE_FILE), root.show(name, SPACE_FILE))
    check_tracking_store(record.tracking_uri, "nothing was written (kd-tune sync writes it once the store is back)")
    client = open_store(record.tracking_uri)
    trials = tune.ExperimentAnalysis(path, storage_filesystem=root.ray_filesystem).trials
    claim_driver(root, name)  # no resume may start meanwhile
    try:
        replayed = replay(recorder_for(root, record, spec), root, name, trials)
        finished = sum(1 for t in trials if t.status == "TERMINATED")
        planned = max(len(trials), len(spec.packs()) + spec.search.num_samples)  # a search suggests its trials as it goes
        # Runs left RUNNING belong to trials cut short: KILLED, as a driver ending on Ctrl+C leaves them (a resume reopens them).
        close_running_runs(client, record.experiment_id, record.parent_run_id)
        if finished == planned:
            from kd_tune.report.summary import summarize_on_parent

            summarize_on_parent(name, record.tracking_uri, log)
            errored = any(t.status == "ERROR" or TrialReport.decode(t.last_result or {}).diverged for t in trials)
            client.set_terminated(record.parent_run_id, "FAILED" if errored else "FINISHED")
        elif client.get_run(record.parent_run_id).info.status == "RUNNING":
            client.set_terminated(record.parent_run_id, "KILLED")
    finally:
        release_driver(root, name)
    return SyncOutcome(name, record.tracking_uri, replayed, finished, planned, resume_command(name, root))
