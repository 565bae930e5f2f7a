"""The teachers a sweep distills from: from the content-addressed cache in its storage, or trained once as a Ray task
(a pre-trained teacher: its logits computed once as a Ray task, cached by its file's digest). On the embedded Ray of a
CPU sweep they train in the driver instead (``in_driver``): the one node is the driver's own, and a task would only start a
worker process that imports torch again (benchmarks/RESULTS.md, session 13: "the teacher in the driver").

The cache lives in the sweeps' storage (a folder or an object store), so every node of a cluster finds it; its
entries are verified by sha256 when loaded: a truncated or corrupt entry is retrained, never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kd_tune.data.split import DataSplit
from kd_tune.distill.pretrained import CACHED_META, file_digest, load_model, portable_bytes
from kd_tune.distill.teacher import CACHE_FORMAT, Teacher, pretrained_key, teacher_from_model, teacher_key, train_teacher
from kd_tune.errors import first_line
from kd_tune.space.schema import SweepSpec
from kd_tune.space.sections import CACHED_TEACHER, TeacherSpec
from kd_tune.sweep.state.storage import Storage

CACHE_FOLDER = "_teachers"  # beside the sweeps in the storage; sweep names cannot start with '_'


class TeacherCache:
    """``<storage>/_teachers/<key>/{teacher.pt, meta.json}`` on any :class:`~kd_tune.sweep.state.storage.Storage`.

    ``meta.json`` is written last and holds the sha256 of ``teacher.pt`` and the model args: an entry is complete when
    its meta is there and the weights match it. Each file is written atomically, so a kill at any
    moment leaves either a complete entry or one that is detected as incomplete and retrained; this
    works the same on a local or NFS folder and on an object store, where folders cannot be renamed.
    A later sweep may name an entry (its folder or its ``teacher.pt``) as ``teacher.from``
    (:func:`kd_tune.distill.pretrained.load_model`).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def path(self, key: str) -> str:
        return self.storage.show(CACHE_FOLDER, key)

    def keys(self) -> list[str]:
        return self.storage.list_dirs(CACHE_FOLDER)

    def load(self, key: str, log: Callable[[str], None] = print) -> Teacher | None:
        if not self.storage.exists(CACHE_FOLDER, key):
            return None
        try:
            meta = json.loads(self.storage.read_text(CACHE_FOLDER, key, CACHED_META))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("format or key mismatch")
            raw = self.storage.read_bytes(CACHE_FOLDER, key, CACHED_TEACHER)
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                raise ValueError("sha256 mismatch (truncated or corrupt file)")
            blob: dict[str, Any] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            log(f"teacher cache entry {self.path(key)} is unusable ({first_line(e)}); training the teacher again")
            self.storage.delete(CACHE_FOLDER, key)
            return None
        return Teacher(key, meta["model_args"], blob["state_dict"], blob["train_logits"], blob["test_logits"], meta["test_acc"], meta["history"],
                       cached=True, source=meta.get("source"))

    def save(self, teacher: Teacher, spec: dict[str, Any]) -> str:
        """Weights first, then the meta that vouches for them (each written atomically)."""
        if self.storage.exists(CACHE_FOLDER, teacher.key, CACHED_META):
            return self.path(teacher.key)  # another sweep wrote the same teacher first; theirs is as good
        buf = io.BytesIO()
        torch.save({"state_dict": teacher.state_dict, "train_logits": teacher.train_logits, "test_logits": teacher.test_logits}, buf)
        raw = buf.getvalue()
        meta = {
            "format": CACHE_FORMAT, "key": teacher.key, "spec": spec, "model_args": teacher.model_args, "sha256": hashlib.sha256(raw).hexdigest(),
            "test_acc": teacher.test_acc, "history": teacher.history, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": teacher.source,
        }
        self.storage.write_bytes(raw, CACHE_FOLDER, teacher.key, CACHED_TEACHER)
        self.storage.write_text(json.dumps(meta, indent=2), CACHE_FOLDER, teacher.key, CACHED_META)
        return self.path(teacher.key)


