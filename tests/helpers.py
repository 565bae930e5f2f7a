"""What several test files share: the resume tests' spaces and teacher, a sweep driven through the real CLI in a
subprocess (:class:`Sweep`), killing it with its Ray (:func:`kill_tree`), and the check that a sweep's MLflow record
is whole (:func:`check_record`: one run per grid point, no repeated step). Not a test module: the files that use
these import them from here, never from one another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kd_tune.data import split as data_split
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.teacher import teacher_key, train_teacher
from kd_tune.distill.train import TensorData, make_optimizer, train
from kd_tune.space.parse import load_space, load_space_text
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.sweep.teacher_cache import CACHE_FOLDER, TeacherCache
from kd_tune.tracking.tags import EVERY_RUN_METRICS, TAG_PARENT, TAG_ROLE, TAG_TRIAL

from .conftest import FIXTURE_DATA, tiny_space
from .servers import descendants

# How close a packed student's numbers must be to the same student trained alone (test_packed, test_pack_sweep):
# Tolerances of packed vs one-by-one training. The two compute the same sums in a different order
# (a grouped conv and a batched matmul instead of K separate ones, a [K, B] loss instead of K [B]
# losses), so float32 rounding differs at ~1e-7 relative per op, and Adam carries that through the
# steps. Measured max deviations over these tests' 2 epochs (20 steps): train/test losses 1.7e-7
# relative at 1 thread, 1.3e-7 at 2; accuracy, agreement and macro F1 identical; ECE 2e-8. The gap
# grows with training (10 epochs at 2 threads: 1e-5), hence 2 epochs and a bound 60x the measured
# one, for other CPUs' kernels. A bug (a mixed-up member, the wrong flatten order, a missing T^2, one
# member's gradient reaching another) moves the losses by 1e-3 or more. Accuracies count 500 test
# images: allowed to differ by one image whose prediction flips at a near tie.
LOSS_REL = 1e-5
ONE_TEST_IMAGE = 1 / 500 + 1e-9

EPOCHS = 5
# Slow enough per epoch (~1 s) that a kill lands between epochs and inside them. Epochs 3 and 5
# share a trial (8 grid points, 4 trials), so kills also hit a trial between its two milestones.
SPACE = tiny_space(
    name="study",
    dataset={"name": "mnist", "train_size": 1800, "val_size": 200},  # the whole slice, 200 digits held out
    student={"widths": [16, 32], "lr": 0.003, "batch_size": 16},
    grid={"alpha": [0.0, 0.5, 1.0], "epochs": [3, EPOCHS]},
    baselines=["scratch"],
)
SINGLE = {**SPACE, "grid": {"alpha": [0.0, 0.5, 1.0], "epochs": [EPOCHS]}}


def cached_teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher every sweep here distils from (SPACE and SINGLE share its dataset and spec), trained once in
    this process and cached as a sweep caches it (kd_tune.teacher): each test's storage starts with a copy of
    this cache folder, so its sweep loads the teacher from the cache instead of first training it.
    (Training the teacher inside a sweep is test_sweep.py's, test_jobs.py's and test_cluster.py's.)"""
    root = tmp_path_factory.mktemp("teachers")
    spec, single = (load_space_text(yaml.safe_dump(s), "space") for s in (SPACE, SINGLE))
    assert (spec.dataset, spec.teacher) == (single.dataset, single.teacher)
    split = data_split.prepare("mnist", spec.dataset.train_size, 0.0, spec.dataset.seed, FIXTURE_DATA, val_size=spec.dataset.val_size)
    (member,) = spec.teacher.members()
    teacher = train_teacher(split, member, teacher_key(spec.dataset, member, split), log=lambda s: None)
    TeacherCache(resolve_storage(str(root / "store"))).save(teacher, {"dataset": asdict(spec.dataset), "teacher": asdict(member)})
    return root / "store" / CACHE_FOLDER


