"""The study's CNN (the Keras distillation example it copies), for teacher and student alike.

    Conv2d(w1, 3x3, stride 2, "same") -> LeakyReLU(0.2) -> MaxPool(2x2, stride 1, "same")
    -> Conv2d(w2, 3x3, stride 2, "same") -> Flatten -> Linear(num_classes)

Teacher 256/512 and student 16/32 filters by default. "same" follows TensorFlow: the output is
ceil(input / stride) and the odd padding pixel goes to the bottom/right, so weights and shapes match
the Keras model exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_tune.distill.models.registry import build, model_args, register_model


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad2d(h: int, w: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    top, bottom = _same_pad(h, kernel, stride)
    left, right = _same_pad(w, kernel, stride)
    return left, right, top, bottom


class SeedCNN(nn.Module):
    """Two strided convolutions and a linear classifier; input shape fixes the paddings and Linear's size."""

    def __init__(self, widths: tuple[int, ...] | list[int], in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        w1, w2 = widths
        c, h, w = in_shape
        layers: list[nn.Module] = [nn.ZeroPad2d(_pad2d(h, w, 3, 2)), nn.Conv2d(c, w1, 3, stride=2)]
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        # Replicating the edge equals TF's -inf padding for a max, without putting infinities in tensors.
        layers += [nn.LeakyReLU(0.2), nn.ReplicationPad2d(_pad2d(h, w, 2, 1)), nn.MaxPool2d(2, stride=1)]
        layers += [nn.ZeroPad2d(_pad2d(h, w, 3, 2)), nn.Conv2d(w1, w2, 3, stride=2)]
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        layers += [nn.Flatten(), nn.Linear(w2 * h * w, num_classes)]
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.widths = (w1, w2)
        self.in_shape = in_shape
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("cnn")
def cnn(in_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, ...] | list[int] = (16, 32)) -> SeedCNN:
    """The registry's ``cnn``: :class:`SeedCNN` with ``widths`` filters (the default architecture)."""
    return SeedCNN(widths, in_shape, num_classes)


def build_cnn(widths: tuple[int, ...] | list[int], in_shape: tuple[int, int, int] | list[int], num_classes: int, seed: int) -> SeedCNN:
    """A freshly initialised :class:`SeedCNN`, as :func:`kd_tune.distill.models.build` makes it: the seed fixes its
    weights whatever else used the global RNG, and they are channels_last (PyTorch's CPU max-pool with stride 1 is
    several times slower on NCHW tensors, and it dominated the student's step: 2.4x faster per step, see benchmarks/)."""
    model = build(model_args("cnn", {"widths": widths}, in_shape, num_classes), seed)
    assert isinstance(model, SeedCNN)
    return model
