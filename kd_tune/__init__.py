"""kd-tune: distributed hyperparameter sweeps for knowledge distillation (Ray Tune + MLflow + PyTorch).

From Python (docs/python-api.md)::

    import kd_tune

    sweep = kd_tune.run("search_spaces/smoke.yaml")       # or a dict: the same keys as the YAML file
    sweep.table()                                          # one row per grid point (a pandas DataFrame)
    kd_tune.load("smoke").best()                           # the configuration selected on validation, its gain over scratch

``run``, ``resume``, ``load``, ``Sweep`` (:mod:`kd_tune.api`) and the errors ``KdTuneError`` / ``UsageError``
(:mod:`kd_tune.errors`) are loaded when first used: ``import kd_tune`` loads neither torch, Ray, MLflow nor pandas.

Layers, each a subpackage that imports only those before it (tests/test_layers.py checks it): the core
(``errors``, ``files``, ``process``: the standard library), ``space`` (plain Python), ``data`` and ``distill`` (PyTorch),
``tracking`` (MLflow), ``report`` (pandas, MLflow reads), ``sweep`` (Ray Tune), then ``api`` (the Python API) and
``cli`` (the command, a thin layer over the API).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kd_tune.api import Sweep, load, replay, resume, run
    from kd_tune.errors import KdTuneError, UsageError

_LAZY = {"run": "kd_tune.api", "resume": "kd_tune.api", "load": "kd_tune.api", "replay": "kd_tune.api", "Sweep": "kd_tune.api",
         "KdTuneError": "kd_tune.errors", "UsageError": "kd_tune.errors"}

__all__ = ["KdTuneError", "Sweep", "UsageError", "load", "replay", "resume", "run"]


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups find it here
        return value
    raise AttributeError(f"module 'kd_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
