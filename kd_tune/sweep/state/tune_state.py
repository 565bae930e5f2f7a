"""Ray Tune's saved state of a sweep: whether it can be restored, and its repair after a kill cut it short."""

from __future__ import annotations

import json
import os
import pickletools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_tune.errors import UsageError
from kd_tune.files import atomic_write_bytes
from kd_tune.space.schema import is_valid_name
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.sweep_files import SweepRecord, live_driver, sweep_path

EXPERIMENT_STATES = "experiment_state-*.json"  # Ray Tune's experiment state files (TuneController.CKPT_FILE_TMPL)
# Tune's other driver-side state, pickled (the CKPT_FILE_TMPL of BasicVariantGenerator, SearchGenerator, Searcher, CallbackList)
TUNE_PICKLED_STATES = ("basic-variant-state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl", "callback-states-*.pkl")
LOST_CHECKPOINT_FILE = "kd_tune_lost_checkpoint.json"  # in a stand-in for a checkpoint Tune deleted: see restore_lost_checkpoints
_CHECKPOINT_NAME = re.compile(rb"checkpoint_\d{6}")  # Tune's checkpoint folder names (a trial's checkpoint_000000, ...)


def can_restore(storage: Storage, name: str) -> bool:
    """Ray has saved this sweep's experiment state (it can be restored); a state cut short by a kill is
    repaired first where it can be (:func:`repair_experiment_state`): every reader of Ray's state asks this."""
    repair_experiment_state(storage, name)
    path = sweep_path(storage, name)
    if storage.is_local:
        # In a folder, Tuner.can_restore looks for exactly this (a file named like Tune's experiment state):
        # said here without importing Ray Tune, which takes a second of one core before a sweep or resume could start Ray.
        return any(Path(path).glob(EXPERIMENT_STATES))
    from ray import tune

    return bool(tune.Tuner.can_restore(path, storage_filesystem=storage.ray_filesystem))


def repair_experiment_state(storage: Storage, name: str) -> bool:
    """Put back a whole copy of the sweep's newest Ray experiment state, and of Tune's newest search and callback
    states, when a kill cut them short; True if it did.

    Why: Ray Tune writes ``experiment_state-*.json`` (and its search algorithm's state, ``basic-variant-state-*.json``
    for a grid, a pickle whatever its name) in its driver's staging folder, then copies them into the
    sweep's folder *in place*, so a driver SIGKILLed during the copy leaves a truncated file there that neither
    ``status`` nor a resume can read (seen in this project's kill tests, once for each kind: "Failed to restore the
    run state ... EOFError: Ran out of input" for the search state). The staging copy was complete
    before the copy began, and it stays in Ray's temporary folder on the driver's machine
    (``$RAY_TMPDIR`` or the system's, ``ray/session_*/artifacts/*/NAME/driver_artifacts/``): it replaces the
    truncated file, atomically. Only for a local or NFS sweep folder (an object store shows an object whole or
    not at all), and never while a driver runs (it may be writing the file)."""
    if not storage.is_local or live_driver(storage, name):
        return False
    repaired = False
    for newest, read in _newest_tune_states(Path(sweep_path(storage, name))):
        state = _read(newest, read)
        if state is _TORN:
            state = _put_back(newest, name, read)
            repaired |= state is not _TORN
        if read is _parsed_bytes and state is not _TORN:  # the experiment state: it names the checkpoints
            restore_lost_checkpoints(newest.parent, state)
    return repaired


def torn_tune_states(storage: Storage, name: str) -> list[Path]:
    """Tune's newest saved states of the sweep that are still cut short (no whole copy could put them back, see
    :func:`repair_experiment_state`): a resume cannot restore from them. Always empty for an object store."""
    if not storage.is_local:
        return []
    return [newest for newest, read in _newest_tune_states(Path(sweep_path(storage, name))) if _read(newest, read) is _TORN]


def _newest_tune_states(folder: Path) -> list[tuple[Path, Callable[[bytes], Any]]]:
    """The newest file of each kind of state Tune saved in the sweep's folder (Tune restores the newest: the latest
    name), each with its reader: the experiment state is JSON, the search and callback states pickles."""
    kinds: list[tuple[str, Callable[[bytes], Any]]] = [(EXPERIMENT_STATES, _parsed_bytes), *((p, _whole_pickle_or_torn) for p in TUNE_PICKLED_STATES)]
    found = ((sorted(folder.glob(pattern)), read) for pattern, read in kinds)
    return [(files[-1], read) for files, read in found if files]


