"""The Tune callback that records every trial in MLflow, from the driver.

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

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper

from kd_tune.checkpoint import read_checkpoint, save_model_file
from kd_tune.config import TrialPoint
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

EPOCH_METRICS = ("train_loss", "train_hard_loss", "train_distill_loss", "test_acc", "test_loss", "teacher_agreement",
                 "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece", "epoch_seconds", "val_acc", "val_loss")
CONFUSION_ARTIFACT = "confusion_matrix.json"
TAG_STOPPED = "kd_tune.stopped_early"  # a search trial stopped by the scheduler (ASHA)
TAG_STOPPED_AT = "kd_tune.stopped_at_epoch"  # the last epoch it trained
__all__ = ["EPOCH_METRICS", "TAG_PARENT", "TAG_ROLE", "TAG_TRIAL", "MlflowTrackingCallback"]


class MlflowTrackingCallback(tune.Callback):
    """Logs every trial to MLflow from the driver (params, per-epoch metrics, final model, status).

    Ray pickles the callback with the experiment and calls :meth:`setup` both when a sweep starts and
    when ``Tuner.restore`` continues it: the client and every cache are built there, so a restored
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
        self._reset()

    def _reset(self) -> None:
        self._client: MlflowClient | None = None
        # Keys are "<trial id>:<milestone>": a trial shared by several epochs values has a run for each.
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}  # last epoch logged to the run
        self._nodes: dict[str, list[str]] = {}  # nodes the run's trial ran on
        self._epoch: dict[str, int] = {}  # trial id -> epoch of its latest result
        self._complete: set[str] = set()  # runs that are done (finished now, or before a kill)
        self._diverged: set[str] = set()  # trial ids

    def setup(self, stop: Stopper | None = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any) -> None:
        self._reset()
        self._client = MlflowClient(self.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # a callback used without Tune calling setup() (unit use)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial: Trial, milestone: int) -> str:
        """The child run of one grid point the trial serves: from memory, else found by tag, else created."""
        tid = str(trial.trial_id)
        key = f"{tid}:{milestone}"
        if key in self._runs:
            return self._runs[key]
        point = TrialPoint.from_config(trial.config)
        params = {**self.static_params, **point.at(milestone).grid_config()}
        run_id = find_run(self.client, self.experiment_id, {TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_EPOCHS: str(milestone)})
        if run_id is None:
            tags = {TAG_PARENT: self.parent_run_id, TAG_SWEEP: self.sweep, TAG_TRIAL: tid, TAG_ROLE: point.role,
                    TAG_EPOCHS: str(milestone), "kd_tune.trial": point.label}
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
        """A run found again after a restart or a resume: reopen it and skip the epochs it already has."""
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
        elif run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _open(self, trial: Trial) -> list[tuple[int, str, str]]:
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

    def log_model(self, run_id: str, state: dict[str, Any]) -> str | None:
        """The run's final student as its MLflow model (once: a reattached run keeps the one it has).

        Returns the model's id, or None when there is nothing to log it from (no example input, a
        checkpoint without model_args) or logging failed: then the run says why in ``kd_tune.model_error``
        and the sweep goes on (an exception here would stop every trial), its ``student.pt`` logged.
        """
        if self.example is None or not state.get("model_args"):
            return None
        try:
            return log_model_once(self.client, run_id, state, self.example, "student", step=int(state["epoch"]))
        except Exception as e:  # noqa: BLE001 - any failure is reported on the run, never fatal to the sweep
            self.client.set_tag(run_id, "kd_tune.model_error", first_line(e)[:500])
            return None

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any) -> None:
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

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: tune.Checkpoint, **info: Any) -> None:
        """A shared trial passing a smaller epochs value: that grid point's run ends here, with its model."""
        point = TrialPoint.from_config(trial.config)
        # The result of this checkpoint came just before it (Ray calls on_trial_result first): its epoch
        # says whether a smaller milestone ends here, so the checkpoint is only fetched when one does.
        epoch = self._epoch.get(str(trial.trial_id))
        if epoch not in point.milestones or epoch == point.epochs:
            return
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
        if state is None or state["epoch"] != epoch:
            return
        for milestone, key, run_id in self._open(trial):
            if milestone == epoch:
                self._finish(key, run_id, state)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if str(trial.trial_id) in self._diverged:
            for _, _, run_id in self._open(trial):
                self.client.set_terminated(run_id, status="FAILED")
            return
        state = None
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                state = read_checkpoint(Path(folder))
        stopped = stopped_early(trial)
        for milestone, key, run_id in self._open(trial):
            if stopped is not None:  # ended by the scheduler: FINISHED, its model from its last checkpoint
                self.client.log_batch(run_id, tags=[RunTag(TAG_STOPPED, "true"), RunTag(TAG_STOPPED_AT, str(stopped))])
            # A smaller milestone still open here was replayed without its checkpoint after a kill.
            self._finish(key, run_id, state if state is not None and (state["epoch"] == milestone or stopped is not None) else None)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        for _, _, run_id in self._open(trial):
            self.client.set_tag(run_id, "kd_tune.retries", str(trial.run_metadata.num_failures))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        message = error_summary(trial)
        for _, _, run_id in self._open(trial):
            self.client.set_tag(run_id, "kd_tune.error", message)
            self.client.set_terminated(run_id, status="FAILED")


def stopped_early(trial: Trial) -> int | None:
    """The epoch at which the scheduler stopped the trial (see :meth:`TrialPoint.stopped_at`), or None."""
    return TrialPoint.from_config(trial.config).stopped_at(trial.last_result or {})


def error_summary(trial: Trial) -> str:
    """The last line of the trial's error (the exception's own message), not the whole traceback."""
    text = ""
    try:
        text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - a summary must never raise
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]
