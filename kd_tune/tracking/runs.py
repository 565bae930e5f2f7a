"""A sweep's experiment, its parent run and teacher runs, the lookups that find runs again, and small batched writes.

Runs are found by tags (:mod:`kd_tune.tracking.tags`), never by memory alone, so a driver that restarts reattaches to
the runs it made instead of making new ones.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from kd_tune.distill.checkpoint import save_model_file
from kd_tune.distill.teacher import Teacher
from kd_tune.space.schema import SweepSpec
from kd_tune.space.sections import section_params
from kd_tune.tracking.datasets import DataInput, log_dataset_inputs
from kd_tune.tracking.logged_models import delete_run_models, find_model, log_model_once
from kd_tune.tracking.tags import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_PARAM_LEN,
    TAG_CACHED,
    TAG_DISCARDED,
    TAG_LABEL_NOISE,
    TAG_MEMBER,
    TAG_PARENT,
    TAG_PATH,
    TAG_ROLE,
    TAG_SOURCE,
    TAG_SWEEP,
    TAG_TEACHER,
    TAG_TEACHER_KEY,
    TAG_TRIAL,
)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The sweep's experiment (restored if it was deleted, made if missing), tagged as model training.

    The tag is set on a reattached experiment too, so sweeps made before it existed open on their Runs
    page as well once they are resumed (``kd-tune ui`` tags them without a resume).
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    tag_model_training(client, exp.experiment_id, exp.tags)
    return str(exp.experiment_id)


def tag_model_training(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> None:
    """Mark the experiment as model training (what MLflow's UI opens on its Runs page), unless it is already."""
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def sweep_experiments(client: MlflowClient) -> dict[str, str]:
    """Sweep name -> experiment id of every kd-tune sweep in the store (an experiment holding a run tagged
    ``kd_tune.role = sweep``), each tagged as model training on the way (sweeps made before the tag)."""
    experiments = {e.experiment_id: e for e in client.search_experiments(max_results=50000)}
    if not experiments:
        return {}
    parents = client.search_runs(list(experiments), filter_string=f"tags.`{TAG_ROLE}` = 'sweep'", max_results=50000)
    out: dict[str, str] = {}
    for run in parents:
        exp = experiments[run.info.experiment_id]
        if exp.name not in out:
            tag_model_training(client, exp.experiment_id, exp.tags)
            out[str(exp.name)] = str(exp.experiment_id)
    return out


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
    run = client.create_run(experiment_id, run_name=name, tags={TAG_SWEEP: name, TAG_ROLE: "sweep", TAG_PATH: path})
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
                     inputs: Sequence[DataInput] = (), example: np.ndarray | None = None, name: str = "") -> list[str]:
    """Each teacher's own run under the sweep's parent (once per sweep, also when it came from the cache), with its
    datasets (``inputs``) and, given an ``example`` input, its network as the run's MLflow model; ``name``: its
    ``grid.teacher`` entry. A pre-trained teacher's run records where it came from and its measured test accuracy
    (its model is that source). Returns the ids of the teachers' MLflow models (those of runs logged before included)."""
    noise = spec.dataset.label_noise
    model_ids = []
    for i, (member, teacher) in enumerate(zip(spec.teacher.members(), teachers, strict=True)):
        tags = {TAG_SWEEP: spec.name, TAG_ROLE: "teacher", TAG_MEMBER: str(i), TAG_LABEL_NOISE: f"{noise:g}", **({TAG_TEACHER: name} if name else {})}
        found = find_run(client, experiment_id, tags)
        if found is not None:
            if client.get_run(found).info.status == "FINISHED":
                model_ids += [m for m in [find_model(client, experiment_id, found, "teacher")] if m]
                continue
            delete_run_models(client, experiment_id, found)
            client.delete_run(found)  # cut short by a kill while being written: write it again, whole
        run_name = "-".join(["teacher", *([name] if name else []), *([str(i)] if len(teachers) > 1 else [])]) + (f"-n{noise:g}" if noise else "")
        more = {TAG_SOURCE: teacher.source} if teacher.source else {}
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **more, TAG_PARENT: parent_run_id, TAG_TEACHER_KEY: teacher.key,
                                                                       TAG_CACHED: str(teacher.cached).lower()})
        run_id = run.info.run_id
        params = {f"teacher.{k}": v for k, v in section_params(member).items()} | {f"dataset.{k}": v for k, v in asdict(spec.dataset).items()}
        client.log_batch(run_id, params=params_batch(params))
        log_dataset_inputs(client, run_id, inputs)
        for m in teacher.history:
            log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
        if teacher.source is not None:  # not trained here: its accuracy as measured on this sweep's test images
            log_metrics(client, run_id, {"test_acc": teacher.test_acc}, step=0)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "teacher.pt"
                save_model_file(path, teacher.model_args, teacher.state_dict)
                client.log_artifact(run_id, str(path), artifact_path="model")
            if example is not None:
                last = int(teacher.history[-1]["epoch"]) if teacher.history else 0
                model_ids.append(log_model_once(client, run_id, {"model_args": teacher.model_args, "model": teacher.state_dict}, example,
                                                "teacher", step=last))
        client.set_terminated(run_id, "FINISHED")
    return model_ids


def close_running_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark the sweep's child runs still RUNNING (their trials were cut short) as ``status``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
                              max_results=10000)
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)


def discard_forgotten_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_ids: set[str]) -> int:
    """Delete (MLflow's soft delete: restorable) the sweep's child runs of trials that Ray's restored state
    does not know: trials created after its last saved state, lost with a killed driver. Ray will not
    continue them (a search suggests their places anew, a grid creates them again), so their runs would
    stay as duplicates. Each is tagged with why first."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10000)
    gone = [r for r in runs if r.data.tags.get(TAG_TRIAL) and r.data.tags[TAG_TRIAL] not in trial_ids]
    for run in gone:
        client.set_tag(run.info.run_id, TAG_DISCARDED, "its trial was created after Ray's last saved state and lost with the driver")
        client.set_terminated(run.info.run_id, "KILLED")
        client.delete_run(run.info.run_id)
    return len(gone)