def _train_task(split: DataSplit, spec: TeacherSpec, key: str, verbose: bool) -> Teacher:
    """The teacher's Ray task: as many threads as the CPUs it was given, on its GPU if it has one."""
    from kd_tune.sweep.cluster.connect import assigned_device, assigned_threads

    torch.set_num_threads(assigned_threads())
    return train_teacher(split, spec, key, assigned_device(), log=(lambda s: print(s, flush=True)) if verbose else (lambda s: None))


def _logits_task(blob: bytes, suffix: str, split: DataSplit, key: str, source: str) -> Teacher:
    """A pre-trained teacher's Ray task: its logits on the sweep's images, on the node's GPU if it has one."""
    from kd_tune.sweep.cluster.connect import assigned_device, assigned_threads

    torch.set_num_threads(assigned_threads())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"teacher{suffix}"
        path.write_bytes(blob)
        model, margs = load_model(path)
    return teacher_from_model(model, margs, split, key, source, assigned_device())


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for a while (the driver's own count afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def get_teachers(spec: SweepSpec, split: DataSplit, storage: Storage, node_cpus: int, log: Callable[[str], None],
                 verbose: bool = True, local_file: Callable[[str], Path] = Path, in_driver: bool = False) -> list[Teacher]:
    """Every member of the teacher ``spec.teacher`` (one, or an ensemble): from the cache, or trained now as a Ray task
    on a whole node (``node_cpus``; teachers train before any trial starts). A pre-trained teacher (``teacher.from``):
    its file (``local_file`` turns an MLflow model URI into one) read once, its logits computed as a Ray task and cached
    by the file's digest. ``in_driver``: this machine is the Ray cluster's one node (``cluster.driver_is_the_only_node``); the teachers of a sweep without
    GPUs then train here, with ``node_cpus`` threads, instead of in a task's new worker process (a GPU sweep keeps
    the task: the driver would otherwise hold a CUDA context on the GPU its trials share, for the whole sweep)."""
    import ray

    cache = TeacherCache(storage)
    gpus = 1 if spec.resources.gpu > 0 else 0
    here = in_driver and gpus == 0
    if spec.teacher.source is not None:
        source = spec.teacher.source
        path = local_file(source)
        key = pretrained_key(spec.dataset, file_digest(path), split)
        teacher = cache.load(key, log)
        if teacher is not None:
            log(f"teacher {key}: {source}, its logits from the cache ({cache.path(key)}), test acc {teacher.test_acc:.4f}")
            return [teacher]
        log(f"teacher {key}: {source}, its logits on {len(split.train_y)} training images")
        if here:
            with _threads(node_cpus):
                model, margs = load_model(path)
                teacher = teacher_from_model(model, margs, split, key, source, torch.device("cpu"))
        else:
            logits = ray.remote(_logits_task).options(num_cpus=node_cpus, num_gpus=gpus)
            teacher = ray.get(logits.remote(portable_bytes(path), path.suffix, split, key, source))
        cache.save(teacher, {"dataset": asdict(spec.dataset), "teacher": {"from": source}})
        log(f"teacher {key}: test acc {teacher.test_acc:.4f}, its logits cached in {cache.path(key)}")
        return [teacher]
    task = ray.remote(_train_task)
    teachers = []
    for member in spec.teacher.members():
        key = teacher_key(spec.dataset, member, split)
        teacher = cache.load(key, log)
        if teacher is not None:
            log(f"teacher {key}: from the cache ({cache.path(key)}), test acc {teacher.test_acc:.4f}")
        else:
            log(f"teacher {key}: training {_shown(member)} (seed {member.seed}) for {member.epochs} epochs on {len(split.train_y)} images")
            if here:
                with _threads(node_cpus):
                    teacher = train_teacher(split, member, key, torch.device("cpu"), log=log if verbose else (lambda s: None))
            else:
                teacher = ray.get(task.options(num_cpus=node_cpus, num_gpus=gpus).remote(split, member, key, verbose))
            cache.save(teacher, {"dataset": asdict(spec.dataset), "teacher": asdict(member)})
            log(f"teacher {key}: test acc {teacher.test_acc:.4f}, cached in {cache.path(key)}")
        teachers.append(teacher)
    return teachers


def _shown(teacher: TeacherSpec) -> str:
    """``256/512`` for the study's CNN (as its log lines always read), else the architecture and its arguments."""
    if teacher.arch == "cnn":
        return "/".join(map(str, teacher.widths))
    return teacher.model.describe()
