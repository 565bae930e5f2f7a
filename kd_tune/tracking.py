"""MLflow tracking from the driver: an experiment per sweep, a parent run, a child run per trial.

Only the driver talks to MLflow (workers need no access to the store), through a Ray Tune
callback. Ray's own ``MLflowLoggerCallback`` keeps trial -> run in memory only, so a restored
sweep would get a second run per trial; this one finds a trial's run by its ``kd_tune.trial_id``
tag and skips epochs already logged, so reattaching never duplicates a run or a step.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from kd_tune.config import TrialPoint

TAG_SWEEP = "kd_tune.sweep"
TAG_ROLE = "kd_tune.role"
TAG_TRIAL = "kd_tune.trial_id"
TAG_EPOCHS = "kd_tune.epochs"  # the grid point's epochs (a shared trial has a run per epochs value)
TAG_NODE = "kd_tune.node_id"  # the Ray node of the trial's latest attempt
TAG_NODES = "kd_tune.nodes"  # every node the trial ran on, in order (a retry after a node died adds one)
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
EPOCH_METRICS = ("train_loss", "train_hard_loss", "train_distill_loss", "test_acc", "test_loss", "teacher_agreement",
                 "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece", "epoch_seconds")
CONFUSION_ARTIFACT = "confusion_matrix.json"
MAX_PARAM_LEN = 6000


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    return str(client.create_experiment(name))


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The run carrying all these tags, if there is one (the oldest, should there be several)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def params_batch(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


class MlflowTrackingCallback(tune.Callback):
    """Logs every trial to MLflow from the driver (params, per-epoch metrics, final model, status)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, static_params: dict[str, Any]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.static_params = static_params
        self._client: MlflowClient | None = None
        # Keys are "<trial id>:<milestone>": a trial shared by several epochs values has a run for each.
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}  # last epoch logged to the run
        self._nodes: dict[str, list[str]] = {}  # nodes the run's trial ran on
        self._epoch: dict[str, int] = {}  # trial id -> epoch of its latest result
        self._complete: set[str] = set()  # runs that are done (finished now, or before a kill)
        self._diverged: set[str] = set()  # trial ids

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles the run config with the experiment; a live client and caches do not belong there.
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _last_step={}, _nodes={}, _epoch={}, _complete=set(), _diverged=set())
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial: Any, milestone: int) -> str:
        """The child run of one grid point the trial serves: from memory, else found by tag, else created."""
        tid = str(trial.trial_id)
        key = f"{tid}:{milestone}"
        if key in self._runs:
            return self._runs[key]
        point = TrialPoint.from_config(trial.config)
        run_id = find_run(self.client, self.experiment_id, {TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_EPOCHS: str(milestone)})
        if run_id is None:
            grid_point = point.at(milestone)
            tags = {TAG_PARENT: self.parent_run_id, TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_ROLE: point.role,
                    TAG_EPOCHS: str(milestone), "kd_tune.trial": point.label}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=grid_point.label)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=params_batch({**self.static_params, **grid_point.grid_config()}))
            self._last_step[key] = 0
        else:
            # Reattached after a restart or a resume: reopen it and skip the epochs it already has.
            history = self.client.get_metric_history(run_id, "test_acc")
            self._last_step[key] = max((m.step for m in history), default=0)
            run = self.client.get_run(run_id)
            self._nodes[key] = [n for n in run.data.tags.get(TAG_NODES, "").split(",") if n]
            # A kill between create_run and logging the params leaves a run without them: complete it.
            params = {**self.static_params, **point.at(milestone).grid_config()}
            missing = {k: v for k, v in params.items() if k not in run.data.params}
            if missing:
                self.client.log_batch(run_id, params=params_batch(missing))
            status = run.info.status
            if status == "FINISHED" and self._last_step[key] >= milestone:
                # Finished before a kill that Ray's state did not see: Ray reruns the trial (a no-op
                # from its final checkpoint); this record is complete and stays untouched.
                self._complete.add(key)
            elif status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        self._runs[key] = run_id
        return run_id

    def _open(self, trial: Any) -> list[tuple[int, str, str]]:
        """(milestone, key, run id) of the trial's runs that are not done yet."""
        tid = str(trial.trial_id)
        out = []
        for m in TrialPoint.from_config(trial.config).milestones:
            run_id = self.run_id(trial, m)
            if f"{tid}:{m}" not in self._complete:
                out.append((m, f"{tid}:{m}", run_id))
        return out

    def _finish(self, key: str, run_id: str, state: dict[str, Any] | None) -> None:
        if state is not None:
            with tempfile.TemporaryDirectory() as tmp:
                # The logged model is the weights alone (no optimizer state), under a stable name.
                model = Path(tmp) / "student.pt"
                torch.save(state["model"], model)
                self.client.log_artifact(run_id, str(model), artifact_path="model")
                if "confusion" in state:
                    cm = Path(tmp) / CONFUSION_ARTIFACT
                    cm.write_text(json.dumps({"rows": "true class", "columns": "predicted class", "matrix": state["confusion"]}))
                    self.client.log_artifact(run_id, str(cm))
        self.client.set_terminated(run_id, status="FINISHED")
        self._complete.add(key)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        epoch = int(result["epoch"])
        if result.get("diverged"):
            self._diverged.add(str(trial.trial_id))
            message = f"training diverged at epoch {epoch}: loss = {result.get('diverged_loss')}"
            for _, _, run_id in self._open(trial):
                self.client.log_batch(run_id, tags=[RunTag("kd_tune.diverged", "true"), RunTag("kd_tune.error", message)])
            return
        self._epoch[str(trial.trial_id)] = epoch
        metrics = {k: result[k] for k in EPOCH_METRICS if k in result}
        for milestone, key, run_id in self._open(trial):
            if epoch > milestone:
                continue  # beyond this grid point
            self._tag_node(key, run_id, result)
            if epoch <= self._last_step.get(key, 0):
                continue  # recomputed after a restart and already logged
            log_metrics(self.client, run_id, metrics, step=epoch)
            self._last_step[key] = epoch

    def _tag_node(self, key: str, run_id: str, result: dict[str, Any]) -> None:
        """Tag the run with the node and device of the attempt that reported, once per attempt."""
        node = str(result.get("node_id", ""))
        nodes = self._nodes.setdefault(key, [])
        if not node or (nodes and nodes[-1] == node):
            return
        nodes.append(node)
        tags = {TAG_NODE: node, TAG_NODES: ",".join(nodes), "kd_tune.node_ip": str(result.get("node_ip", "")),
                "kd_tune.hostname": str(result.get("hostname", "")), "kd_tune.device": str(result.get("device", ""))}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        """A shared trial passing a smaller epochs value: that grid point's run ends here, with its model."""
        point = TrialPoint.from_config(trial.config)
        # The result of this checkpoint came just before it (Ray calls on_trial_result first): its epoch
        # says whether a smaller milestone ends here, so the checkpoint is only fetched when one does.
        epoch = self._epoch.get(str(trial.trial_id))
        if epoch not in point.milestones or epoch == point.epochs:
            return
        from kd_tune.trainable import read_checkpoint

        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
        if state is None or state["epoch"] != epoch:
            return
        for milestone, key, run_id in self._open(trial):
            if milestone == epoch:
                self._finish(key, run_id, state)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if str(trial.trial_id) in self._diverged:
            for _, _, run_id in self._open(trial):
                self.client.set_terminated(run_id, status="FAILED")
            return
        state = None
        if trial.checkpoint is not None:
            from kd_tune.trainable import read_checkpoint

            with trial.checkpoint.as_directory() as folder:
                state = read_checkpoint(Path(folder))
        for milestone, key, run_id in self._open(trial):
            # A smaller milestone still open here was replayed without its checkpoint after a kill.
            self._finish(key, run_id, state if state is not None and state["epoch"] == milestone else None)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        for _, _, run_id in self._open(trial):
            self.client.set_tag(run_id, "kd_tune.retries", str(trial.run_metadata.num_failures))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        message = error_summary(trial)
        for _, _, run_id in self._open(trial):
            self.client.set_tag(run_id, "kd_tune.error", message)
            self.client.set_terminated(run_id, status="FAILED")


def close_running_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark the sweep's child runs still RUNNING (their trials were cut short) as ``status``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
                              max_results=10000)
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)


def error_summary(trial: Any) -> str:
    """The last line of the trial's error (the exception's own message), not the whole traceback."""
    text = ""
    try:
        text = str(trial.get_error() or "")
    except Exception:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]
