"""Reading schedules of alpha and T: an entry of ``grid.alpha`` or ``grid.temperature`` that is a mapping instead of a number.

.. code-block:: yaml

    grid:
      alpha:
        - 0.5                                              # a constant, as always
        - {shape: linear, start: 0.0, end: 0.7, over: 20}  # 0 -> 0.7 over epochs 1-20, then 0.7
        - {shape: cosine, start: 0.9, end: 0.1}            # over each trial's own epochs (no epoch sharing)
        - {shape: step, start: 0.9, end: 0.3, steps: 2, over: 30, warmup: 5}
      temperature: [4.0, {shape: linear, start: 8.0, end: 2.0, over: 20}]

Every value is checked as the key's numbers are (alpha in [0, 1], T > 0). See :mod:`kd_tune.space.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kd_tune.space.reader import Reader
from kd_tune.space.schedules import SHAPES, Schedule

KEYS = ("shape", "start", "end", "over", "warmup", "steps", "values")


def split_axis(r: Reader, key: str, raw: object, is_search: bool) -> tuple[object, tuple[Any, ...]]:
    """``raw`` without its schedule entries (what the key's number reader gets; None when only schedules were listed),
    and the (index, mapping) of each schedule entry."""
    if not isinstance(raw, list) or not any(isinstance(v, Mapping) and "shape" in v for v in raw):
        return raw, ()
    if is_search:
        first = next(v for v in raw if isinstance(v, Mapping))
        raise r.fail(key, dict(first), "numbers or a range {low, high} in a search (schedules are grid values; "
                                       "scheduler pbt or pb2 finds alpha and T that change during training)")
    numbers = [v for v in raw if not (isinstance(v, Mapping) and "shape" in v)]
    return numbers or None, tuple((i, v) for i, v in enumerate(raw) if isinstance(v, Mapping) and "shape" in v)


def read_schedule(r: Reader, key: str, raw: Mapping[str, Any], read: Callable[[str, object], float]) -> Schedule:
    """One schedule entry; ``read(key, value)`` checks each of its values as the axis checks its numbers."""
    v = r.section({key: raw}, key, KEYS, required=("shape",))
    shape = r.choice(f"{key}.shape", v["shape"], SHAPES)
    needs = {"constant": ("start",), "table": ("values",)}.get(shape, ("start", "end"))
    allowed = {"constant": ("shape", "start"), "table": ("shape", "values"), "step": KEYS[:6]}.get(shape, KEYS[:5])
    for k in v:
        if k not in allowed:
            raise r.fail(f"{key}.{k}", v[k], f"a key of a {shape} schedule: {', '.join(allowed)}")
    for k in needs:
        if k not in v:
            raise r.fail(f"{key}.{k}", "<missing>", f"this key is required for a {shape} schedule")
    if shape == "table":
        values = r.items(f"{key}.values", v["values"], read, unique=False)
        return Schedule("table", values[0], values=values)
    start = read(f"{key}.start", v["start"])
    end = read(f"{key}.end", v["end"]) if "end" in v else None
    over = r.integer(f"{key}.over", v["over"], 1) if "over" in v else None
    steps = r.integer(f"{key}.steps", v.get("steps", 1), 1)
    if over is not None and shape == "step" and steps >= over:
        raise r.fail(f"{key}.steps", steps, f"fewer steps than the ramp's {over} epochs ({key}.over)")
    return Schedule(shape, start, end, over=over, warmup=r.integer(f"{key}.warmup", v.get("warmup", 0), 0), steps=steps)
