"""The child runs of a sweep's trials, written to MLflow synchronously and idempotently.

:class:`RunRecorder` is what the sweep's Tune callback ships through its outbox (:mod:`kd_tune.sweep.callback`) and
what ``kd-tune sync`` replays from the trials' checkpoints. A trial shared by several epochs values (epoch sharing)
has one child run per value; a pack trial one per member and value. Each run records its params, per-epoch metrics
(step = epoch), datasets, final model and status, each once.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from kd_tune.distill.checkpoint import is_pack_state, save_model_file
from kd_tune.errors import first_line
from kd_tune.space.lineage import Lineage
from kd_tune.space.trial_report import StudentEpoch, TrialReport
from kd_tune.space.trials import TrialConfig, TrialPoint
from kd_tune.tracking.datasets import DataInput, log_dataset_inputs
from kd_tune.tracking.logged_models import log_model_once
from kd_tune.tracking.runs import find_run, log_metrics, params_batch
from kd_tune.tracking.tags import (
    CONFUSION_ARTIFACT,
    EPOCH_METRICS,
    SCHEDULE_ARTIFACT,
    TAG_DEVICE,
    TAG_DIVERGED,
    TAG_EPOCHS,
    TAG_ERROR,
    TAG_HOSTNAME,
    TAG_LABEL,
    TAG_LINEAGE,
    TAG_MODEL_ERROR,
    TAG_NODE,
    TAG_NODE_IP,
    TAG_NODES,
    TAG_PARENT,
    TAG_RETRIES,
    TAG_ROLE,
    TAG_STOPPED,
    TAG_STOPPED_AT,
    TAG_SWEEP,
    TAG_TRIAL,
    exploit_tag,
)


class RunRecorder:
    """Writes the child runs of a sweep's trials to MLflow, synchronously: what the Tune callback's
    outbox ships, and what ``kd-tune sync`` replays from the trials' checkpoints.

    Every method is idempotent against the store: runs are found by tags, a run's last logged step
    is read back, a finished run is left alone. So a method that failed half-way (a store gone in
    the middle) can simply be called again after :meth:`forget`, and nothing is logged twice.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, static_params: Mapping[tuple[str, str], dict[str, Any]],
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

    def run_id(self, tid: str, config: Mapping[str, Any], milestone: int, member: str | None = None) -> str:
        """The child run of one grid point the trial serves: from memory, else found by tag, else created.
        ``member``: the member's label in a pack trial."""
        point = dict(TrialConfig.decode(config).members())[member]
        return self._run_id(tid, point, member, milestone)

    def _run_id(self, tid: str, point: TrialPoint, member: str | None, milestone: int) -> str:
        key = self._key(tid, member, milestone)
        if key in self._runs:
            return self._runs[key]
        params = {**self.static_params[point.student, point.teacher], **point.at(milestone).grid_config()}
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
        elif run.info.status == "FAILED" and run.data.tags.get(TAG_DIVERGED) == "true":
            self._complete.add(key)  # a diverged trial's record is final too
        elif run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def open(self, tid: str, config: Mapping[str, Any]) -> list[tuple[int, str, str]]:
        """(milestone, key, run id) of the trial's runs that are not done yet (made if missing)."""
        return [(m, key, run_id) for _, m, key, run_id in self._open(tid, config)]

    def _open(self, tid: str, config: Mapping[str, Any], only: str | None = None) -> list[tuple[str | None, int, str, str]]:
        """(member, milestone, key, run id) of the trial's open runs (of member ``only`` when given)."""
        out = []
        for member, point in TrialConfig.decode(config).members():
            if only is not None and member != only:
                continue
            for m in point.milestones:
                run_id = self._run_id(tid, point, member, m)
                key = self._key(tid, member, m)
                if key not in self._complete:
                    out.append((member, m, key, run_id))
        return out

    def result(self, tid: str, config: Mapping[str, Any], report: TrialReport) -> int:
        """One epoch's metrics, on every open run whose grid point reaches that epoch (once each); how many
        runs got them now. A pack's report carries each member's part (a member that diverged at this epoch ends
        its runs FAILED instead)."""
        logged = 0
        for label, part in report.students.items():
            if part.diverged:
                self.diverged(tid, config, part.epoch, part.diverged_loss, member=label)
            else:
                logged += self._log_epoch(tid, config, label, part, report.where)
        return logged

    def _log_epoch(self, tid: str, config: Mapping[str, Any], member: str | None, part: StudentEpoch,
                   where: Mapping[str, Any]) -> int:
        epoch = part.epoch
        metrics = {k: part.metrics[k] for k in EPOCH_METRICS if k in part.metrics}
        logged = 0
        for _, milestone, key, run_id in self._open(tid, config, member):
            if epoch > milestone:
                continue  # beyond this grid point
            self._tag_node(key, run_id, where)
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
        tags = {TAG_NODE: node, TAG_NODES: ",".join(nodes), TAG_NODE_IP: str(result.get("node_ip", "")),
                TAG_HOSTNAME: str(result.get("hostname", "")), TAG_DEVICE: str(result.get("device", ""))}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def diverged(self, tid: str, config: Mapping[str, Any], epoch: int, loss: object, member: str | None = None) -> int:
        """The trial's loss (a pack member's: ``member``) went NaN/inf: its open runs FAILED, tagged (a retry would
        diverge again); how many."""
        message = f"training diverged at epoch {epoch}: loss = {loss}"
        runs = self._open(tid, config, member)
        for _, _, key, run_id in runs:
            self.client.log_batch(run_id, tags=[RunTag(TAG_DIVERGED, "true"), RunTag(TAG_ERROR, message)])
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
                save_model_file(model, state.get("model_args"), state["model"])
                self.client.log_artifact(run_id, str(model), artifact_path="model")
                if "confusion" in state:
                    cm = Path(tmp) / CONFUSION_ARTIFACT
                    cm.write_text(json.dumps({"rows": "true class", "columns": "predicted class", "matrix": state["confusion"]}))
                    self.client.log_artifact(run_id, str(cm))
                lineage = Lineage.from_config(state.get("lineage"))
                if lineage.epochs:  # alpha or T changed during training (a schedule, PBT): what trained these weights
                    schedule = Path(tmp) / SCHEDULE_ARTIFACT
                    schedule.write_text(json.dumps({"label": state.get("label"), **lineage.as_config()}, indent=1))
                    self.client.log_artifact(run_id, str(schedule))
                    tags = {exploit_tag(x.epoch): x.text() for x in lineage.exploits}
                    if lineage.exploits:
                        tags[TAG_LINEAGE] = "; ".join(x.text() for x in lineage.exploits)[:5000]
                    if tags:
                        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
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
            self.client.set_tag(run_id, TAG_MODEL_ERROR, first_line(e)[:500])
            return None

    def fail(self, tid: str, config: Mapping[str, Any], message: str) -> int:
        """The trial errored for good: its open runs FAILED, with the error's last line; how many."""
        runs = self.open(tid, config)
        for _, key, run_id in runs:
            self.client.set_tag(run_id, TAG_ERROR, message)
            self.client.set_terminated(run_id, status="FAILED")
            self._complete.add(key)
        return len(runs)

    def retried(self, tid: str, config: Mapping[str, Any], failures: int) -> None:
        for _, _, run_id in self.open(tid, config):
            self.client.set_tag(run_id, TAG_RETRIES, str(failures))
