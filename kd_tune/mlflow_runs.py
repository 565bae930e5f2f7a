"""A sweep's records in MLflow: its experiment, parent run and teacher runs, the tags that find
runs again, and small batched writes.

Only the driver talks to MLflow. Runs are found by tags (never by memory alone), so a driver that
restarts reattaches to the runs it made instead of making new ones. The per-trial child runs are
written by the Tune callback in :mod:`kd_tune.tracking`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from kd_tune.checkpoint import save_model_file
from kd_tune.config import SweepSpec

if TYPE_CHECKING:
    from kd_tune.data import DataSplit
    from kd_tune.teacher import Teacher

TAG_SWEEP = "kd_tune.sweep"
TAG_ROLE = "kd_tune.role"
TAG_TRIAL = "kd_tune.trial_id"
TAG_EPOCHS = "kd_tune.epochs"  # the grid point's epochs (a shared trial has a run per epochs value)
TAG_NODE = "kd_tune.node_id"  # the Ray node of the trial's latest attempt
TAG_NODES = "kd_tune.nodes"  # every node the trial ran on, in order (a retry after a node died adds one)
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(uri: str | None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else MLflow's default store."""
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    return str(mlflow.get_tracking_uri())


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


def create_parent_run(client: MlflowClient, experiment_id: str, name: str, path: str) -> str:
    """The sweep's parent run (its params come from :func:`complete_parent_run`)."""
    run = client.create_run(experiment_id, run_name=name, tags={TAG_SWEEP: name, TAG_ROLE: "sweep", "kd_tune.path": path})
    return str(run.info.run_id)


def complete_parent_run(client: MlflowClient, run_id: str, spec: SweepSpec, space_yaml: str, space_file: str) -> None:
    """Params and the validated space on the parent run, unless a previous driver wrote them already
    (a kill between creating the run and writing them leaves a parent without them)."""
    if client.get_run(run_id).data.params:
        return
    client.log_batch(run_id, params=params_batch(spec.flat_params()))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / space_file).write_text(space_yaml)
        client.log_artifact(run_id, str(Path(tmp) / space_file))


def log_teacher_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, spec: SweepSpec, teachers: list[Teacher],
                     split: DataSplit) -> None:
    """Each teacher's own run under the sweep's parent (once per sweep, also when it came from the cache)."""
    noise = spec.dataset.label_noise
    for i, (member, teacher) in enumerate(zip(spec.teacher.members(), teachers, strict=True)):
        tags = {TAG_SWEEP: spec.name, TAG_ROLE: "teacher", "kd_tune.member": str(i), "kd_tune.label_noise": f"{noise:g}"}
        found = find_run(client, experiment_id, tags)
        if found is not None:
            if client.get_run(found).info.status == "FINISHED":
                continue
            client.delete_run(found)  # cut short by a kill while being written: write it again, whole
        name = "teacher" if len(teachers) == 1 else f"teacher-{i}"
        run = client.create_run(experiment_id, run_name=name + (f"-n{noise:g}" if noise else ""),
                                tags={**tags, TAG_PARENT: parent_run_id, "kd_tune.teacher_key": teacher.key, "kd_tune.cached": str(teacher.cached).lower()})
        run_id = run.info.run_id
        params = {f"teacher.{k}": v for k, v in asdict(member).items()} | {f"dataset.{k}": v for k, v in asdict(spec.dataset).items()}
        client.log_batch(run_id, params=params_batch(params))
        for m in teacher.history:
            log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "teacher.pt"
            model_args = {"widths": list(member.widths), "in_shape": list(split.info.shape), "num_classes": split.info.num_classes}
            save_model_file(path, model_args, teacher.state_dict)
            client.log_artifact(run_id, str(path), artifact_path="model")
        client.set_terminated(run_id, "FINISHED")


def close_running_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark the sweep's child runs still RUNNING (their trials were cut short) as ``status``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
                              max_results=10000)
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)
