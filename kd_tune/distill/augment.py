"""Image augmentation on batches already on the device: random shifts (digits), random crops with padding and
horizontal flips (CIFAR-shaped data). Plain PyTorch, vectorized over the batch (no per-image Python).

Deterministic: the draws of epoch e come from a generator seeded by (seed, e) (:func:`epoch_generator`), consumed in
batch order, so a resumed or epoch-shared run sees exactly the images an uninterrupted one saw.

A shift by up to ``pad`` pixels and a random crop after zero-padding by ``pad`` are the same operation: the image is
placed on a zero canvas ``pad`` pixels larger on every side, and a window of the original size is cut at a uniformly
drawn offset in [0, 2 * pad] per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augment:
    """What a batch goes through before the model sees it in training (never in evaluation)."""

    kind: str = "none"
    """``none``, ``shift`` (random translation by up to ``pad`` pixels) or ``crop_flip`` (crop after padding by ``pad``,
    then a horizontal flip with probability 1/2)."""
    pad: int = 2

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "none":
            return x
        return translate(x, self.pad, flip=self.kind == "crop_flip", generator=generator)


NO_AUGMENT = Augment()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``'s augmentation draws: a function of (seed, epoch) alone, and a stream
    apart from the data order's (:func:`kd_tune.distill.train.epoch_order`)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919_000_000)


def translate(x: torch.Tensor, pad: int, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] shifted by a random offset in [-pad, pad] per axis (zeros fill what comes in),
    and with ``flip`` mirrored left-right with probability 1/2. The draws are made on the CPU from ``generator``
    (identical on every device) and applied on ``x``'s device."""
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    mirror = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    dev = x.device
    canvas = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(dev)  # [B, H]: the window's rows in the canvas
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(mirror[:, None], cols.flip(1), cols).to(dev)  # [B, W]
    batch = torch.arange(b, device=dev)[:, None, None]
    out = canvas.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
