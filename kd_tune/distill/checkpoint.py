"""One checkpoint format, shared by the trainable (which writes it) and the tracking (which logs the model from
it), and the model file logged to MLflow.

A checkpoint is one file, ``state.pt``, written atomically, so that model, optimizer and epoch can never
disagree. Like nanoGPT's, it carries the model's construction arguments (``model_args``: architecture, its
arguments, input shape, classes; :func:`kd_tune.distill.models.model_args`) beside the weights, so a checkpoint
or a logged ``student.pt`` rebuilds its model without the search space that made it. Everything is read with
``weights_only=True``: no code is unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from kd_tune.distill.models import build
from kd_tune.distill.optim import Optimizer
from kd_tune.files import atomic_write_bytes
from kd_tune.space.trial_report import StudentEpoch, TrialReport

STATE_FILE = "state.pt"


def save_checkpoint(folder: Path, model_args: Mapping[str, Any], model: nn.Module, optimizer: Optimizer,
                    history: list[dict[str, float]], confusion: list[list[int]], extra: Mapping[str, Any] | None = None) -> None:
    """Weights and their ``model_args``, optimizer, every epoch's metrics so far and this epoch's confusion
    matrix, in one file written atomically. ``extra``: more plain values (the trial's label, its lineage: what a
    Population Based Training exploit reads back)."""
    state = {"model": model.state_dict(), "model_args": dict(model_args), "optimizer": optimizer.state_dict(),
             "epoch": int(history[-1]["epoch"]), "history": history, "confusion": confusion, **(extra or {})}
    save_state(folder / STATE_FILE, state)


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` of ``state``, written atomically (:func:`kd_tune.files.atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def save_pack_checkpoint(folder: Path, epoch: int, members: dict[str, dict[str, Any]], optimizer: Optimizer) -> None:
    """A pack's checkpoint, one file written atomically like :func:`save_checkpoint`'s: the pack's epoch, its
    optimizer (over the packed parameters) and per member label an ordinary student checkpoint state
    (``model``, ``model_args``, ``epoch``, ``history``, ``confusion``; a diverged member also ``diverged``:
    its epoch and loss), so that a member's entry is what :func:`model_from_state` and the tracking read."""
    state = {"epoch": int(epoch), "pack": True, "optimizer": optimizer.state_dict(), "members": members}
    save_state(folder / STATE_FILE, state)


def is_pack_state(state: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    """Whether a checkpoint state is a pack's (:func:`save_pack_checkpoint`)."""
    return state is not None and "members" in state


def pack_results(state: Mapping[str, Any], after: int = 0) -> list[TrialReport]:
    """The reports a pack made up to its checkpoint ``state`` (after epoch ``after``), rebuilt from its members'
    histories: each epoch's members that trained it, or diverged in it (:class:`~kd_tune.space.trial_report.TrialReport`)."""
    out = []
    members: Mapping[str, Mapping[str, Any]] = state["members"]
    for epoch in range(after + 1, int(state["epoch"]) + 1):
        now: dict[str, StudentEpoch] = {}
        for label, m in members.items():
            for h in m["history"]:
                if int(h["epoch"]) == epoch:
                    now[label] = StudentEpoch.of(h)
            d = m.get("diverged")
            if d and int(d["epoch"]) == epoch:
                now[label] = StudentEpoch(epoch, diverged_loss=float(d["loss"]))
        if now:
            gone = [label for label, m in members.items() if m.get("diverged") and int(m["diverged"]["epoch"]) <= epoch]
            out.append(TrialReport.pack(epoch, now, gone))
    return out


def trial_results(state: Mapping[str, Any] | None, after: int = 0) -> list[TrialReport]:
    """The reports a trial made up to its checkpoint ``state`` (after epoch ``after``): a pack's (:func:`pack_results`) or
    one student's, whose checkpoint holds its history (none without a state)."""
    if state is None:
        return []
    if is_pack_state(state):
        return pack_results(state, after)
    return [TrialReport.one(StudentEpoch.of(m)) for m in state.get("history", []) if int(m["epoch"]) > after]


def read_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state, or None if it is missing or incomplete (a copy cut short by a kill)."""
    try:
        return require_epoch(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - any unreadable file is an incomplete checkpoint
        return None


def require_epoch(state: dict[str, Any]) -> dict[str, Any]:
    int(state["epoch"])  # raises on a state without its epoch
    return state


def save_model_file(path: Path, model_args: Mapping[str, Any] | None, state_dict: Mapping[str, torch.Tensor]) -> None:
    """The weights alone (no optimizer state) with their model_args: what MLflow keeps of a trained model."""
    save_state(path, {"model_args": None if model_args is None else dict(model_args), "model": dict(state_dict)})


def load_model_file(path: str | Path) -> nn.Module:
    """A model saved by :func:`save_model_file` (or a checkpoint), rebuilt and ready to evaluate."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_state(blob)


def model_from_state(state: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model of a checkpoint or model file from its model_args and weights."""
    model = build(state["model_args"], seed=0)
    model.load_state_dict(state["model"])
    return model.eval()
