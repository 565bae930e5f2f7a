"""Each trained network as an MLflow model of its run (a LoggedModel: the runs table's Models column), logged once."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.tracking import MlflowClient

from kd_tune.data.split import DataSplit
from kd_tune.distill.checkpoint import model_from_state
from kd_tune.process import mlflow_tracking_uri_held
from kd_tune.tracking.tags import MAX_PARAM_LEN, TAG_ROLE, TAG_SWEEP


def input_example(split: DataSplit) -> np.ndarray:
    """Two test images as the models see them (float32, N x C x H x W), for the logged models' signature
    and input example. Two, not one: MLflow 3 saves PyTorch models with ``torch.export``, which would
    fix the batch size of a one-image example at 1 (the model would refuse any other batch)."""
    from kd_tune.data.split import normalize

    return normalize(split.test_x[:2], split.info, standardize=split.normalize).contiguous().numpy()


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` for a while: ``mlflow.pytorch.log_model`` (and
    ``load_model("models:/...")``) reach the store through it, whatever store a client talks to. Afterwards the setting
    is as it was, unset included (``mlflow.get_tracking_uri()`` would give the default store resolved against the
    current folder, and setting that back would pin every later default to this folder)."""
    import mlflow

    with mlflow_tracking_uri_held():
        mlflow.set_tracking_uri(uri)
        yield


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
