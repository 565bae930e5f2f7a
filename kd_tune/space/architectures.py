"""The architectures a search space may name, and each one's arguments: typed, with defaults and allowed values.

This is the spec side of the model registry (:mod:`kd_tune.distill.models`: the networks themselves, in PyTorch):
plain Python, so a search space is validated, and ``kd-tune plan`` answers, without importing torch. A family's
arguments are checked here by name, type and range; a user's own factory (``arch: "package.module:factory"``) takes
whatever ``args`` it declares, checked when the sweep builds it once before anything starts.

Adding an architecture: its module in ``kd_tune/distill/models/`` (``@register_model("name")``) and its entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
FACTORY_ALLOWED = "an architecture of the registry, or your own factory as 'package.module:function' (importable on every node)"

Check = Callable[[str, object], Any]
"""``check(key, value)``: the value as the factory takes it; raises :class:`ArgError` for a bad one."""


class ArgError(ValueError):
    """A bad architecture argument: which key (``student.hidden[1]``), its value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {value!r}; allowed: {allowed}")


def int_list(length: int | None = None, what: str = "", hi: int = 65536) -> Check:
    """A list of integers in [1, hi] (of exactly ``length`` items when given); ``what`` they are, for the message."""

    def check(key: str, value: object) -> tuple[int, ...]:
        allowed = (f"a list of {length} positive integers" if length else "a non-empty list of positive integers") + (f" ({what})" if what else "")
        if not isinstance(value, list | tuple) or not value:
            raise ArgError(key, value, allowed)
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ArgError(f"{key}[{i}]", v, f"an integer in [1, {hi}]")
        if length and len(value) != length:
            raise ArgError(key, list(value), allowed)
        return tuple(value)

    return check


def fraction(key: str, value: object) -> float:
    """A dropout probability: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ArgError(key, value, "a number in [0, 1)")
    return float(value)


def positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise ArgError(key, value, "an integer in [1, 65536]")
    return value


@dataclass(frozen=True)
class Family:
    """One architecture of the registry: its arguments (name -> (check, default)) and whether its students pack."""

    name: str
    doc: str
    args: Mapping[str, tuple[Check, Any]] = field(default_factory=dict)
    packs: bool = False
    """Whether K students of it train as one packed model (``kd_tune.distill.packed``); else one student per trial."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("cnn", "the study's CNN: two strided 3x3 convolutions (widths filters), a stride-1 max-pool, a linear classifier",
           {"widths": (int_list(2, "filters of the two convolutions"), (16, 32))}, packs=True),
    Family("mlp", "a multilayer perceptron: hidden layers of ReLU units, dropout on the input and on each hidden layer",
           {"hidden": (int_list(None, "units of each hidden layer"), (800, 800)), "dropout": (fraction, 0.0), "input_dropout": (fraction, 0.0)},
           packs=True),
    Family("convnet", "a small conv net (Keras' mnist_cnn): two 3x3 convolutions with ReLU, a 2x2 max-pool, dropout, a hidden "
           "dense layer, dropout, the classifier (~99 % on MNIST in a few CPU epochs)",
           {"channels": (int_list(2, "filters of the two convolutions"), (32, 64)), "hidden": (positive_int, 128), "dropout": (fraction, 0.25),
            "hidden_dropout": (fraction, 0.5)}),
    *(Family(f"resnet{d}", f"the CIFAR ResNet-{d} of the KD literature (RepDistiller): BasicBlocks, BatchNorm, 16/32/64 filters")
      for d in (8, 14, 20, 32, 44, 56, 110)),
    *(Family(f"resnet{d}x4", f"the CIFAR ResNet-{d}x4 of RepDistiller: BasicBlocks, BatchNorm, 64/128/256 filters")
      for d in (8, 32)),
)}
ALLOWED = f"one of {', '.join(FAMILIES)}, or 'package.module:function' (your own factory)"


def is_factory(arch: str) -> bool:
    """``package.module:function``: a user's own factory, imported where models are built."""
    return bool(FACTORY_PATTERN.match(arch))


def packs(arch: str) -> bool:
    """Whether students of ``arch`` train packed (a user factory never does: kd-tune cannot stack an unknown model)."""
    family = FAMILIES.get(arch)
    return family is not None and family.packs