def _put_back(torn: Path, name: str, read: Callable[[bytes], Any]) -> Any:
    """Replace ``torn`` (atomically) with the newest whole copy of it in a Ray driver's staging folder on this machine;
    returns that copy as ``read`` gives it, or ``_TORN`` when there is none (the file is then left as it is)."""
    temp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    staged = sorted(temp.glob(f"session_*/artifacts/*/{name}/driver_artifacts/{torn.name}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for copy in staged:
        blob = copy.read_bytes()
        value = read(blob)
        if value is not _TORN:
            atomic_write_bytes(torn, blob)
            return value
    return _TORN


def restore_lost_checkpoints(sweep_folder: Path, state: Any) -> list[Path]:
    """Stand-ins for the checkpoints Ray's saved experiment state names but Tune has deleted; returns them.

    Why: with ``CheckpointConfig(num_to_keep=2)`` Tune deletes a trial's older checkpoints as soon as newer ones
    are registered, and writes its experiment state (which names the checkpoints it keeps) only every few
    seconds, in the background. A driver SIGKILLed in between leaves a state naming deleted checkpoints: the
    resume then fails to restore the trial ("does not exist on storage anymore") or to delete its oldest one
    (seen once in this project's kill tests). Each missing folder is made again, holding only
    :data:`LOST_CHECKPOINT_FILE` with the epoch of the trial's last result that Ray knows (for the checkpoint
    the trial restores from). The trial then starts from its newest complete checkpoint on disk
    (:func:`kd_tune.sweep.state.trial_state.restore_state`) and reports again the epochs Ray has not seen. ``state``: the parsed
    experiment state file of ``sweep_folder``."""
    trials = state.get("trial_data") if isinstance(state, dict) else None
    made = []
    for entry in trials if isinstance(trials, list) else []:
        try:
            trial_json, runtime_json = entry
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            folder = sweep_folder / trial["relative_logdir"]
            pickled = bytes.fromhex((runtime.get("checkpoint_manager") or {}).get("value") or "")
            last = runtime.get("last_result") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a trial as Ray 2.60 writes it: left to Ray
        if not folder.is_dir():
            continue
        for ref in sorted({m.decode() for m in _CHECKPOINT_NAME.findall(pickled)}):
            target = folder / ref
            if target.exists():
                continue
            known = last.get("epoch") if last.get("checkpoint_dir_name") == ref else None
            staging = folder / f".{ref}.tmp"
            staging.mkdir(exist_ok=True)
            (staging / LOST_CHECKPOINT_FILE).write_text(json.dumps({"known_epoch": known}))
            staging.rename(target)  # whole or not at all
            made.append(target)
    return made


_TORN = object()  # what _read gives for a file that is missing, or not whole (JSON cut short, a pickle without its end)


def _read(path: Path, read: Callable[[bytes], Any]) -> Any:
    """``read`` of the file's bytes; ``_TORN`` for a file that cannot be read."""
    try:
        return read(path.read_bytes())
    except OSError:
        return _TORN


def _whole_pickle_or_torn(blob: bytes) -> Any:
    return blob if _whole_pickle_bytes(blob) else _TORN


def _whole_pickle_bytes(blob: bytes) -> bool:
    """A pickle stream that runs to its STOP opcode: walked by ``pickletools``, which reads opcodes without
    executing them (nothing imported, nothing built), so a file cut short anywhere is told from a whole one."""
    try:
        ops = list(pickletools.genops(blob))
    except Exception:  # noqa: BLE001 - a truncated stream raises whatever the cut opcode's reader raises
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _parsed_bytes(blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except ValueError:
        return _TORN


def known_sweeps(storage: Storage) -> list[str]:
    """Names of the kd-tune sweeps in a storage folder (a record and Ray's state beside it)."""
    return [n for n in storage.list_dirs() if is_valid_name(n) and SweepRecord.exists(storage, n) and can_restore(storage, n)]


def require_sweep(storage: Storage, name: str, hint: str = "") -> str:
    """The sweep's folder; raises :class:`UsageError` listing the known sweeps when there is none of that name."""
    path = sweep_path(storage, name)
    if not can_restore(storage, name) or not SweepRecord.exists(storage, name):
        raise UsageError(f"no sweep named {name!r} in {storage.show()}; allowed: {', '.join(known_sweeps(storage)) or 'none there yet' + hint}")
    return path
