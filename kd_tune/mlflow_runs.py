"""A sweep's records in MLflow: its experiment, parent run and teacher runs, the tags that find
runs again, and small batched writes.

Only the driver talks to MLflow. Runs are found by tags (never by memory alone), so a driver that
restarts reattaches to the runs it made instead of making new ones. The per-trial child runs are
written by the Tune callback in :mod:`kd_tune.tracking`.

What makes a sweep look native in MLflow's UI lives here too: the experiment's kind (so the UI opens
on its Runs page), each run's datasets (MLflow's dataset inputs: the runs table's Dataset column) and
each trained network as an MLflow model linked to its run (a LoggedModel: the Models column).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModel, LoggedModelInput, LoggedModelStatus, Metric, Param, Run
from mlflow.tracking import MlflowClient

from kd_tune.checkpoint import model_from_state, save_model_file
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
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The value MLflow's UI reads (server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, "Model training" in
# its switch): an MLflow 3 experiment without it opens on the GenAI overview instead of its runs.
EXPERIMENT_KIND = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT: what the UI shows beside a dataset


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


# --- datasets: what each run learned from and was measured on ------------------------------------


@dataclass(frozen=True)
class DataInput:
    """One dataset a run uses, as plain strings: the Tune callback holding these is pickled with Ray's
    experiment state, so it carries a few hundred bytes per dataset, never the tensors."""

    name: str
    digest: str
    """Fingerprint of exactly these images and labels as the models see them (see :func:`tensor_digest`)."""
    context: str
    """``training``, ``validation`` or ``test``: MLflow's ``mlflow.data.context`` input tag."""
    source: str
    """JSON ``{"uri": folder}``: where the files were read from (torchvision's layout)."""
    schema: str
    profile: str
    source_type: str = "local"

    def entity(self) -> DatasetInput:
        dataset = Dataset(self.name, self.digest, self.source_type, self.source, self.schema, self.profile)
        return DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, self.context)])


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (hashing 60k images takes ~30 ms this way)."""
    return np.ascontiguousarray(t.numpy()).data.cast("B")


def tensor_digest(images: torch.Tensor, labels: torch.Tensor, preprocessing: str) -> str:
    """A fingerprint of a dataset as a run uses it: the uint8 images, the labels (after label noise) and
    the preprocessing between them and the model. Any other subset, noise level or preprocessing gives
    another digest; MLflow keeps one dataset per (name, digest) in an experiment."""
    h = hashlib.sha256()
    h.update(f"{tuple(images.shape)} {images.dtype} {labels.dtype} {preprocessing}".encode())
    h.update(_bytes(images))
    h.update(_bytes(labels))
    return h.hexdigest()[:20]  # MLflow stores at most 36 characters


def preprocessing_of(split: DataSplit) -> str:
    """The preprocessing of the split's images, in words and numbers (part of every digest)."""
    if split.normalize:
        return f"{split.preprocessing} (mean {list(split.info.mean)}, std {list(split.info.std)})"
    return split.preprocessing


def dataset_inputs(split: DataSplit, labels_by_noise: Mapping[float, torch.Tensor], data_dir: Path | str | None = None,
                   val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[float, list[DataInput]]:
    """The datasets of the runs at each label-noise level: training (the images with that level's
    labels), validation (when the split holds one out) and test; computed once in the driver.

    ``data_dir`` is the folder the data was read from (None: kd-tune's default,
    ``$KD_TUNE_DATA_DIR`` or ``~/.cache/kd-tune/data``); ``val`` the validation images and labels
    (default: the split's own ``val_x``/``val_y`` if it has them).
    """
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    from kd_tune.data import default_data_dir

    info = split.info
    pre = preprocessing_of(split)
    source = json.dumps({"uri": str(Path(data_dir).expanduser() if data_dir else default_data_dir())})
    # What the models take and predict against (MLflow's tensor schema, as for its NumPy datasets).
    schema = json.dumps(TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.float32), (-1, *info.shape))]),
                                            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,))])).to_dict())

    def one(name: str, context: str, x: torch.Tensor, y: torch.Tensor, noise: float | None = None) -> DataInput:
        profile: dict[str, Any] = {"num_rows": int(y.numel()), "features_shape": list(x.shape), "features_dtype": "uint8 on disk",
                                   "targets_shape": list(y.shape), "preprocessing": pre,
                                   "class_counts": torch.bincount(y, minlength=info.num_classes).tolist()}
        if noise is not None:
            profile["label_noise"] = noise
        return DataInput(name, tensor_digest(x, y, pre), context, source, schema, json.dumps(profile))

    if val is None and getattr(split, "val_x", None) is not None:
        val = (split.val_x, split.val_y)
    held_out = [one(f"{info.name}-val", "validation", *val)] if val is not None and val[1].numel() > 0 else []
    test = one(f"{info.name}-test", "test", split.test_x, split.test_y)
    return {float(n): [one(f"{info.name}-train" + (f"-n{n:g}" if n else ""), "training", split.train_x, y, float(n)), *held_out, test]
            for n, y in labels_by_noise.items()}


