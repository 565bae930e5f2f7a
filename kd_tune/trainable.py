"""The Ray Tune function trainable: a thin adapter around :func:`kd_tune.train.train`.

The data and the teacher's logits arrive through Ray's object store (``tune.with_parameters``),
put there once by the driver: no trial loads files or runs the teacher. Each epoch is reported
with ``tune.report`` together with a checkpoint; a restarted trial continues from the newest
complete checkpoint, which after a SIGKILLed driver can be newer than the one Ray's experiment
state remembers (``tune.get_checkpoint()``), so the trial also looks in its own folder in the
sweep's storage (a local or NFS folder, or an object store: see :mod:`kd_tune.storage`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from kd_tune.checkpoint import diverged_result, newest_persisted, pack_results, read_checkpoint, save_checkpoint, save_pack_checkpoint
from kd_tune.cluster import assigned_device, assigned_threads
from kd_tune.config import StudentSpec, TrialPoint, is_pack, trial_label, trial_points
from kd_tune.data import DataSplit
from kd_tune.errors import DivergedError
from kd_tune.faults import FaultHook
from kd_tune.models import build_model
from kd_tune.packed import Member, PackData, PackedCNN, build_pack, channels_last_on, train_pack
from kd_tune.record import LOST_CHECKPOINT_FILE, trial_dirname  # noqa: F401 - sweeps begun before it moved pickled it from here
from kd_tune.storage import Storage
from kd_tune.train import EpochMetrics, Evaluation, TensorData, make_optimizer, train


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


def restore_state(bundle: TrialBundle, trial_dir: str) -> tuple[dict[str, Any] | None, int]:
    """The newest complete checkpoint of this trial, and the epoch Ray's own state knows of.

    After a SIGKILLed driver Ray's experiment state can lag behind what the trial had persisted, so
    the trial's folder in the storage is searched too; the newer of the two wins.
    """
    state, known_epoch = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
            known_epoch = int(state["epoch"]) if state else lost_checkpoint_epoch(Path(folder))
    on_disk = newest_persisted(bundle.storage, trial_dir)
    if on_disk is not None and on_disk["epoch"] > known_epoch:
        state = on_disk
    return state, known_epoch


def lost_checkpoint_epoch(folder: Path) -> int:
    """The epoch Ray knew for a checkpoint Tune had deleted (a stand-in, :func:`kd_tune.record.restore_lost_checkpoints`),
    else 0 (an incomplete checkpoint: nothing known)."""
    try:
        return int(json.loads((folder / LOST_CHECKPOINT_FILE).read_text())["known_epoch"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def kd_trainable(config: dict[str, Any], bundle: TrialBundle) -> None:
    # Ray logs a line per persisted checkpoint, i.e. per epoch per trial: too much to read.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    if is_pack(config):
        pack_trainable(config, bundle)
        return
    point = TrialPoint.from_config(config)
    device = assigned_device()
    torch.set_num_threads(assigned_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    trial_dir = bundle.trial_dir(point, tune.get_context().get_trial_id())
    faults = FaultHook.for_trial(point.label, bundle.storage, trial_dir)

    split = replace(bundle.split, train_y=bundle.labels[point.label_noise])
    teacher_train = bundle.teacher_train_logits[point.label_noise] if point.role == "student" else None
    data = faults.data(TensorData.from_split(split, device, teacher_train, bundle.teacher_test_logits[point.label_noise]))
    model = build_model(bundle.student.widths, split.info.shape, split.info.num_classes, point.seed).to(device)
    optimizer = make_optimizer(model, bundle.student.lr)

    # Restore: continue from the newest complete checkpoint.
    state, known_epoch = restore_state(bundle, trial_dir)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    # Where this attempt runs: the tracking callback tags the MLflow run with it (node_ip and hostname come from Ray).
    # And what it trains and selects on: a check that held-out images never reach training.
    extra = {"device": str(device), "node_id": ray.get_runtime_context().get_node_id(), "resumed_from": start,
             "train_images": int(data.train_x.shape[0]), "val_images": 0 if data.val_x is None else int(data.val_x.shape[0])}
    # Epochs trained before a kill but unknown to Ray may never have reached the driver (and MLflow):
    # report them again from the checkpoint's history; the tracking callback skips those it has.
    for m in history:
        if m["epoch"] > known_epoch:
            tune.report({**m, **extra})
    faults.before_training()

    # Train, reporting each epoch with a checkpoint.
    def report(m: EpochMetrics, ev: Evaluation) -> None:
        history.append(m.as_dict())
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, history, ev.confusion)
            tune.report({**m.as_dict(), **extra}, checkpoint=tune.Checkpoint.from_directory(folder))
        faults.after_epoch()

    try:
        train(model, optimizer, data, epochs=point.epochs, batch_size=bundle.student.batch_size, seed=point.seed,
              alpha=point.alpha, temperature=point.temperature or 1.0, start_epoch=start, on_epoch=report, precision=bundle.student.precision)
    except DivergedError as e:
        # Deterministic: a retry would diverge again. Record it and end the trial (no retries).
        tune.report({"epoch": e.epoch, "diverged": 1.0, "diverged_loss": e.loss, **extra})


def pack_trainable(config: dict[str, Any], bundle: TrialBundle) -> None:
    """A pack trial: its members trained as one :class:`~kd_tune.packed.PackedCNN` by :func:`~kd_tune.packed.train_pack`.

    Each epoch is ONE report, ``{"epoch", "members": {label: that member's metrics}, "diverged_members", ...}``,
    with ONE checkpoint (:func:`~kd_tune.checkpoint.save_pack_checkpoint`). A member whose loss goes NaN or
    infinite is reported once as diverged and dropped; the others go on. Restores as :func:`kd_trainable` does.
    """
    points = trial_points(config)
    labels = [p.label for p in points]
    device = assigned_device()
    torch.set_num_threads(assigned_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trial_dir = f"{bundle.sweep}/{trial_label(config)}_{tune.get_context().get_trial_id()}"
    faults = FaultHook.for_trial(trial_label(config), bundle.storage, trial_dir)
    poisoned = [k for k, p in enumerate(points) if FaultHook.for_trial(p.label, bundle.storage, trial_dir).mode == "nan"]

    data, members = pack_inputs(bundle, points, faults.data(TensorData.from_split(bundle.split, device)))
    widths, shape, classes = bundle.student.widths, bundle.split.info.shape, bundle.split.info.num_classes
    model_args = {"widths": list(widths), "in_shape": list(shape), "num_classes": classes}

    channels_last = channels_last_on(device)

    state, known_epoch = restore_state(bundle, trial_dir)
    start = 0
    entries: dict[str, dict[str, Any]] = {label: {"model_args": model_args, "epoch": 0, "history": [], "confusion": []} for label in labels}
    if state is not None:
        model = PackedCNN.from_state_dicts([state["members"][label]["model"] for label in labels], widths, shape, classes, channels_last).to(device)
        optimizer = make_optimizer(model, bundle.student.lr)
        optimizer.load_state_dict(state["optimizer"])
        start, entries = int(state["epoch"]), {label: dict(state["members"][label]) for label in labels}
    else:
        model = build_pack(widths, shape, classes, [p.seed for p in points], channels_last).to(device)
        optimizer = make_optimizer(model, bundle.student.lr)
        with torch.no_grad():
            for k in poisoned:  # test fault: this member's outputs are NaN, so its loss diverges at epoch 1
                model.fc_bias[k].fill_(float("nan"))
    exclude = {k for k, label in enumerate(labels) if entries[label].get("diverged")}
    extra = {"device": str(device), "node_id": ray.get_runtime_context().get_node_id(), "resumed_from": start,
             "train_images": int(data.train_x.shape[0]), "val_images": 0 if data.val_x is None else int(data.val_x.shape[0])}
    if state is not None:
        for r in pack_results(state, after=known_epoch):  # epochs trained before a kill but unknown to Ray
            tune.report({**r, **extra})
    faults.before_training()

    now: dict[str, dict[str, Any]] = {}

    def on_epoch(k: int, m: EpochMetrics, ev: Evaluation) -> None:
        entry = entries[labels[k]]
        entry["history"] = [*entry["history"], m.as_dict()]
        entry["epoch"], entry["confusion"] = m.epoch, ev.confusion
        now[labels[k]] = m.as_dict()

    def on_diverged(k: int, e: DivergedError) -> None:
        entries[labels[k]]["diverged"] = {"epoch": e.epoch, "loss": e.loss}
        now[labels[k]] = diverged_result(e.epoch, e.loss)

    def on_epoch_end(epoch: int) -> None:
        for k, label in enumerate(labels):
            entries[label]["model"] = model.member_state_dict(k)
        gone = sorted(label for label, entry in entries.items() if entry.get("diverged"))
        result = {"epoch": epoch, "members": dict(now), "diverged_members": ",".join(gone), **extra}
        now.clear()
        with tempfile.TemporaryDirectory() as folder:
            save_pack_checkpoint(Path(folder), epoch, entries, optimizer)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
        faults.after_epoch()

    train_pack(model, optimizer, data, members, batch_size=bundle.student.batch_size, start_epoch=start, exclude=exclude,
               on_epoch=on_epoch, on_diverged=on_diverged, on_epoch_end=on_epoch_end, precision=bundle.student.precision)


def pack_inputs(bundle: TrialBundle, points: list[TrialPoint], base: TensorData) -> tuple[PackData, list[Member]]:
    """A pack's data on ``base``'s device (one row of labels and teacher logits per label-noise level among the
    members) and its members, as :func:`kd_trainable` would train each point alone."""
    device = base.train_x.device
    levels = sorted({p.label_noise for p in points})
    row = {n: i for i, n in enumerate(levels)}
    data = PackData(base.train_x, torch.stack([bundle.labels[n] for n in levels]).to(device), base.test_x, base.test_y,
                    torch.stack([bundle.teacher_train_logits[n] for n in levels]).to(device),
                    torch.stack([bundle.teacher_test_logits[n] for n in levels]).to(device), base.val_x, base.val_y)
    members = [Member(seed=p.seed, epochs=p.epochs, alpha=p.alpha, temperature=p.temperature or 1.0, labels=row[p.label_noise],
                      teacher=row[p.label_noise] if p.role == "student" else None, teacher_test=row[p.label_noise]) for p in points]
    return data, members
