"""Each run's datasets as MLflow dataset inputs (the runs table's Dataset column): what it learned from and was
measured on, each with a digest of exactly those images, labels and preprocessing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Run
from mlflow.tracking import MlflowClient

from kd_tune.data.split import DataSplit
from kd_tune.tracking.tags import DATASET_CONTEXT_TAG


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

    from kd_tune.data.sources import default_data_dir

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
