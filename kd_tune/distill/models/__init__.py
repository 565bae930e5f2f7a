"""Models by name: a registry of architecture families, each a factory ``(in_shape, num_classes, **args) -> nn.Module``.

A family registers itself with :func:`register_model` in its own module of this package (``cnn.py``: the
study's CNN). What rebuilds any model is its *model args*, ``{"arch", "args", "in_shape", "num_classes"}``
(:func:`model_args`): checkpoints, teacher caches and logged model files keep them beside the weights, so a
model rebuilds from its file alone (:func:`build`).

PyTorch only, like the whole training layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

Factory = Callable[..., nn.Module]
"""``factory(in_shape=(C, H, W), num_classes=n, **args)``: a freshly initialised model."""
MODELS: dict[str, Factory] = {}
"""Architecture name -> its factory."""

F = TypeVar("F", bound=Factory)


def register_model(name: str) -> Callable[[F], F]:
    """Register a family's factory under ``name`` (a decorator)."""

    def add(factory: F) -> F:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        return factory

    return add


def model_args(arch: str, args: Mapping[str, Any], in_shape: tuple[int, ...] | list[int], num_classes: int) -> dict[str, Any]:
    """What :func:`build` needs to rebuild a model: plain values, saved beside its weights."""
    return {"arch": arch, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
            "in_shape": list(in_shape), "num_classes": int(num_classes)}


def build(margs: Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised model of ``margs`` (:func:`model_args`); the seed fixes its weights whatever else used the
    global RNG. Weights are channels_last (what every family's convolutions run fastest in on a CPU)."""
    factory = MODELS[margs["arch"]]
    c, h, w = margs["in_shape"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(in_shape=(c, h, w), num_classes=int(margs["num_classes"]), **margs["args"])
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The families: each module registers itself on import.
from kd_tune.distill.models import cnn  # noqa: E402, F401
