"""One checkpoint format, shared by the trainable (which writes it) and the tracking callback
(which logs the model from it), and the model file logged to MLflow.

A checkpoint is one file, ``state.pt``, written atomically, so that model, optimizer and epoch can
never disagree. Like nanoGPT's, it carries the model's construction arguments (``model_args``:
widths, input shape, classes) beside the weights, so a checkpoint or a logged ``student.pt`` rebuilds
its model without the search space that made it. Everything is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
