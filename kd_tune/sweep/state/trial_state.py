"""A trial's checkpoints in the sweep's storage, and which one a restarted trial continues from."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from ray import tune

from kd_tune.distill.checkpoint import STATE_FILE, read_checkpoint, require_epoch
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.tune_state import LOST_CHECKPOINT_FILE


def persisted_states(storage: Storage, trial_dir: str) -> dict[int, dict[str, Any]]:
    """The trial's complete persisted checkpoints by epoch (``trial_dir`` is relative to the storage root);
    incomplete ones (a copy cut short by a kill) are left out."""
    out: dict[int, dict[str, Any]] = {}
    for folder in storage.list_dirs(trial_dir):
        if not folder.startswith("checkpoint_"):
            continue
        try:
            state = require_epoch(storage.torch_load(trial_dir, folder, STATE_FILE))
        except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
            continue
        out[int(state["epoch"])] = state
    return out


def newest_persisted(storage: Storage, trial_dir: str) -> dict[str, Any] | None:
    """The complete checkpoint with the highest epoch among the trial's persisted ones. (Also in Population Based Training:
    a member never takes weights from behind its own epoch, ``kd_tune.sweep.population``, so after an exploit its own
    folder's newest epochs are of its newest lineage.)"""
    states = persisted_states(storage, trial_dir)
    return states[max(states)] if states else None


def restore_state(storage: Storage, trial_dir: str) -> tuple[dict[str, Any] | None, int]:
    """The newest complete checkpoint of this trial, and the epoch Ray's own state knows of.

    After a SIGKILLed driver Ray's experiment state can lag behind what the trial had persisted, so
    the trial's folder in the storage is searched too; the newer of the two wins.
    """
    state, known_epoch = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
            known_epoch = int(state["epoch"]) if state else lost_checkpoint_epoch(Path(folder))
        if state is not None and is_donated(checkpoint.path, trial_dir):
            # Population Based Training cloned another member's checkpoint into this trial: that is what it continues
            # from, unless this trial's own folder already holds training that followed this very exploit (a driver
            # killed after the exploit and before Ray saved the trial's progress).
            on_disk = newest_persisted(storage, trial_dir)
            exploit = (known_epoch, state.get("label"))
            if on_disk is not None and on_disk["epoch"] > known_epoch and exploit in _exploits(on_disk):
                return on_disk, known_epoch
            return state, known_epoch
    on_disk = newest_persisted(storage, trial_dir)
    if on_disk is not None and on_disk["epoch"] > known_epoch:
        state = on_disk
    return state, known_epoch


def _exploits(state: dict[str, Any]) -> set[tuple[int, Any]]:
    """(epoch, donor label) of each exploit in a checkpoint's lineage (``kd_tune.space.lineage``)."""
    return {(int(x["epoch"]), x["donor"]) for x in (state.get("lineage") or {}).get("exploits") or ()}


def is_donated(checkpoint_path: str, trial_dir: str) -> bool:
    """Whether Ray's checkpoint for this trial lies in another trial's folder (a PBT exploit)."""
    return PurePosixPath(checkpoint_path.rstrip("/")).parent.name != PurePosixPath(trial_dir.rstrip("/")).name


def own_state_at(storage: Storage, trial_dir: str, epoch: int) -> dict[str, Any] | None:
    """This trial's own newest complete checkpoint up to ``epoch`` (what it had reported before an exploit)."""
    states = {e: s for e, s in persisted_states(storage, trial_dir).items() if e <= epoch}
    return states[max(states)] if states else None


def lost_checkpoint_epoch(folder: Path) -> int:
    """The epoch Ray knew for a checkpoint Tune had deleted (a stand-in, :func:`kd_tune.sweep.state.tune_state.restore_lost_checkpoints`),
    else 0 (an incomplete checkpoint: nothing known)."""
    try:
        return int(json.loads((folder / LOST_CHECKPOINT_FILE).read_text())["known_epoch"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0
