"""A pre-trained teacher read from a file: a kd-tune model file or checkpoint (weights with their model args, read with
``weights_only=True``: no code is unpickled), a teacher kd-tune cached (``<storage>/_teachers/<key>/teacher.pt``, its
model args in the ``meta.json`` beside it), or a ``torch.export`` archive (``.pt2``, MLflow 3's format for PyTorch
models). Plain PyTorch: an MLflow model URI is resolved to such a file by the tracking layer first.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_tune.distill.checkpoint import is_pack_state, model_from_state
from kd_tune.space.sections import CACHED_TEACHER


class Exported(nn.Module):
    """A ``torch.export`` program as a module: it was captured in eval mode (as MLflow logs a model) and stays so;
    ``train()`` and ``eval()`` only set this wrapper's flag (the program itself refuses them)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.program(x.contiguous())
        return out


def file_digest(path: str | Path) -> str:
    """sha256 of the file: what caches the teacher's logits (another file, or the same file changed, is another teacher)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CACHED_META = "meta.json"
"""Beside a cached teacher's weights and logits (``CACHED_TEACHER``, :class:`kd_tune.sweep.teacher_cache.TeacherCache`):
the meta that holds their model args and vouches for them by sha256."""
WHERE_TEACHERS_ARE = ("a finished sweep's teacher is <storage>/_teachers/<key>/teacher.pt (or that folder), or its MLflow "
                      "run's runs:/<run id>/model/teacher.pt")


def model_file(path: str | Path) -> Path:
    """The file to read for ``path``: a cached teacher's folder means its ``teacher.pt``."""
    path = Path(path)
    return path / CACHED_TEACHER if path.is_dir() else path


def _cached_teacher(path: Path, blob: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """A cached teacher's weights with the model args of its ``meta.json`` (a model file's ``model_args`` and ``model``);
    ``raw``: the file's bytes, whose sha256 the meta must hold."""
    meta_path = path.parent / CACHED_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"a kd-tune teacher cache file without a readable {CACHED_META} beside it (keep the folder "
                         f"_teachers/<key>/ whole, and pass it or its {CACHED_TEACHER})") from None
    if meta.get("sha256") != hashlib.sha256(raw).hexdigest():
        raise ValueError(f"a kd-tune teacher cache file that its {CACHED_META} does not vouch for (sha256 differs: a changed or truncated copy)")
    if not isinstance(meta.get("model_args"), dict):
        source = meta.get("source")
        raise ValueError("the cache entry of a pre-trained teacher's logits, not a network kd-tune trained"
                         + (f": use its own file, {source}" if source else ""))
    return {"model_args": meta["model_args"], "model": blob["state_dict"]}


def portable_bytes(path: str | Path) -> bytes:
    """The bytes of a model file that rebuild its model anywhere, alone (what a Ray task or a live teacher on another
    node gets): the file itself, or for a cached teacher a model file made of its weights and its meta's model args."""
    path = model_file(path)
    raw = path.read_bytes()
    if path.suffix == ".pt2":
        return raw
    blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not _is_cache_blob(blob):
        return raw
    buf = io.BytesIO()
    torch.save(_cached_teacher(path, blob, raw), buf)
    return buf.getvalue()


def _is_cache_blob(blob: object) -> bool:
    return isinstance(blob, dict) and "state_dict" in blob and "train_logits" in blob and "model_args" not in blob


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network of a model file, in eval mode, and its model args (None for a ``torch.export`` archive, which holds
    a program, not an architecture of the registry). Raises ValueError saying what the file is not."""
    path = model_file(path)
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - whatever torch.export says of a file that is not its archive
            raise ValueError(f"not a torch.export archive ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        return Exported(program.module()), None
    try:
        raw = path.read_bytes()
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled code (refused by weights_only), a truncated file, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"not a weights-only torch file ({first[:200]})") from None
    if is_pack_state(blob):
        raise ValueError("a pack's checkpoint holds several students: name one of them (its MLflow run's model/student.pt)")
    if _is_cache_blob(blob):
        blob = _cached_teacher(path, blob, raw)
    if not isinstance(blob, dict) or not isinstance(blob.get("model_args"), dict) or "model" not in blob:
        raise ValueError(f"not a kd-tune model file or checkpoint (no model_args beside the weights); {WHERE_TEACHERS_ARE}")
    try:
        model = model_from_state(blob)
    except Exception as e:  # noqa: BLE001 - model args of an architecture not here, weights that do not fit them
        raise ValueError(f"its model does not rebuild ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    return model.eval(), dict(blob["model_args"])


def check_outputs(model: nn.Module, in_shape: tuple[int, ...], num_classes: int) -> None:
    """Raises ValueError unless the model maps a batch of ``in_shape`` images to ``num_classes`` logits each."""
    x = torch.zeros(2, *in_shape).contiguous(memory_format=torch.channels_last) if len(in_shape) == 3 else torch.zeros(2, *in_shape)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - a model for another image shape fails in whatever layer notices first
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"it does not take images of shape {tuple(in_shape)} ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"it gives {shape} for 2 images of shape {tuple(in_shape)}; the dataset has {num_classes} classes: (2, {num_classes}) needed")