def log_dataset_inputs(client: MlflowClient, run_id: str, inputs: Sequence[DataInput], run: Run | None = None) -> int:
    """Record the run's datasets, each once: those it has already (same name and digest: a run
    reattached after a restart) are left out, whatever the store does with repeats. Returns how many
    were logged."""
    if not inputs:
        return 0
    run = run or client.get_run(run_id)
    have = {(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])}
    todo = {(d.name, d.digest): d.entity() for d in inputs if (d.name, d.digest) not in have}
    if todo:
        client.log_inputs(run_id, datasets=list(todo.values()))
    return len(todo)


def log_sweep_inputs(client: MlflowClient, parent_run_id: str, inputs: Sequence[DataInput], teacher_model_ids: Sequence[str]) -> None:
    """The parent run's inputs: every dataset of the sweep and its teachers' models. The parent is the
    one row a sweep shows in MLflow's runs table until it is expanded: its Dataset and Models cells say
    what the sweep learned from and distilled. Each is logged once (the store would repeat a model input)."""
    run = client.get_run(parent_run_id)
    log_dataset_inputs(client, parent_run_id, inputs, run)
    have = {m.model_id for m in (run.inputs.model_inputs or [] if run.inputs else [])}
    todo = [LoggedModelInput(i) for i in dict.fromkeys(teacher_model_ids) if i not in have]
    if todo:
        client.log_inputs(parent_run_id, models=todo)


# --- models: each trained network as an MLflow model of its run -----------------------------------


