"""A dataset prepared for a sweep: the validation split held out, the subset and label noise applied, and the
images' preprocessing (``normalize``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_tune.data.custom import load_own
from kd_tune.data.registry import DatasetInfo
from kd_tune.data.sampling import stratified_subset
from kd_tune.data.sources import default_data_dir, load
from kd_tune.errors import UsageError


@dataclass(frozen=True)
class DataSplit:
    """A prepared dataset: uint8 images (N, C, H, W) and int64 labels, on the CPU."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_y_clean: torch.Tensor
    """Training labels before label noise (equal to train_y when there is none)."""
    val_x: torch.Tensor
    """Validation images, held out of the training set (0 rows: no validation split)."""
    val_y: torch.Tensor
    """Validation labels, never perturbed (like the test labels): selection measures the true task."""
    normalize: bool = False
    """The preprocessing the models see: mean/std standardization (true) or pixel / 255 only."""

    @property
    def preprocessing(self) -> str:
        """The preprocessing in words, as runs and reports show it."""
        return "mean/std standardization" if self.normalize else "pixel / 255"


def flip_labels(labels: torch.Tensor, fraction: float, seed: int, num_classes: int) -> torch.Tensor:
    """A copy of labels with round(fraction * N) of them moved to another class, chosen with a fixed seed."""
    out = labels.clone()
    n_flip = round(fraction * labels.numel())
    if n_flip == 0:
        return out
    g = torch.Generator().manual_seed(seed + 1_000_003)  # independent of the subset's stream
    idx = torch.randperm(labels.numel(), generator=g)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=g)
    out[idx] = (labels[idx] + shift) % num_classes
    return out


def prepare(name: str, train_size: int | None, label_noise: float, seed: int, root: Path | None = None, log: Callable[[str], None] = print,
            *, val_size: int = 0, normalize: bool = False, path: str | None = None, test_split: float = 0.0) -> DataSplit:
    """Load a dataset, hold out the validation split, then apply the sweep's subset and label noise
    (never to validation or test labels).

    The validation images come out of the whole training set first (stratified, seeded), so the
    same ``val_size`` and seed hold out the same images whatever ``train_size`` is. Raises
    :class:`UsageError` when the files hold too few training images for ``val_size`` + ``train_size``. ``path``: your
    own data (:mod:`kd_tune.data.custom`) named ``name``, its test set ``test_split`` of it when it has none.
    """
    if path is not None:
        info, train_x, train_y, test_x, test_y = load_own(path, name, test_split, seed)
        where = repr(path)
    else:
        info, train_x, train_y, test_x, test_y = load(name, root, log)
        where = f"{name!r} under {root or default_data_dir()}"
    if val_size:
        if val_size > train_y.numel() - info.num_classes:
            raise UsageError(f"dataset.val_size = {val_size} leaves fewer than one training image per class of the {train_y.numel()} "
                             f"training images of {where}")
        # A stream of its own, so the validation images do not depend on the subset's draw.
        val_idx = stratified_subset(train_y, val_size, seed + 2_000_003, info.num_classes)
        keep = torch.ones(train_y.numel(), dtype=torch.bool)
        keep[val_idx] = False
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[keep], train_y[keep]
    else:
        val_x, val_y = train_x[:0], train_y[:0]
    if train_size is not None:
        if train_size > train_y.numel():
            held = f" ({val_size} held out for validation)" if val_size else ""
            raise UsageError(f"dataset.train_size = {train_size} is larger than the {train_y.numel()} training images{held} of {where}")
        idx = stratified_subset(train_y, train_size, seed, info.num_classes)
        train_x, train_y = train_x[idx], train_y[idx]
    noisy = flip_labels(train_y, label_noise, seed, info.num_classes)
    return DataSplit(info, train_x, noisy, test_x, test_y, train_y, val_x, val_y, normalize)


def normalize(x: torch.Tensor, info: DatasetInfo, device: torch.device | str = "cpu", *, standardize: bool = True) -> torch.Tensor:
    """uint8 images to float32 on device, done once per trial, not per batch: pixel / 255, then (with
    ``standardize``) the dataset's per-channel mean and std."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    if standardize:
        mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last)  # the models' layout


def data_hash(split: DataSplit) -> str:
    """A short fingerprint of what a teacher learns from (used in its cache key)."""
    h = hashlib.sha256()
    for t in (split.train_x, split.train_y, split.test_x, split.test_y, split.val_x, split.val_y):
        h.update(t.numpy().tobytes())
    h.update(split.preprocessing.encode())
    return h.hexdigest()[:16]