class Sweep:
    """Drives the real CLI in a subprocess, in its own folder (MLflow's default store is there).

    ``teachers``: a teacher cache folder to start the storage with (the module's ``teachers`` fixture)."""

    def __init__(self, folder: Path, space: Path, teachers: Path | None = None) -> None:
        self.folder, self.space = folder, space
        self.storage = folder / "store"
        if teachers is not None:
            shutil.copytree(teachers, self.storage / CACHE_FOLDER)
        self.dir = self.storage / "study"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "KD_TUNE_DATA_DIR": str(FIXTURE_DATA), "KD_TUNE_STORAGE": str(self.storage)}
        self.env.pop("MLFLOW_TRACKING_URI", None)

    @cached_property
    def client(self) -> MlflowClient:
        """The sweeps' default store, opened when first read (a test of a new store has the sweeps make it)."""
        return MlflowClient(f"sqlite:///{self.folder / 'mlflow.db'}")

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "kd_tune.cli", *args, "--quiet"], cwd=self.folder, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kd_tune.cli", *args], cwd=self.folder, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=600)

    def progress(self) -> dict[str, list[int]]:
        """Epochs the driver has recorded per trial (Tune's result.json, one line per report)."""
        out: dict[str, list[int]] = {}
        for f in self.dir.glob("*/result.json"):
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
            epochs = []
            for ln in lines:
                try:
                    epochs.append(int(json.loads(ln)["epoch"]))
                except (ValueError, KeyError):
                    pass  # a line cut short by the kill
            out[f.parent.name.rsplit("_", 2)[0]] = epochs  # keyed by trial label
        return out

    def wait_until(self, proc: subprocess.Popen[str], cond: Callable[[dict[str, list[int]], dict[str, list[int]]], bool],
                   timeout: float = 300) -> None:
        """Poll until cond(progress now, progress when this run started) holds."""
        base = self.progress()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"sweep ended before the kill point: {proc.stdout.read() if proc.stdout else ''}"
            if cond(self.progress(), base):
                return
            time.sleep(0.05)  # polling a condition against a deadline
        raise AssertionError(f"condition not reached: {self.progress()}")

    def child_runs(self, name: str = "study") -> list[Any]:
        exp = self.client.get_experiment_by_name(name)
        assert exp is not None
        return [r for r in self.client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get(TAG_ROLE) in ("student", "scratch")]


def process_tree(pid: int) -> list[int]:
    """The process and every one below it (Ray's workers run in sessions of their own)."""
    return [pid, *descendants([pid])]


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the driver and the local Ray it started (as when the head node dies), by PID."""
    tree = process_tree(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in process_state(p) for p in tree):
        time.sleep(0.1)
    assert not [p for p in tree if Path(f"/proc/{p}").exists() and "Z" not in process_state(p)], "Ray processes left behind"


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def finished(p: dict[str, list[int]]) -> int:
    return sum(1 for e in p.values() if EPOCHS in e)


def reference_metrics(sweep: Sweep) -> dict[str, dict[str, float]]:
    """Each trial trained without Ray, uninterrupted, in this process (1 thread, like a 1-CPU trial): once to its
    largest milestone, each grid point's numbers read at its own epoch (exact: epoch e depends on (seed, e) alone,
    which test_sweep.py's test_epoch_sharing_gives_the_same_runs_as_separate_trials checks against separate trials)."""
    spec = load_space(sweep.space)
    split = data_split.prepare("mnist", spec.dataset.train_size, 0.0, 0, FIXTURE_DATA, val_size=spec.dataset.val_size)
    teacher = TeacherCache(resolve_storage(str(sweep.storage))).load(teacher_key(spec.dataset, spec.teacher, split))
    assert teacher is not None
    torch.set_num_threads(1)
    out = {}
    for trial in spec.trials():
        d = TensorData.from_split(split, "cpu", teacher.train_logits if trial.role == "student" else None, teacher.test_logits)
        model = build_cnn(spec.student.widths, split.info.shape, 10, trial.seed)
        h = train(model, make_optimizer(model, spec.student.lr), d, epochs=max(trial.milestones), batch_size=spec.student.batch_size,
                  seed=trial.seed, alpha=trial.alpha, temperature=trial.temperature or 1.0)
        for epochs in trial.milestones:
            out[trial.at(epochs).label] = h[epochs - 1].as_dict()
    assert sorted(out) == sorted(p.label for p in spec.grid_points())  # every grid point, none twice
    return out


def check_record(sweep: Sweep, untouched: dict[str, float], grid_points: int, name: str = "study") -> None:
    runs = sweep.child_runs(name)
    # (trial, label, epochs): a pack trial has a run per member (label) and epochs value
    by_point = Counter((r.data.tags[TAG_TRIAL], r.data.tags["kd_tune.trial"], r.data.tags["kd_tune.epochs"]) for r in runs)
    assert len(runs) == grid_points and set(by_point.values()) == {1}, by_point  # exactly one run per grid point
    parents = {r.data.tags[TAG_PARENT] for r in runs}
    exp = sweep.client.get_experiment_by_name(name)
    assert exp is not None
    sweeps = [r for r in sweep.client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_ROLE) == "sweep"]
    assert len(sweeps) == 1 and parents == {sweeps[0].info.run_id} and sweeps[0].info.status == "FINISHED"
    teachers = [r for r in sweep.client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_ROLE) == "teacher"]
    assert len(teachers) == 1  # the teacher came from the cache on every resume; its run was not duplicated
    # Nor the parent's teacher accuracy: every resume records the teachers again, each value once.
    assert [m.step for m in sweep.client.get_metric_history(sweeps[0].info.run_id, "teacher_test_acc")] == [0]
    for r in runs:
        assert r.info.status == "FINISHED"
        for metric in EVERY_RUN_METRICS:
            steps = [m.step for m in sweep.client.get_metric_history(r.info.run_id, metric)]
            assert sorted(steps) == list(range(1, int(r.data.params["epochs"]) + 1)), (r.info.run_name, metric, steps)
        if r.info.run_id in untouched:
            assert r.info.end_time == untouched[r.info.run_id]  # finished before a kill: left alone
