"""The typed readers of a search space's values: each knows the file it reads, so a bad value becomes one
:class:`~kd_tune.errors.SpaceError` naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kd_tune.errors import SpaceError

T = TypeVar("T")


class Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.default_pad = 2
        """An ``augment_pad`` left out: 4 for the dataset's images of 32 pixels or more (CIFAR's crops), else 2 (digits' shifts)."""

    def fail(self, key: str, value: object, allowed: str) -> SpaceError:
        return SpaceError(self.source, key, value, allowed)

    def section(self, data: Mapping[str, Any], key: str, allowed_keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
        value = data.get(key, {}) if key else data
        if value is None and key:
            value = {}
        if not isinstance(value, Mapping):
            raise self.fail(key, value, f"a mapping with keys {', '.join(allowed_keys)}")
        for k in value:
            if k not in allowed_keys:
                raise self.fail(_join(key, str(k)), value[k], f"known keys of '{key or 'top level'}': {', '.join(allowed_keys)}")
        for k in required:
            if k not in value:
                raise self.fail(_join(key, k), "<missing>", "this key is required")
        return dict(value)

    def number(self, key: str, value: object, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
        allowed = f"a number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, value, allowed)
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise self.fail(key, value, allowed)
        return float(value)

    def integer(self, key: str, value: object, lo: int, hi: int | None = None) -> int:
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise self.fail(key, value, allowed)
        return value

    def choice(self, key: str, value: object, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, value, f"one of {', '.join(choices)}")
        return value

    def items(self, key: str, value: object, read: Callable[[str, object], T], *, unique: bool = True) -> tuple[T, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, value, "a non-empty list")
        out = tuple(read(f"{key}[{i}]", v) for i, v in enumerate(value))
        if unique and len(set(out)) != len(out):
            raise self.fail(key, value, "a list without repeated values")
        return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:g}"
