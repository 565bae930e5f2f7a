"""A multilayer perceptron: the student of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network"
(784-800-800-10 on MNIST, and its 1200-unit teacher with dropout).

    Flatten -> Dropout(input_dropout) -> [Linear(h) -> ReLU -> Dropout(dropout)] per hidden size -> Linear(num_classes)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_tune.distill.models.registry import register_model


class MLP(nn.Module):
    """Hidden layers of ReLU units with dropout; the input image is flattened (any shape)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...] | list[int] = (800, 800),
                 dropout: float = 0.0, input_dropout: float = 0.0) -> None:
        super().__init__()
        sizes = [math.prod(in_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("mlp")
def mlp(in_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...] | list[int] = (800, 800), dropout: float = 0.0,
        input_dropout: float = 0.0) -> MLP:
    """The registry's ``mlp``: :class:`MLP`."""
    return MLP(in_shape, num_classes, tuple(hidden), dropout, input_dropout)
