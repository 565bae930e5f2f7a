"""The teacher: trained once per spec, cached content-addressed, its logits computed once.

The cache key hashes everything that determines the teacher (dataset, subset, label noise, data
fingerprint, widths, epochs, lr, batch size, seed), so later sweeps with the same spec reuse it and
any change trains a new one. Entries are written atomically (a temporary folder renamed into place)
and verified by sha256 when loaded: a truncated or corrupt entry is retrained, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kd_tune.config import DatasetSpec, TeacherSpec
from kd_tune.data import DataSplit, data_hash
from kd_tune.models import build_model
from kd_tune.train import EpochMetrics, Evaluation, TensorData, make_optimizer, predict_logits, train

CACHE_FORMAT = 1
CACHE_FOLDER = "_teachers"  # beside the sweeps in the storage; sweep names cannot start with '_'


@dataclass(frozen=True)
class Teacher:
    """A trained teacher and its logits on the training and test images (CPU tensors)."""

    key: str
    state_dict: dict[str, torch.Tensor]
    train_logits: torch.Tensor
    test_logits: torch.Tensor
    test_acc: float
    history: list[dict[str, float]]
    cached: bool = False
    """True when this came from the cache rather than from training now."""


def teacher_key(dataset: DatasetSpec, teacher: TeacherSpec, split: DataSplit) -> str:
    spec = {"format": CACHE_FORMAT, "dataset": asdict(dataset), "teacher": asdict(teacher), "data": data_hash(split)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def train_teacher(
    split: DataSplit,
    spec: TeacherSpec,
    key: str,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> Teacher:
    """Train the teacher on the (possibly noisy) training labels; then its logits, once."""
    data = TensorData.from_split(split, device)
    model = build_model(spec.widths, split.info.shape, split.info.num_classes, spec.seed).to(device)

    def progress(m: EpochMetrics, _: Evaluation) -> None:
        log(f"teacher epoch {m.epoch}/{spec.epochs}: train loss {m.train_loss:.4f}, test acc {m.test_acc:.4f} ({m.epoch_seconds:.1f} s)")

    history = train(model, make_optimizer(model, spec.lr), data, epochs=spec.epochs, batch_size=spec.batch_size, seed=spec.seed, on_epoch=progress)
    train_logits = predict_logits(model, data.train_x).cpu()
    test_logits = predict_logits(model, data.test_x).cpu()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Teacher(key, state, train_logits, test_logits, history[-1].test_acc, [m.as_dict() for m in history])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TeacherCache:
    """``<storage>/_teachers/<key>/{teacher.pt, meta.json}``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, log: Callable[[str], None] = print) -> Teacher | None:
        folder = self.path(key)
        meta_path, weights = folder / "meta.json", folder / "teacher.pt"
        if not folder.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("format or key mismatch")
            if _sha256(weights) != meta["sha256"]:
                raise ValueError("sha256 mismatch (truncated or corrupt file)")
            blob: dict[str, Any] = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            log(f"teacher cache entry {folder} is unusable ({e}); training the teacher again")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return Teacher(key, blob["state_dict"], blob["train_logits"], blob["test_logits"], meta["test_acc"], meta["history"], cached=True)

    def save(self, teacher: Teacher, spec: dict[str, Any]) -> Path:
        """Write the entry into a temporary folder, then rename it into place (atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(teacher.key)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{teacher.key}.tmp-"))
        try:
            weights = tmp / "teacher.pt"
            blob = {"state_dict": teacher.state_dict, "train_logits": teacher.train_logits, "test_logits": teacher.test_logits}
            torch.save(blob, weights)
            meta = {
                "format": CACHE_FORMAT, "key": teacher.key, "spec": spec, "sha256": _sha256(weights),
                "test_acc": teacher.test_acc, "history": teacher.history, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            for f in (weights, tmp / "meta.json"):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(tmp)  # another sweep wrote the same teacher first; theirs is as good
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
