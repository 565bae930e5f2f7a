"""One checkpoint format, shared by the trainable (which writes it) and the tracking callback
(which logs the model from it), and the model file logged to MLflow.

A checkpoint is one file, ``state.pt``, written atomically, so that model, optimizer and epoch can
never disagree. Like nanoGPT's, it carries the model's construction arguments (``model_args``:
widths, input shape, classes) beside the weights, so a checkpoint or a logged ``student.pt`` rebuilds
its model without the search space that made it. Everything is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch

from kd_tune.models import SeedCNN, build_model
from kd_tune.storage import Storage

STATE_FILE = "state.pt"


def save_checkpoint(folder: Path, model: SeedCNN, optimizer: torch.optim.Optimizer, history: list[dict[str, float]],
                    confusion: list[list[int]]) -> None:
    """Weights and their model_args, optimizer, every epoch's metrics so far and this epoch's confusion
    matrix, in one file written atomically."""
    state = {"model": model.state_dict(), "model_args": model.model_args, "optimizer": optimizer.state_dict(),
             "epoch": int(history[-1]["epoch"]), "history": history, "confusion": confusion}
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def save_pack_checkpoint(folder: Path, epoch: int, members: dict[str, dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
    """A pack's checkpoint, one file written atomically like :func:`save_checkpoint`'s: the pack's epoch, its
    optimizer (over the packed parameters) and per member label an ordinary student checkpoint state
    (``model``, ``model_args``, ``epoch``, ``history``, ``confusion``; a diverged member also ``diverged``:
    its epoch and loss), so that a member's entry is what :func:`model_from_state` and the tracking read."""
    state = {"epoch": int(epoch), "pack": True, "optimizer": optimizer.state_dict(), "members": members}
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def is_pack_state(state: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Whether a checkpoint state is a pack's (:func:`save_pack_checkpoint`)."""
    return state is not None and "members" in state


def pack_results(state: Mapping[str, Any], after: int = 0) -> list[dict[str, Any]]:
    """The per-epoch results a pack reported up to its checkpoint ``state`` (after epoch ``after``), rebuilt
    from its members' histories: ``{"epoch", "members": {label: metrics}, "diverged_members"}``, a member
    that diverged at that epoch as ``{"epoch", "diverged": 1.0, "diverged_loss"}``."""
    out = []
    members: Mapping[str, Mapping[str, Any]] = state["members"]
    for epoch in range(after + 1, int(state["epoch"]) + 1):
        now: dict[str, dict[str, Any]] = {}
        for label, m in members.items():
            for h in m["history"]:
                if int(h["epoch"]) == epoch:
                    now[label] = dict(h)
            d = m.get("diverged")
            if d and int(d["epoch"]) == epoch:
                now[label] = diverged_result(epoch, d["loss"])
        if now:
            gone = sorted(label for label, m in members.items() if m.get("diverged") and int(m["diverged"]["epoch"]) <= epoch)
            out.append({"epoch": epoch, "members": now, "diverged_members": ",".join(gone)})
    return out


def diverged_result(epoch: int, loss: float) -> dict[str, Any]:
    """A member's result at the epoch its loss went NaN or infinite."""
    return {"epoch": epoch, "diverged": 1.0, "diverged_loss": float(loss)}


def read_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state, or None if it is missing or incomplete (a copy cut short by a kill)."""
    try:
        return _complete(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
        return None


def _complete(state: dict[str, Any]) -> dict[str, Any]:
    int(state["epoch"])  # raises on a state without its epoch
    return state


def persisted_states(storage: Storage, trial_dir: str) -> dict[int, dict[str, Any]]:
    """The trial's complete persisted checkpoints by epoch (``trial_dir`` is relative to the storage root);
    incomplete ones (a copy cut short by a kill) are left out."""
    out: dict[int, dict[str, Any]] = {}
    for folder in storage.list_dirs(trial_dir):
        if not folder.startswith("checkpoint_"):
            continue
        try:
            state = _complete(storage.torch_load(trial_dir, folder, STATE_FILE))
        except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
            continue
        out[int(state["epoch"])] = state
    return out


def newest_persisted(storage: Storage, trial_dir: str) -> dict[str, Any] | None:
    """The complete checkpoint with the highest epoch among the trial's persisted ones."""
    states = persisted_states(storage, trial_dir)
    return states[max(states)] if states else None


def save_model_file(path: Path, model_args: dict[str, Any] | None, state_dict: dict[str, torch.Tensor]) -> None:
    """The weights alone (no optimizer state) with their model_args: what MLflow keeps of a trained model."""
    torch.save({"model_args": model_args, "model": state_dict}, path)


def load_model_file(path: str | Path) -> SeedCNN:
    """A model saved by :func:`save_model_file` (or a checkpoint), rebuilt and ready to evaluate."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_state(blob)


def model_from_state(state: dict[str, Any]) -> SeedCNN:
    """Rebuild the model of a checkpoint or model file from its model_args and weights."""
    args = state["model_args"]
    model = build_model(args["widths"], args["in_shape"], args["num_classes"], seed=0)
    model.load_state_dict(state["model"])
    return model.eval()
