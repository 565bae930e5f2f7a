"""The teacher: trained once per spec (its logits computed once), named by a key of everything that determines it.

The key hashes the dataset spec, the teacher spec and a fingerprint of the data, so a cache (the sweep layer's
:class:`~kd_tune.sweep.teacher_cache.TeacherCache`) can reuse a teacher for every later sweep with the same spec and
train a new one on any change. Plain PyTorch, like the rest of the training layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kd_tune.data.split import DataSplit, data_hash
from kd_tune.distill.augment import Augment
from kd_tune.distill.epochs import EpochMetrics
from kd_tune.distill.metrics import Evaluation
from kd_tune.distill.models import build, model_args
from kd_tune.distill.train import TensorData, make_optimizer, predict_logits, train
from kd_tune.space.schema import DatasetSpec
from kd_tune.space.sections import TeacherSpec

CACHE_FORMAT = 2
"""Bumped whenever what a cached teacher holds changes (2: its model args)."""


@dataclass(frozen=True)
class Teacher:
    """A trained teacher and its logits on the training and test images (CPU tensors)."""

    key: str
    model_args: dict[str, Any] | None
    """What rebuilds the teacher's network (:func:`kd_tune.distill.models.model_args`); None for a pre-trained
    ``torch.export`` program."""
    state_dict: dict[str, torch.Tensor]
    train_logits: torch.Tensor
    test_logits: torch.Tensor
    test_acc: float
    history: list[dict[str, float]]
    cached: bool = False
    """True when this came from the cache rather than from training now."""
    source: str | None = None
    """Where a pre-trained teacher was read from (``teacher.from``); None for one trained by kd-tune."""


def teacher_key(dataset: DatasetSpec, teacher: TeacherSpec, split: DataSplit) -> str:
    spec = {"format": CACHE_FORMAT, "dataset": asdict(dataset), "teacher": asdict(teacher), "data": data_hash(split)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def train_teacher(
    split: DataSplit,
    spec: TeacherSpec,
    key: str,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> Teacher:
    """Train the teacher on the (possibly noisy) training labels; then its logits, once."""
    data = TensorData.from_split(split, device)
    margs = model_args(spec.arch, spec.arch_args, split.info.shape, split.info.num_classes)
    model = build(margs, spec.seed).to(device)

    def progress(m: EpochMetrics, _: Evaluation) -> None:
        log(f"teacher epoch {m.epoch}/{spec.epochs}: train loss {m.train_loss:.4f}, test acc {m.test_acc:.4f} ({m.epoch_seconds:.1f} s)")

    history = train(model, make_optimizer(model, spec.lr), data, epochs=spec.epochs, batch_size=spec.batch_size, seed=spec.seed, on_epoch=progress,
                    augment=Augment(spec.augment, spec.augment_pad))
    train_logits = predict_logits(model, data.train_x).cpu()
    test_logits = predict_logits(model, data.test_x).cpu()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Teacher(key, margs, state, train_logits, test_logits, history[-1].test_acc, [m.as_dict() for m in history])


def ensemble_logits(teachers: list[Teacher], test_y: torch.Tensor, weights: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train and test logits averaged over the members (weighted by ``weights``, which sum to 1; empty: the plain mean),
    and the test accuracy of that average."""
    def average(logits: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(logits)
        if not weights:
            return stacked.mean(dim=0)
        return (stacked * torch.tensor(weights, dtype=stacked.dtype)[:, None, None]).sum(dim=0)

    train = average([t.train_logits for t in teachers])
    test = average([t.test_logits for t in teachers])
    return train, test, (test.argmax(dim=1) == test_y).float().mean().item()


def log_teacher_summary(teachers: list[Teacher], acc: float, log: Callable[[str], None]) -> None:
    """An ensemble's accuracy and its members' (a single teacher was logged as it came)."""
    if len(teachers) > 1:
        log(f"ensemble of {len(teachers)} teachers: test acc {acc:.4f} (members: {', '.join(f'{t.test_acc:.4f}' for t in teachers)})")


def teacher_from_model(model: torch.nn.Module, margs: dict[str, Any] | None, split: DataSplit, key: str, source: str,
                       device: torch.device | str = "cpu") -> Teacher:
    """A pre-trained teacher: its logits on the training and test images (eval mode, once) and its measured test accuracy."""
    data = TensorData.from_split(split, device)
    model = model.to(device)
    train_logits = predict_logits(model, data.train_x).float().cpu()
    test_logits = predict_logits(model, data.test_x).float().cpu()
    acc = float((test_logits.argmax(1) == split.test_y).float().mean())
    return Teacher(key, margs, {}, train_logits, test_logits, acc, [], source=source)


def pretrained_key(dataset: DatasetSpec, digest: str, split: DataSplit) -> str:
    """The cache key of a pre-trained teacher's logits: the file's digest, the dataset spec and the data's fingerprint."""
    spec = {"format": CACHE_FORMAT, "dataset": asdict(dataset), "pretrained": digest, "data": data_hash(split)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
