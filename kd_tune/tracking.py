"""The Tune callback that records every trial in MLflow, from the driver, without ever stalling Tune.

The callback turns each trial event into a write that an :class:`~kd_tune.outbox.Outbox` ships in
order on its own thread; the writes themselves are :class:`RunRecorder`'s, which ``kd-tune sync``
also uses to rebuild a record from the trials' checkpoints.

Only the driver talks to MLflow (workers need no access to the store). Ray's own
``MLflowLoggerCallback`` keeps trial -> run in memory only, so a restored sweep would get a second
run per trial; this one finds a trial's run by its ``kd_tune.trial_id`` tag and skips epochs
already logged, so reattaching never duplicates a run or a step.

A trial shared by several epochs values (epoch sharing) has one child run per value: the runs of
the smaller values end, with their model, when the trial passes them.

Each child run also records its datasets (MLflow dataset inputs, computed once by the driver and
handed over as plain strings) and its final student as an MLflow model (a LoggedModel linked to the
run), each once: a reattached run that has them already gets no second copy.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper

from kd_tune.checkpoint import is_pack_state, read_checkpoint, save_model_file
from kd_tune.config import TrialPoint, is_pack, trial_points
from kd_tune.errors import first_line
from kd_tune.mlflow_runs import (
    TAG_EPOCHS,
    TAG_NODE,
    TAG_NODES,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    DataInput,
    find_run,
    log_dataset_inputs,
    log_metrics,
    log_model_once,
    params_batch,
)
from kd_tune.outbox import Outbox

EPOCH_METRICS = ("train_loss", "train_hard_loss", "train_distill_loss", "test_acc", "test_loss", "teacher_agreement",
                 "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece", "epoch_seconds", "val_acc", "val_loss")
CONFUSION_ARTIFACT = "confusion_matrix.json"
TAG_STOPPED = "kd_tune.stopped_early"  # a search trial stopped by the scheduler (ASHA)
TAG_STOPPED_AT = "kd_tune.stopped_at_epoch"  # the last epoch it trained
TAG_LABEL = "kd_tune.trial"  # the trial's label (a pack trial: the member's), e.g. a0.5-T3-e1+2-s0
RETRY_MAX_ENV = "KD_TUNE_TRACKING_RETRY_MAX_S"  # longest wait between retries while the store is away (default 30 s)
__all__ = ["EPOCH_METRICS", "TAG_PARENT", "TAG_ROLE", "TAG_TRIAL", "MlflowTrackingCallback", "RunRecorder", "outbox_of"]


class RunRecorder:
    """Writes the child runs of a sweep's trials to MLflow, synchronously: what the Tune callback's
    outbox ships, and what ``kd-tune sync`` replays from the trials' checkpoints.

    Every method is idempotent against the store: runs are found by tags, a run's last logged step
    is read back, a finished run is left alone. So a method that failed half-way (a store gone in
    the middle) can simply be called again after :meth:`forget`, and nothing is logged twice.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, static_params: dict[str, Any],
                 inputs: Mapping[float, Sequence[DataInput]], example: np.ndarray | None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.static_params = static_params
        self.inputs = inputs
        self.example = example
        self.client = MlflowClient(tracking_uri)
        self.forget()

    def forget(self) -> None:
        """Drop everything cached from the store (after a failed write: the retry reads it again)."""
        # Keys are "<trial id>:<milestone>": a trial shared by several epochs values has a run for each.
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}  # last epoch logged to the run
        self._nodes: dict[str, list[str]] = {}  # nodes the run's trial ran on
        self._complete: set[str] = set()  # runs that are done (finished now, or before a kill)

    def probe(self) -> None:
        """Raises when the store cannot be reached."""
        self.client.search_experiments(max_results=1)

    @staticmethod
    def _key(tid: str, member: str | None, milestone: int) -> str:
        return f"{tid}:{milestone}" if member is None else f"{tid}:{member}:{milestone}"

    @staticmethod
    def _targets(config: Mapping[str, Any]) -> list[tuple[str | None, TrialPoint]]:
        """(member label, point) of each grid point group the trial trains: a pack's members, or its one point (member None)."""
        if is_pack(config):
            return [(p.label, p) for p in trial_points(config)]
        return [(None, TrialPoint.from_config(config))]

    def run_id(self, tid: str, config: Mapping[str, Any], milestone: int, member: str | None = None) -> str:
        """The child run of one grid point the trial serves: from memory, else found by tag, else created.
        ``member``: the member's label in a pack trial."""
        point = dict(self._targets(config))[member]
        return self._run_id(tid, point, member, milestone)

    def _run_id(self, tid: str, point: TrialPoint, member: str | None, milestone: int) -> str:
        key = self._key(tid, member, milestone)
        if key in self._runs:
            return self._runs[key]
        params = {**self.static_params, **point.at(milestone).grid_config()}
        lookup = {TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_EPOCHS: str(milestone)}
        if member is not None:
            lookup[TAG_LABEL] = point.label  # a pack trial has a run per member and milestone
        run_id = find_run(self.client, self.experiment_id, lookup)
        if run_id is None:
            tags = {TAG_PARENT: self.parent_run_id, TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_ROLE: point.role,
                    TAG_EPOCHS: str(milestone), TAG_LABEL: point.label}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=point.at(milestone).label)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=params_batch(params))
            log_dataset_inputs(self.client, run_id, self.inputs.get(point.label_noise, ()), run)
            self._last_step[key] = 0
        else:
            self._reattach(key, run_id, milestone, params, point.label_noise)
        self._runs[key] = run_id
        return run_id

    def _reattach(self, key: str, run_id: str, milestone: int, params: dict[str, Any], label_noise: float) -> None:
        """A run found again after a restart, a resume or a failed write: reopen it and skip the epochs it already has."""
        history = self.client.get_metric_history(run_id, "test_acc")
        self._last_step[key] = max((m.step for m in history), default=0)
        run = self.client.get_run(run_id)
        self._nodes[key] = [n for n in run.data.tags.get(TAG_NODES, "").split(",") if n]
        # A kill between create_run and logging the params leaves a run without them: complete it.
        missing = {k: v for k, v in params.items() if k not in run.data.params}
        if missing:
            self.client.log_batch(run_id, params=params_batch(missing))
        # Likewise its datasets (those it has already are not logged twice).
        log_dataset_inputs(self.client, run_id, self.inputs.get(label_noise, ()), run)
        if run.info.status == "FINISHED" and (self._last_step[key] >= milestone or run.data.tags.get(TAG_STOPPED) == "true"):
            # Finished before a kill that Ray's state did not see: Ray reruns the trial (a no-op
            # from its final checkpoint); this record is complete and stays untouched.
            self._complete.add(key)
        elif run.info.status == "FAILED" and run.data.tags.get("kd_tune.diverged") == "true":
            self._complete.add(key)  # a diverged trial's record is final too
        elif run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def open(self, tid: str, config: Mapping[str, Any]) -> list[tuple[int, str, str]]:
        """(milestone, key, run id) of the trial's runs that are not done yet (made if missing)."""
        return [(m, key, run_id) for _, m, key, run_id in self._open(tid, config)]

    def _open(self, tid: str, config: Mapping[str, Any], only: str | None = None) -> list[tuple[str | None, int, str, str]]:
        """(member, milestone, key, run id) of the trial's open runs (of member ``only`` when given)."""
        out = []
        for member, point in self._targets(config):
            if only is not None and member != only:
                continue
            for m in point.milestones:
                run_id = self._run_id(tid, point, member, m)
                key = self._key(tid, member, m)
                if key not in self._complete:
                    out.append((member, m, key, run_id))
        return out

    def result(self, tid: str, config: Mapping[str, Any], result: Mapping[str, Any]) -> int:
        """One epoch's metrics, on every open run whose grid point reaches that epoch (once each); how many
        runs got them now. A pack's result carries each member's metrics under ``members`` (a member that
        diverged at this epoch ends its runs FAILED instead)."""
        if "members" not in result:
            return self._log_epoch(tid, config, None, result, result)
        logged = 0
        for label, metrics in result["members"].items():
            if metrics.get("diverged"):
                self.diverged(tid, config, int(metrics["epoch"]), metrics.get("diverged_loss"), member=label)
            else:
                logged += self._log_epoch(tid, config, label, metrics, result)
        return logged

    def _log_epoch(self, tid: str, config: Mapping[str, Any], member: str | None, values: Mapping[str, Any],
                   result: Mapping[str, Any]) -> int:
        epoch = int(values["epoch"])
        metrics = {k: values[k] for k in EPOCH_METRICS if k in values}
        logged = 0
        for _, milestone, key, run_id in self._open(tid, config, member):
            if epoch > milestone:
                continue  # beyond this grid point
            self._tag_node(key, run_id, result)
            if epoch <= self._last_step.get(key, 0):
                continue  # recomputed after a restart and already logged
            log_metrics(self.client, run_id, metrics, step=epoch)
            self._last_step[key] = epoch
            logged += 1
        return logged

    def _tag_node(self, key: str, run_id: str, result: Mapping[str, Any]) -> None:
        """Tag the run with the node and device of the attempt that reported, once per attempt."""
        node = str(result.get("node_id", ""))
        nodes = self._nodes.setdefault(key, [])
        if not node or (nodes and nodes[-1] == node):
            return
        nodes.append(node)
        tags = {TAG_NODE: node, TAG_NODES: ",".join(nodes), "kd_tune.node_ip": str(result.get("node_ip", "")),
                "kd_tune.hostname": str(result.get("hostname", "")), "kd_tune.device": str(result.get("device", ""))}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def diverged(self, tid: str, config: Mapping[str, Any], epoch: int, loss: object, member: str | None = None) -> int:
        """The trial's loss (a pack member's: ``member``) went NaN/inf: its open runs FAILED, tagged (a retry would
        diverge again); how many."""
        message = f"training diverged at epoch {epoch}: loss = {loss}"
        runs = self._open(tid, config, member)
        for _, _, key, run_id in runs:
            self.client.log_batch(run_id, tags=[RunTag("kd_tune.diverged", "true"), RunTag("kd_tune.error", message)])
            self.client.set_terminated(run_id, status="FAILED")
            self._complete.add(key)
        return len(runs)

    def finish(self, tid: str, config: Mapping[str, Any], state: Mapping[str, Any] | None, milestone: int | None = None,
               stopped_at: int | None = None) -> int:
        """End the trial's open runs (only the one of ``milestone`` when given) as FINISHED, each with its
        model when ``state`` is the checkpoint of its epoch (a smaller milestone replayed after a kill
        without its checkpoint gets none); how many runs ended now.

        ``stopped_at``: the epoch at which the scheduler stopped a search trial: its runs are tagged so and
        get the model of ``state``, its last checkpoint."""
        ended = 0
        for member, m, key, run_id in self._open(tid, config):
            if milestone is None or m == milestone:
                own = state
                if member is not None:  # a pack's checkpoint: the member's entry is its own student checkpoint
                    own = state["members"].get(member) if is_pack_state(state) else None
                    if own is not None and own.get("diverged"):
                        d = own["diverged"]  # its divergence never reached the store: record it now
                        ended += self.diverged(tid, config, int(d["epoch"]), d["loss"], member=member)
                        continue
                if stopped_at is not None:
                    self.client.log_batch(run_id, tags=[RunTag(TAG_STOPPED, "true"), RunTag(TAG_STOPPED_AT, str(stopped_at))])
                fits = own is not None and (own["epoch"] == m or stopped_at is not None)
                self._finish(key, run_id, own if fits else None)
                ended += 1
        return ended

    def _finish(self, key: str, run_id: str, state: Mapping[str, Any] | None) -> None:
        if state is not None:
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / "student.pt"  # a stable name; weights and model_args, no optimizer state
                # (checkpoints written before model_args existed give a file without them)
                save_model_file(model, state.get("model_args"), state["model"])
                self.client.log_artifact(run_id, str(model), artifact_path="model")
                if "confusion" in state:
                    cm = Path(tmp) / CONFUSION_ARTIFACT
                    cm.write_text(json.dumps({"rows": "true class", "columns": "predicted class", "matrix": state["confusion"]}))
                    self.client.log_artifact(run_id, str(cm))
            self.log_model(run_id, state)
        self.client.set_terminated(run_id, status="FINISHED")
        self._complete.add(key)

    def log_model(self, run_id: str, state: Mapping[str, Any]) -> str | None:
        """The run's final student as its MLflow model (once: a reattached run keeps the one it has).

        Returns the model's id, or None when there is nothing to log it from (no example input, a
        checkpoint without model_args) or the model cannot be exported: then the run says why in
        ``kd_tune.model_error`` and the sweep goes on, its ``student.pt`` logged. A store that cannot be
        reached raises (the outbox retries the whole write once it is back).
        """
        if self.example is None or not state.get("model_args"):
            return None
        try:
            return log_model_once(self.client, run_id, state, self.example, "student", step=int(state["epoch"]))
        except Exception as e:  # noqa: BLE001 - any failure is reported on the run, never fatal to the sweep
            self.probe()  # an unreachable store is not the model's fault: raise, to be retried
            self.client.set_tag(run_id, "kd_tune.model_error", first_line(e)[:500])
            return None

    def fail(self, tid: str, config: Mapping[str, Any], message: str) -> int:
        """The trial errored for good: its open runs FAILED, with the error's last line; how many."""
        runs = self.open(tid, config)
        for _, key, run_id in runs:
            self.client.set_tag(run_id, "kd_tune.error", message)
            self.client.set_terminated(run_id, status="FAILED")
            self._complete.add(key)
        return len(runs)

    def retried(self, tid: str, config: Mapping[str, Any], failures: int) -> None:
        for _, _, run_id in self.open(tid, config):
            self.client.set_tag(run_id, "kd_tune.retries", str(failures))


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
    without ever making Tune wait: each event becomes a write put in an :class:`~kd_tune.outbox.Outbox`
    that one thread ships to the store in order, retrying while the store is away.

    Ray pickles the callback with the experiment and calls :meth:`setup` both when a sweep starts and
    when ``Tuner.restore`` continues it: the recorder and the outbox are built there, so a restored
    callback starts from the store, not from stale memory.

    ``inputs`` maps each label-noise level to its runs' datasets; ``example`` is a model input (a
    couple of preprocessed images) for the logged models' signature. Both are small, plain data: they
    are pickled with the callback. A callback pickled before they existed reads the class defaults
    (no datasets, no MLflow model) when a sweep that old is resumed.
    """

    inputs: Mapping[float, Sequence[DataInput]] = MappingProxyType({})
    example: np.ndarray | None = None

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, static_params: dict[str, Any],
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
        epoch = int(result["epoch"])
        if result.get("diverged"):
            self._diverged.add(tid)
            loss = result.get("diverged_loss")
            self._put(lambda: self.recorder.diverged(tid, config, epoch, loss), f"the divergence of trial {trial}")
            return
        self._epoch[tid] = epoch
        kept = {k: result[k] for k in (*EPOCH_METRICS, "epoch", "node_id", "node_ip", "hostname", "device") if k in result}
        if "members" in result:  # a pack: each member's metrics (or its divergence)
            kept["members"] = {label: {k: m[k] for k in (*EPOCH_METRICS, "epoch", "diverged", "diverged_loss") if k in m}
                               for label, m in result["members"].items()}
        self._put(lambda: self.recorder.result(tid, config, kept), f"epoch {epoch} of trial {trial}", steps=1)

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: tune.Checkpoint, **info: Any) -> None:
        """A shared trial passing a smaller epochs value: that grid point's run ends here, with its model."""
        tid, config = self._key(trial)
        points = trial_points(config)
        milestones = {m for p in points for m in p.milestones}
        # The result of this checkpoint came just before it (Ray calls on_trial_result first): its epoch
        # says whether a smaller milestone ends here, so the checkpoint is only read when one does. It is
        # read now (Ray keeps two checkpoints: by the time the write is shipped this one may be gone).
        epoch = self._epoch.get(tid)
        if epoch not in milestones or epoch == max(p.epochs for p in points):
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
    if is_pack(trial.config):
        return None
    return TrialPoint.from_config(trial.config).stopped_at(trial.last_result or {})


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