def input_example(split: DataSplit) -> np.ndarray:
    """Two test images as the models see them (float32, N x C x H x W), for the logged models' signature
    and input example. Two, not one: MLflow 3 saves PyTorch models with ``torch.export``, which would
    fix the batch size of a one-image example at 1 (the model would refuse any other batch)."""
    from kd_tune.data import normalize

    return normalize(split.test_x[:2], split.info, standardize=split.normalize).contiguous().numpy()


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` for a while: ``mlflow.pytorch.log_model`` (and
    ``load_model("models:/...")``) reach the store through it, whatever store a client talks to."""
    import mlflow

    before = mlflow.get_tracking_uri()
    if before == uri:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def pip_requirements() -> list[str]:
    """What loading a logged model needs, given rather than inferred (inference loads the model in a
    subprocess: seconds per model). MLflow's ``pt2`` format needs torch alone, not kd-tune."""
    return [f"torch=={torch.__version__.split('+')[0]}"]


def log_model_once(client: MlflowClient, run_id: str, state: Mapping[str, Any], example: np.ndarray, name: str, step: int = 0) -> str:
    """The run's MLflow model ``name`` (a LoggedModel in the run's experiment, linked to the run as its
    output, with the run's params and its sweep and role tags), logged from a checkpoint or model-file ``state``
    (``model_args`` and ``model`` weights) unless the run has a complete one already; returns its id.

    A model cut short by a kill or an outage (left PENDING or FAILED) is completed in place when the run
    links to it already, else deleted and logged again. The model is
    created in the run's experiment first and only then filled: ``mlflow.pytorch.log_model`` on its own
    would put it in the fluent API's active experiment (``Default`` in the driver). ``step`` links the
    run's metrics at that step (its last epoch) to the model. Raises ``MlflowException`` when the
    store refuses, and whatever ``torch.export`` raises for a model it cannot export.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    found = _run_models(client, experiment_id, run_id, name)
    for m in found:
        if m.status == LoggedModelStatus.READY:
            return str(m.model_id)
    # PENDING or FAILED: cut short by a kill or an unreachable store. One linked to the run already (MLflow
    # links a model to its run before uploading it) is completed in place: a new one would leave the run
    # pointing at two. Any other is deleted.
    linked = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
    unfinished = next((m for m in found if m.model_id in linked), None)
    for m in found:
        if m is not unfinished:
            client.delete_logged_model(m.model_id)
    model = model_from_state(dict(state))
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    params = {k: str(v)[:MAX_PARAM_LEN] for k, v in run.data.params.items()}
    tags = {k: run.data.tags[k] for k in (TAG_SWEEP, TAG_ROLE) if k in run.data.tags}
    if unfinished is None:
        model_id = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=params, tags=tags).model_id
    else:
        model_id = unfinished.model_id
    with using_tracking_uri(client.tracking_uri), warnings.catch_warnings():
        # torch.export's archive writer warns about every CPU model's weights ("No complete tensor found in
        # the group ... may cause issues when your weights are not on CPU"): noise in the sweep's output.
        warnings.filterwarnings("ignore", message="No complete tensor found", category=UserWarning)
        mlflow.pytorch.log_model(model, name=name, model_id=model_id, run_id=None if unfinished else run_id, signature=signature,
                                 input_example=example, pip_requirements=pip_requirements(), step=step)
    return str(model_id)


def _run_models(client: MlflowClient, experiment_id: str, run_id: str, name: str | None = None) -> list[LoggedModel]:
    """The MLflow models a run produced (named ``name``, or all), whatever their status."""
    query = f"source_run_id = '{run_id}'" + (f" AND name = '{name}'" if name else "")
    return list(client.search_logged_models([experiment_id], filter_string=query))


def find_model(client: MlflowClient, experiment_id: str, run_id: str, name: str) -> str | None:
    """The id of the run's complete MLflow model ``name``, if it has one."""
    return next((str(m.model_id) for m in _run_models(client, experiment_id, run_id, name) if m.status == LoggedModelStatus.READY), None)


def delete_run_models(client: MlflowClient, experiment_id: str, run_id: str) -> None:
    """Delete the models of a run about to be deleted (they would stay in the experiment's model list)."""
    for m in _run_models(client, experiment_id, run_id):
        client.delete_logged_model(m.model_id)


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
                     split: DataSplit, inputs: Sequence[DataInput] = (), example: np.ndarray | None = None) -> list[str]:
    """Each teacher's own run under the sweep's parent (once per sweep, also when it came from the cache),
    with its datasets (``inputs``) and, given an ``example`` input, its network as the run's MLflow model.
    Returns the ids of the teachers' MLflow models (those of runs logged before included)."""
    noise = spec.dataset.label_noise
    model_ids = []
    for i, (member, teacher) in enumerate(zip(spec.teacher.members(), teachers, strict=True)):
        tags = {TAG_SWEEP: spec.name, TAG_ROLE: "teacher", "kd_tune.member": str(i), "kd_tune.label_noise": f"{noise:g}"}
        found = find_run(client, experiment_id, tags)
        if found is not None:
            if client.get_run(found).info.status == "FINISHED":
                model_ids += [m for m in [find_model(client, experiment_id, found, "teacher")] if m]
                continue
            delete_run_models(client, experiment_id, found)
            client.delete_run(found)  # cut short by a kill while being written: write it again, whole
        name = "teacher" if len(teachers) == 1 else f"teacher-{i}"
        run = client.create_run(experiment_id, run_name=name + (f"-n{noise:g}" if noise else ""),
                                tags={**tags, TAG_PARENT: parent_run_id, "kd_tune.teacher_key": teacher.key, "kd_tune.cached": str(teacher.cached).lower()})
        run_id = run.info.run_id
        params = {f"teacher.{k}": v for k, v in asdict(member).items()} | {f"dataset.{k}": v for k, v in asdict(spec.dataset).items()}
        client.log_batch(run_id, params=params_batch(params))
        log_dataset_inputs(client, run_id, inputs)
        for m in teacher.history:
            log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
        model_args = {"widths": list(member.widths), "in_shape": list(split.info.shape), "num_classes": split.info.num_classes}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "teacher.pt"
            save_model_file(path, model_args, teacher.state_dict)
            client.log_artifact(run_id, str(path), artifact_path="model")
        if example is not None:
            last = int(teacher.history[-1]["epoch"]) if teacher.history else 0
            model_ids.append(log_model_once(client, run_id, {"model_args": model_args, "model": teacher.state_dict}, example, "teacher", step=last))
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
        client.set_tag(run.info.run_id, "kd_tune.discarded", "its trial was created after Ray's last saved state and lost with the driver")
        client.set_terminated(run.info.run_id, "KILLED")
        client.delete_run(run.info.run_id)
    return len(gone)
