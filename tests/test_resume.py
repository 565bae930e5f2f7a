"""Interrupted sweeps resume, losing nothing and duplicating nothing (real CLI, real Ray, real sqlite MLflow)."""

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
from kd_tune.spec.parse import load_space, load_space_text
from kd_tune.sweep.storage import resolve_storage
from kd_tune.sweep.teachers import CACHE_FOLDER, TeacherCache
from kd_tune.tracking.tags import EPOCH_METRICS, TAG_PARENT, TAG_ROLE, TAG_TRIAL

from .conftest import FIXTURE_DATA, tiny_space
from .servers import descendants

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


def _process_tree(pid: int) -> list[int]:
    """The process and every one below it (Ray's workers run in sessions of their own)."""
    return [pid, *descendants([pid])]


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the driver and the local Ray it started (as when the head node dies), by PID."""
    tree = _process_tree(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in tree):
        time.sleep(0.1)
    assert not [p for p in tree if Path(f"/proc/{p}").exists() and "Z" not in _state(p)], "Ray processes left behind"


def _state(pid: int) -> str:
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
        for metric in EPOCH_METRICS:
            steps = [m.step for m in sweep.client.get_metric_history(r.info.run_id, metric)]
            assert sorted(steps) == list(range(1, int(r.data.params["epochs"]) + 1)), (r.info.run_name, metric, steps)
        if r.info.run_id in untouched:
            assert r.info.end_time == untouched[r.info.run_id]  # finished before a kill: left alone


def test_kills_at_several_moments_then_resume(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    sweep = Sweep(tmp_path, write_space(SPACE), teachers)
    untouched: dict[str, float] = {}
    recomputed: list[str] = []

    def snapshot_finished() -> None:
        for r in sweep.child_runs():
            if r.info.status == "FINISHED":
                untouched.setdefault(r.info.run_id, r.info.end_time)

    def running(p: dict[str, list[int]], base: dict[str, list[int]]) -> bool:
        """An unfinished trial has reported an epoch during this run (it is training now)."""
        return any(EPOCHS not in e and len(e) > len(base.get(t, [])) for t, e in p.items())

    moments = [
        ("before the first trial finishes", lambda p, base: any(p.values()) and finished(p) == 0),
        ("mid-sweep", lambda p, base: 1 <= finished(p) <= 2 and running(p, base)),
        # Two CPUs run the last two trials side by side: "last" = every trial started, some running.
        ("during the last trials", lambda p, base: finished(p) >= 2 and len(p) == 4 and all(p.values()) and running(p, base)),
    ]
    args: tuple[str, ...] = ("sweep", str(sweep.space))
    for name, cond in moments:
        proc = sweep.start(*args)
        sweep.wait_until(proc, cond)
        kill_tree(proc)
        before = sweep.progress()
        recomputed.append(f"{name}: {before}")
        snapshot_finished()
        st = sweep.run("status", "study")
        assert st.returncode == 0 and "driver not running" in st.stdout and "to continue: kd-tune resume study" in st.stdout
        args = ("resume", "study")

    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "8/8 grid points finished" in done.stdout and "restored" in done.stdout
    check_record(sweep, untouched, 8)

    # Nothing recomputed beyond the epoch in progress: each epoch reached the driver at most once per interruption.
    final = sweep.progress()
    for label, epochs in final.items():
        extra = len(epochs) - len(set(epochs))
        assert extra <= len(moments), (label, epochs)
    print("\nkill points and driver-recorded epochs:", *recomputed, f"final: {final}", sep="\n")

    # Same numbers as an uninterrupted run with the same seeds (CPU determinism).
    ref = reference_metrics(sweep)
    for r in sweep.child_runs():
        for metric in ("test_acc", "test_loss", "train_loss"):
            assert r.data.metrics[metric] == pytest.approx(ref[r.info.run_name][metric], rel=1e-6, abs=1e-7), (r.info.run_name, metric)


def test_sigint_then_resume(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    sweep = Sweep(tmp_path, write_space(SPACE), teachers)
    proc = sweep.start("sweep", str(sweep.space))
    sweep.wait_until(proc, lambda p, base: finished(p) >= 1 and finished(p) < 4)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the trials
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "kd-tune resume study" in out
    for pid in _process_tree(proc.pid):  # nothing of the embedded Ray outlives the driver
        assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    assert all(r.info.status != "RUNNING" for r in sweep.child_runs())  # cut-short runs are closed, not left RUNNING
    refused = sweep.run("sweep", str(sweep.space))
    assert refused.returncode == 2 and "to continue it: kd-tune resume study" in refused.stderr
    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The resumed sweep shows the same classic progress table as the first driver, not Tune's newer engine.
    assert "AIR_VERBOSITY is set" not in done.stderr and "Configuration for experiment" not in done.stdout
    check_record(sweep, {}, 8)


def test_trial_faults_retry_then_error(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    space = {**SINGLE, "student": {"widths": [4, 8], "lr": 0.003, "batch_size": 64}, "max_failures": 1}
    sweep = Sweep(tmp_path, write_space(space), teachers)
    faults = "a0.5-T3-e5-s0:once,a0-T3-e5-s0:always,scratch-e5-s0:nan"
    res = sweep.run("sweep", str(sweep.space), env={"KD_TUNE_TEST_FAULT": faults})
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2/4 grid points finished, 1 errored, 1 diverged" in res.stdout
    assert "to retry the rest: kd-tune resume study" in res.stdout
    runs = {r.info.run_name: r for r in sweep.child_runs()}
    assert len(runs) == 4
    failed = runs["a0-T3-e5-s0"]
    assert failed.info.status == "FAILED" and "injected fault" in failed.data.tags["kd_tune.error"]
    recovered = runs["a0.5-T3-e5-s0"]
    assert recovered.info.status == "FINISHED" and recovered.data.tags.get("kd_tune.retries") == "1"
    steps = [m.step for m in sweep.client.get_metric_history(recovered.info.run_id, "test_acc")]
    assert steps == list(range(1, EPOCHS + 1))  # retried from its epoch-1 checkpoint, nothing logged twice
    assert runs["a1-T3-e5-s0"].info.status == "FINISHED"
    diverged = runs["scratch-e5-s0"]  # NaN loss: recorded as diverged at epoch 1, not retried
    assert diverged.info.status == "FAILED" and diverged.data.tags["kd_tune.diverged"] == "true"
    assert diverged.data.tags["kd_tune.error"] == "training diverged at epoch 1: loss = nan"
    assert "kd_tune.retries" not in diverged.data.tags

    st = sweep.run("status", "study")
    assert "2 finished" in st.stdout and "1 errored" in st.stdout and "1 diverged" in st.stdout
    # resume_errored: the errored trial runs again (the fault is gone now) and its run is reused;
    # the diverged one is not rerun (it would diverge again).
    done = sweep.run("resume", "study")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3/4 grid points finished, 0 errored, 1 diverged" in done.stdout
    runs2 = {r.info.run_name: r for r in sweep.child_runs()}
    assert runs2["a0-T3-e5-s0"].info.run_id == failed.info.run_id and runs2["a0-T3-e5-s0"].info.status == "FINISHED"
    assert runs2["scratch-e5-s0"].info.end_time == diverged.info.end_time
    assert len(runs2) == 4


def test_resume_unknown_sweep_is_a_usage_error(tmp_path: Path) -> None:
    sweep = Sweep(tmp_path, tmp_path / "none.yaml")
    res = sweep.run("resume", "nope")
    assert res.returncode == 2
    assert "no sweep named 'nope'" in res.stderr and "Traceback" not in res.stderr
    res = sweep.run("status", "../etc")
    assert res.returncode == 2 and "not allowed" in res.stderr
