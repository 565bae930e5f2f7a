"""The Ray Tune function trainable: a thin adapter around :func:`kd_tune.train.train`.

The data and the teacher's logits arrive through Ray's object store (``tune.with_parameters``),
put there once by the driver: no trial loads files or runs the teacher. Each epoch is reported
with ``tune.report`` together with a checkpoint; a restarted trial continues from
``tune.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from kd_tune.config import StudentSpec, TrialPoint
from kd_tune.data import DataSplit
from kd_tune.models import build_model
from kd_tune.train import EpochMetrics, TensorData, make_optimizer, train

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"  # written last: its presence marks a complete checkpoint


@dataclass(frozen=True)
class TrialBundle:
    """What every trial of a sweep shares, read-only, from the object store."""

    split: DataSplit
    student: StudentSpec
    teacher_train_logits: torch.Tensor
    teacher_test_logits: torch.Tensor


def trial_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned, so the first visible one is ours.
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def trial_threads() -> int:
    """Threads = CPUs Ray gave this trial, so concurrent trials do not oversubscribe the cores."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    torch.save(model.state_dict(), folder / MODEL_FILE)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch}))


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model and optimizer; returns the number of epochs already trained."""
    epoch = int(json.loads((folder / PROGRESS_FILE).read_text())["epoch"])
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return epoch


def kd_trainable(config: dict[str, Any], bundle: TrialBundle) -> None:
    # Ray logs a line per persisted checkpoint, i.e. per epoch per trial: too much to read.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    point = TrialPoint.from_config(config)
    device = trial_device()
    torch.set_num_threads(trial_threads())

    split = bundle.split
    use_teacher = point.role == "student"
    data = TensorData.from_split(split, device, bundle.teacher_train_logits if use_teacher else None, bundle.teacher_test_logits)
    model = build_model(bundle.student.widths, split.info.shape, split.info.num_classes, point.seed).to(device)
    optimizer = make_optimizer(model, bundle.student.lr)

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = load_checkpoint(Path(folder), model, optimizer)

    def report(m: EpochMetrics) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, m.epoch)
            tune.report({**m.as_dict(), "device": str(device)}, checkpoint=tune.Checkpoint.from_directory(folder))

    train(
        model, optimizer, data,
        epochs=point.epochs, batch_size=bundle.student.batch_size, seed=point.seed,
        alpha=point.alpha, temperature=point.temperature or 1.0, start_epoch=start, on_epoch=report,
    )

