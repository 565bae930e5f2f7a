"""A sweep's own files in its storage folder, beside Ray Tune's experiment state.

``<storage>/<name>/`` is Ray Tune's experiment folder; kd-tune adds the validated space (``kd_tune_space.yaml``,
so a resume needs no original file), the sweep's tracking record (``kd_tune_sweep.json``: where it is tracked in
MLflow), the runs' datasets (``kd_tune_tracking.json``) and, while a driver runs, the driver file (its pid and
host, so a second driver is refused). A name is never a path out of the storage.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kd_tune.errors import FlagError, UsageError
from kd_tune.space.schema import NAME_ALLOWED, is_valid_name
from kd_tune.sweep.state.storage import Storage, resolve_storage

SPACE_FILE = "kd_tune_space.yaml"  # the validated spec, kept beside Ray's experiment state
SWEEP_FILE = "kd_tune_sweep.json"  # where the sweep is tracked (MLflow URI, experiment, parent run)
DRIVER_FILE = "kd_tune_driver.json"  # pid and host of the driver while a sweep runs
TRACKING_FILE = "kd_tune_tracking.json"  # the runs' datasets and a model input: what kd-tune sync needs to make a run


def sweep_path(storage: Storage, name: str) -> str:
    """The sweep's folder in the storage's filesystem. Raises :class:`FlagError` for a name that is not
    allowed or that would leave the storage folder."""
    if not is_valid_name(name):
        raise FlagError("sweep name", name, NAME_ALLOWED, "is not allowed")
    path = storage.path(name)
    if storage.is_local and Path(path).resolve().parent != Path(storage.root):
        raise FlagError("sweep name", name, NAME_ALLOWED, f"is a path out of the storage folder {storage.root}")
    return path


@dataclass(frozen=True)
class SweepRecord:
    """Where a sweep is tracked, kept beside it (``kd_tune_sweep.json``) so a resume reattaches."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def save(self, storage: Storage) -> None:
        storage.write_text(json.dumps(asdict(self), indent=2), self.name, SWEEP_FILE)

    @classmethod
    def load(cls, storage: Storage, name: str) -> SweepRecord:
        return cls(**json.loads(storage.read_text(name, SWEEP_FILE)))

    @staticmethod
    def exists(storage: Storage, name: str) -> bool:
        return storage.exists(name, SWEEP_FILE)


def save_tracking_inputs(storage: Storage, name: str, inputs: Mapping[float, Sequence[Any]], example: Any) -> None:
    """The child runs' datasets (per label-noise level) and the logged models' example input, beside the
    sweep: a record rebuilt from storage (``kd-tune sync``) gets the same datasets and models."""
    blob = {"inputs": {str(k): [asdict(d) for d in v] for k, v in inputs.items()},
            "example": None if example is None else {"shape": list(example.shape), "values": example.ravel().tolist()}}
    storage.write_text(json.dumps(blob), name, TRACKING_FILE)


def load_tracking_inputs(storage: Storage, name: str) -> tuple[dict[float, list[Any]], Any]:
    """What :func:`save_tracking_inputs` wrote (no datasets and no example where it never got to write them)."""
    import numpy as np

    from kd_tune.tracking.datasets import DataInput

    if not storage.exists(name, TRACKING_FILE):
        return {}, None
    blob = json.loads(storage.read_text(name, TRACKING_FILE))
    inputs = {float(k): [DataInput(**d) for d in v] for k, v in blob["inputs"].items()}
    ex = blob.get("example")
    example = None if ex is None else np.asarray(ex["values"], dtype=np.float32).reshape(ex["shape"])
    return inputs, example


def resume_command(name: str, storage: Storage) -> str:
    default = resolve_storage(None)
    return f"kd-tune resume {name}" + ("" if storage.given == default.given else f" --storage {shlex.quote(storage.given)}")


def live_driver(storage: Storage, name: str) -> dict[str, Any] | None:
    """The sweep's driver (pid, host) if one runs: this machine's is checked by pid; another
    machine's is assumed to run (its file is removed when it ends)."""
    try:
        info: dict[str, Any] = json.loads(storage.read_text(name, DRIVER_FILE))
    except (OSError, ValueError):
        return None
    if info.get("host") != socket.gethostname():
        return info
    try:
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def refuse_second_driver(storage: Storage, name: str) -> None:
    """Raises :class:`UsageError` when a driver runs this sweep already (one driver per sweep)."""
    driver = live_driver(storage, name)
    if driver:
        where = storage.show(name, DRIVER_FILE)
        gone = "" if driver["host"] == socket.gethostname() else f"; if that machine is gone, delete {where} and run this again"
        raise UsageError(f"sweep {name!r} is running now (driver pid {driver['pid']} on {driver['host']}, see {where}){gone}; "
                         "allowed: one driver per sweep")


def claim_driver(storage: Storage, name: str) -> None:
    """This process drives the sweep now (:func:`release_driver` when it ends)."""
    storage.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), name, DRIVER_FILE)


def release_driver(storage: Storage, name: str) -> None:
    storage.delete(name, DRIVER_FILE)
