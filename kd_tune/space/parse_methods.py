"""Reading the ``grid.method`` axis: each entry a method with its own knobs, validated against that method's.

.. code-block:: yaml

    grid:
      alpha: [0.1, 0.5]            # every entry's, unless it sets its own
      temperature: [4.0]
      method:
        - kd                                                # a name: the method with its defaults
        - {method: kd, standardize: true, temperature: [2.0]}
        - {method: dkd, alpha: [1.0], nckd_weight: [2.0, 8.0], warmup: 5}
        - {method: dist, alpha: [1.0], inter_weight: [1.0, 2.0], intra_weight: [1.0, 2.0]}

A knob's value is one value or a list (an axis); in a search, a numeric knob may also be a range ``{low, high, log}``.
A key that is not the entry's method's gets one line naming the method and its keys. Two entries that give the same
trial are refused when the whole grid is known (:func:`kd_tune.space.parse.parse_space`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kd_tune.space.methods import DEFAULT_METHOD, METHOD_KEYS, METHODS, SKEWED, Knob
from kd_tune.space.reader import Reader
from kd_tune.space.schema import Axis, KnobAxis, MethodEntry, Range, SearchSpec


def read_methods(r: Reader, raw: object, search: SearchSpec, read_axis: Callable[[str, object, Callable[..., float]], Axis],
                 alpha: Callable[..., float], temperature: Callable[..., float]) -> tuple[MethodEntry, ...]:
    """The ``grid.method`` list (empty when the key is absent). ``read_axis(key, value, read)`` reads an alpha or T axis
    as the grid's own are read; ``alpha`` and ``temperature`` read one value of each."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise r.fail("grid.method", raw, f"a non-empty list of methods ({', '.join(METHODS)}), each a name or a mapping such as "
                                         "{method: dkd, nckd_weight: [2.0, 8.0]}")
    return tuple(_entry(r, f"grid.method[{i}]", item, search, read_axis, alpha, temperature) for i, item in enumerate(raw))


def _entry(r: Reader, key: str, item: object, search: SearchSpec, read_axis: Callable[[str, object, Callable[..., float]], Axis],
           alpha: Callable[..., float], temperature: Callable[..., float]) -> MethodEntry:
    if isinstance(item, str):
        item = {"method": item}
    if not isinstance(item, Mapping):
        raise r.fail(key, item, f"a method's name ({', '.join(METHODS)}) or a mapping with 'method' and that method's knobs")
    name = r.choice(f"{key}.method", item.get("method", DEFAULT_METHOD), tuple(METHODS))
    method = METHODS[name]
    allowed = METHOD_KEYS + method.knob_names
    for k in item:
        if k not in allowed:
            raise r.fail(f"{key}.{k}", item[k], f"a key of method {name}: {', '.join(allowed)}")
    knobs = tuple((k.name, _knob_axis(r, f"{key}.{k.name}", item[k.name], k, search)) for k in method.knobs if k.name in item)
    given = dict(knobs)
    if "skew" in given:
        divergences = given.get("divergence", (method.knob("divergence").default,))
        if isinstance(divergences, tuple) and not any(d in SKEWED for d in divergences):
            raise r.fail(f"{key}.skew", item["skew"], f"no skew without a skewed divergence ({' or '.join(SKEWED)} in {key}.divergence)")
    return MethodEntry(
        method=name,
        knobs=knobs,
        alpha=read_axis(f"{key}.alpha", _listify(item["alpha"]), alpha) if "alpha" in item else None,
        temperature=read_axis(f"{key}.temperature", _listify(item["temperature"]), temperature) if "temperature" in item else None,
    )


def _listify(value: object) -> object:
    """One value stands for a list of one (a knob or an entry's alpha set once)."""
    return value if isinstance(value, list | Mapping) else [value]


def _knob_axis(r: Reader, key: str, value: object, knob: Knob, search: SearchSpec) -> KnobAxis:
    """One knob's values: listed, or for a search a range of a numeric knob."""
    if isinstance(value, Mapping):
        if not search.is_search or knob.kind not in ("float", "int"):
            raise r.fail(key, dict(value), f"{knob.allowed()}, or a list of such" + (" (a range {low, high} needs a search and a numeric knob)"))
        v = r.section({key: value}, key, ("low", "high", "log"), required=("low", "high"))
        log = v.get("log", False)
        if not isinstance(log, bool):
            raise r.fail(f"{key}.log", log, "true (sample log-uniformly) or false (uniformly)")
        low, high = _value(r, f"{key}.low", v["low"], knob), _value(r, f"{key}.high", v["high"], knob)
        if log and low <= 0:
            raise r.fail(f"{key}.low", v["low"], "a number > 0 (a log range)")
        if not low < high:
            raise r.fail(f"{key}.high", v["high"], f"a number above {key}.low ({low:g})")
        return Range(float(low), float(high), log)
    if not isinstance(value, list):
        return (_value(r, key, value, knob),)
    return r.items(key, value, lambda k, x: _value(r, k, x, knob))


def _value(r: Reader, key: str, value: object, knob: Knob) -> Any:
    if knob.kind == "choice":
        return r.choice(key, value, knob.choices)
    if knob.kind == "bool":
        if not isinstance(value, bool):
            raise r.fail(key, value, knob.allowed())
        return value
    if knob.kind == "int":
        hi = None if knob.high == float("inf") else int(knob.high)
        return r.integer(key, value, int(knob.low), hi)
    return r.number(key, value, knob.low, knob.high, lo_open=knob.lo_open, hi_open=knob.hi_open)
