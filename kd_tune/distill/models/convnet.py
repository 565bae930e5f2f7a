"""A small conv net with pooling and dropout: Keras' ``mnist_cnn`` example, a strong teacher on a CPU (~99 % on MNIST
in a few epochs).

    Conv2d(c1, 3x3) -> ReLU -> Conv2d(c2, 3x3) -> ReLU -> MaxPool(2) -> Dropout(dropout)
    -> Flatten -> Linear(hidden) -> ReLU -> Dropout(hidden_dropout) -> Linear(num_classes)
"""

from __future__ import annotations

import torch
from torch import nn

from kd_tune.distill.models.registry import register_model


class ConvNet(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...] | list[int] = (32, 64),
                 hidden: int = 128, dropout: float = 0.25, hidden_dropout: float = 0.5) -> None:
        super().__init__()
        c, h, w = in_shape
        c1, c2 = channels
        features = c2 * ((h - 4) // 2) * ((w - 4) // 2)  # two valid 3x3 convolutions, then a 2x2 pool
        self.layers = nn.Sequential(
            nn.Conv2d(c, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(hidden_dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("convnet")
def convnet(in_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...] | list[int] = (32, 64), hidden: int = 128,
            dropout: float = 0.25, hidden_dropout: float = 0.5) -> ConvNet:
    """The registry's ``convnet``: :class:`ConvNet`."""
    return ConvNet(in_shape, num_classes, tuple(channels), hidden, dropout, hidden_dropout)
