"""Interrupted sweeps resume, losing nothing and duplicating nothing (real CLI, real Ray, real sqlite MLflow)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import EPOCHS, SINGLE, SPACE, Sweep, check_record, finished, kill_tree, process_state, process_tree, reference_metrics

# Marked per test: the unknown-sweep test needs neither Ray nor a server (it stays in `-m "not integration"`).

@pytest.mark.integration
@pytest.mark.slow
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


@pytest.mark.integration
@pytest.mark.slow
def test_sigint_then_resume(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    sweep = Sweep(tmp_path, write_space(SPACE), teachers)
    proc = sweep.start("sweep", str(sweep.space))
    sweep.wait_until(proc, lambda p, base: finished(p) >= 1 and finished(p) < 4)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the trials
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "kd-tune resume study" in out
    for pid in process_tree(proc.pid):  # nothing of the embedded Ray outlives the driver
        assert not Path(f"/proc/{pid}").exists() or process_state(pid) == "Z"
    assert all(r.info.status != "RUNNING" for r in sweep.child_runs())  # cut-short runs are closed, not left RUNNING
    refused = sweep.run("sweep", str(sweep.space))
    assert refused.returncode == 2 and "to continue it: kd-tune resume study" in refused.stderr
    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The resumed sweep shows the same classic progress table as the first driver, not Tune's newer engine.
    assert "AIR_VERBOSITY is set" not in done.stderr and "Configuration for experiment" not in done.stdout
    check_record(sweep, {}, 8)


@pytest.mark.integration
@pytest.mark.slow
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
