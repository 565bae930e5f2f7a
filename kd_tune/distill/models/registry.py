"""The model registry itself: :func:`register_model`, :data:`MODELS`, :func:`model_args`, :func:`factory_of`,
:func:`build`, :func:`count_parameters`. A leaf: the family modules (``cnn.py``, ``mlp.py``, ...) import it to register
themselves, and :mod:`kd_tune.distill.models` re-exports it and imports the families, so imports run one way only
(package -> families -> registry).
"""

from __future__ import annotations

import importlib
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


def factory_of(arch: str) -> Factory:
    """The factory of a registered architecture, or of a user's ``package.module:function`` (imported now).

    Raises ValueError naming what is wrong (not registered, not importable, not a callable)."""
    if arch in MODELS:
        return MODELS[arch]
    module, sep, name = arch.partition(":")
    if not sep:
        raise ValueError(f"{arch!r} is not registered ({', '.join(MODELS)}) nor a 'package.module:function'")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {arch!r}: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise ValueError(f"{arch!r} is not a function")
    return factory


def build(margs: Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised model of ``margs`` (:func:`model_args`); the seed fixes its weights whatever else used the
    global RNG. Weights are channels_last (what every family's convolutions run fastest in on a CPU)."""
    factory = factory_of(margs["arch"])
    c, h, w = margs["in_shape"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(in_shape=(c, h, w), num_classes=int(margs["num_classes"]), **margs["args"])
    if not isinstance(model, nn.Module):
        raise ValueError(f"{margs['arch']!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
