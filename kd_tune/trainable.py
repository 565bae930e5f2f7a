"""The Ray Tune function trainable: a thin adapter around :func:`kd_tune.train.train`.

The data and the teacher's logits arrive through Ray's object store (``tune.with_parameters``),
put there once by the driver: no trial loads files or runs the teacher. Each epoch is reported
with ``tune.report`` together with a checkpoint; a restarted trial continues from the newest
complete checkpoint, which after a SIGKILLed driver can be newer than the one Ray's experiment
state remembers (``tune.get_checkpoint()``), so the trial also looks in its own folder in the
sweep's storage (a local or NFS folder, or an object store: see :mod:`kd_tune.storage`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from kd_tune.config import StudentSpec, TrialPoint
from kd_tune.data import DataSplit
from kd_tune.errors import DivergedError
from kd_tune.models import build_model
from kd_tune.storage import Storage
from kd_tune.train import EpochMetrics, Evaluation, TensorData, make_optimizer, train

STATE_FILE = "state.pt"  # one file: model, optimizer and epoch can never disagree
FAULT_ENV = "KD_TUNE_TEST_FAULT"  # test-only fault injection: "<trial label>:once|always[,...]"


@dataclass(frozen=True)
class TrialBundle:
    """What every trial of a sweep shares, read-only, from the object store."""

    split: DataSplit
    """Images and clean labels (the test labels are never perturbed)."""
    student: StudentSpec
    labels: dict[float, torch.Tensor]
    """Training labels per label-noise level of the sweep."""
    teacher_train_logits: dict[float, torch.Tensor]
    """The teacher's logits on the training images, per label-noise level (the teacher saw that noise)."""
    teacher_test_logits: dict[float, torch.Tensor]
    storage: Storage
    """Where the sweep lives; each trial's checkpoints are persisted in its folder there."""
    sweep: str
    """The sweep's name: its folder in the storage."""

    def trial_dir(self, point: TrialPoint, trial_id: str) -> str:
        """The trial's folder, relative to the storage root (see :func:`trial_dirname`)."""
        return f"{self.sweep}/{point.label}_{trial_id}"


def trial_dirname(trial: Any) -> str:
    """A trial's folder: readable, and computable inside the trial from its config and id."""
    return f"{TrialPoint.from_config(trial.config).label}_{trial.trial_id}"


def trial_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned, so the first visible one is ours.
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def trial_threads() -> int:
    """Threads = CPUs Ray gave this trial, so concurrent trials do not oversubscribe the cores."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, history: list[dict[str, float]],
                    confusion: list[list[int]]) -> None:
    """Weights, optimizer, every epoch's metrics so far and this epoch's confusion matrix, in one file written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(history[-1]["epoch"]), "history": history,
             "confusion": confusion}
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def read_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state, or None if it is missing or incomplete (a copy cut short by a kill)."""
    try:
        return _state(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
        return None


def _state(state: dict[str, Any]) -> dict[str, Any]:
    int(state["epoch"])
    return state


def newest_persisted(storage: Storage, trial_dir: str) -> dict[str, Any] | None:
    """The complete checkpoint with the highest epoch among the trial's persisted ones (``trial_dir`` is
    relative to the storage root)."""
    best: dict[str, Any] | None = None
    for folder in storage.list_dirs(trial_dir):
        if not folder.startswith("checkpoint_"):
            continue
        try:
            state = _state(storage.torch_load(trial_dir, folder, STATE_FILE))
        except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
            continue
        if best is None or state["epoch"] > best["epoch"]:
            best = state
    return best


def kd_trainable(config: dict[str, Any], bundle: TrialBundle) -> None:
    # Ray logs a line per persisted checkpoint, i.e. per epoch per trial: too much to read.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    point = TrialPoint.from_config(config)
    device = trial_device()
    torch.set_num_threads(trial_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    trial_dir = bundle.trial_dir(point, tune.get_context().get_trial_id())

    split = replace(bundle.split, train_y=bundle.labels[point.label_noise])
    use_teacher = point.role == "student"
    teacher_train = bundle.teacher_train_logits[point.label_noise] if use_teacher else None
    data = TensorData.from_split(split, device, teacher_train, bundle.teacher_test_logits[point.label_noise])
    model = build_model(bundle.student.widths, split.info.shape, split.info.num_classes, point.seed).to(device)
    optimizer = make_optimizer(model, bundle.student.lr)

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
    known_epoch = int(state["epoch"]) if state else 0
    on_disk = newest_persisted(bundle.storage, trial_dir)
    if on_disk is not None and on_disk["epoch"] > known_epoch:
        state = on_disk  # Ray's state lagged behind what the trial had persisted before a kill
    start = 0
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    # Where this attempt runs: the tracking callback tags the MLflow run with it (node_ip and hostname come from Ray).
    extra = {"device": str(device), "node_id": ray.get_runtime_context().get_node_id(), "resumed_from": start}
    # Epochs trained before a kill but unknown to Ray may never have reached the driver (and MLflow):
    # report them again from the checkpoint's history; the tracking callback skips those it has.
    for m in history:
        if m["epoch"] > known_epoch:
            tune.report({**m, **extra})
    _maybe_inject_fault(point, bundle.storage, trial_dir, "always")

    def report(m: EpochMetrics, ev: Evaluation) -> None:
        history.append(m.as_dict())
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, history, ev.confusion)
            tune.report({**m.as_dict(), **extra}, checkpoint=tune.Checkpoint.from_directory(folder))
        _maybe_inject_fault(point, bundle.storage, trial_dir, "once")

    if _fault_mode(point) == "nan":
        data = TensorData(data.train_x.clone().fill_(float("nan")), data.train_y, data.test_x, data.test_y, data.teacher_train, data.teacher_test)
    try:
        train(
            model, optimizer, data,
            epochs=point.epochs, batch_size=bundle.student.batch_size, seed=point.seed,
            alpha=point.alpha, temperature=point.temperature or 1.0, start_epoch=start, on_epoch=report,
        )
    except DivergedError as e:
        # Deterministic: a retry would diverge again. Record it and end the trial (no retries).
        tune.report({"epoch": e.epoch, "diverged": 1.0, "diverged_loss": e.loss, **extra})


def _fault_mode(point: TrialPoint) -> str:
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        label, _, mode = spec.rpartition(":")
        if label == point.label:
            return mode
    return ""


def _maybe_inject_fault(point: TrialPoint, storage: Storage, trial_dir: str, where: str) -> None:
    """Test-only fault injection, set by KD_TUNE_TEST_FAULT="<trial label>:<mode>[,...]": ``always`` crashes
    every attempt before training; ``once`` crashes the first attempt after its first reported epoch;
    ``nan`` feeds NaN images so that the loss diverges."""
    mode = _fault_mode(point)
    if mode != where:
        return
    marker = f"{trial_dir}/.kd_tune_fault_injected"
    if mode == "always" or not storage.exists(marker):
        storage.write_text("1", marker)
        raise RuntimeError(f"injected fault ({FAULT_ENV}={point.label}:{mode})")
