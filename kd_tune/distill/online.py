"""A live teacher: its network run on each training batch, for students that see augmented images.

Cached logits are of the plain training images, so a student that sees a shifted or cropped image must get the
teacher's logits of *that* image (a bug a popular KD repository had: haitongli/knowledge-distillation-pytorch #4,
#23). The teacher runs in eval mode (dropout off, BatchNorm's running statistics), under ``no_grad``, on the trial's
device, in float32 (a bfloat16 teacher is not measured safe here); an ensemble averages its members' logits, as the
cached ensemble does. :attr:`OnlineTeacher.forwards` counts its batches: a pack's members that share a data order
share each augmented batch and so one forward of each teacher (:func:`kd_tune.distill.pack_train.pack_epoch`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_tune.distill.models import build


class OnlineTeacher:
    """The teacher networks of one ``grid.teacher`` entry (one, or an ensemble), ready to score batches."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] = ()) -> None:
        if not models:
            raise ValueError("an online teacher needs at least one network")
        if weights and len(weights) != len(models):
            raise ValueError(f"{len(weights)} weights for an ensemble of {len(models)}")
        self.models = [m.eval() for m in models]
        self.weights = tuple(weights)
        """Each network's weight in the logit average (summing to 1), as the cached ensemble's; empty: the plain mean."""
        self.forwards = 0
        """Batches scored so far (one per call, whatever the ensemble's size)."""

    def to(self, device: torch.device | str) -> OnlineTeacher:
        self.models = [m.to(device) for m in self.models]
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of the images ``x`` [B, C, H, W] (float32; an ensemble's (weighted) mean)."""
        self.forwards += 1
        logits = [m(x).float() for m in self.models]
        if len(logits) == 1:
            return logits[0]
        if not self.weights:
            return torch.stack(logits).mean(0)
        return sum((w * z for w, z in zip(self.weights, logits, strict=True)), torch.zeros_like(logits[0]))


@dataclass(frozen=True)
class TeacherNet:
    """What a trial needs to build one live teacher network on its own device: a kd-tune model's args and weights, or a
    pre-trained file's bytes (a ``torch.export`` archive or a kd-tune model file, read as ``teacher.from`` reads it)."""

    model_args: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    file: bytes | None = None
    suffix: str = ".pt"

    def network(self) -> nn.Module:
        if self.file is None:
            assert self.model_args is not None
            model = build(self.model_args, seed=0)
            model.load_state_dict(self.state_dict)
            return model.eval()
        from kd_tune.distill.pretrained import load_model

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"teacher{self.suffix}"
            path.write_bytes(self.file)
            return load_model(path)[0]


def online_teacher(nets: Sequence[TeacherNet], device: torch.device | str, weights: Sequence[float] = ()) -> OnlineTeacher:
    """The live teacher of these networks (one, or an ensemble weighted by ``weights``) on ``device``."""
    return OnlineTeacher([net.network() for net in nets], weights).to(device)
