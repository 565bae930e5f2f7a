"""Sweeps submitted as Ray jobs to a real job server (``ray start --head`` with the dashboard, 2 CPUs, on this
machine), through the real CLI as a laptop would: stopped mid-sweep, resumed by job and followed to the end (one
sweep's two jobs serve all of it), and bad input refused before anything reaches the cluster. Every process is stopped by PID afterwards.

Two heads: ``head`` with Ray's token authentication on, as a shared cluster runs (``ray start --head`` turns it on by
itself where ``~/.ray/auth_token`` exists: the CLI finds the token there, as Ray's job CLI would, with or without
``RAY_AUTH_MODE``), and ``open_head`` with it off."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from kd_tune.sweep.hooks import GATE_ENV
from kd_tune.tracking.tags import EVERY_RUN_METRICS, TAG_PARENT, TAG_ROLE, TAG_TRIAL

from .conftest import FIXTURE_DATA, tiny_space
from .servers import RAY_ENV, RayHead, free_port

pytestmark = [pytest.mark.integration, pytest.mark.jobs]

DATASET = {"name": "mnist", "train_size": 1500, "val_size": 100}
FOLLOWED = tiny_space(name="followed", dataset=DATASET)  # a valid space, for the refusals of bad flags
# 4 trials of 6 epochs (epochs 3 and 6 share a trial: 4 trials serve 8 grid points); the stop lands while a gate
# holds the trials after their first epoch, however fast the epochs are.
EPOCHS = 6
GATE = "hold-trials"
GRID_POINTS = 8
STOPPED = tiny_space(name="stopped", dataset=DATASET, student={"widths": [16, 32], "lr": 0.003, "batch_size": 16},
                     grid={"alpha": [0.0, 0.5, 1.0], "epochs": [3, EPOCHS]}, baselines=["scratch"])


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A shared cluster's head: Ray's token authentication on (its token in the head's ~/.ray/auth_token)."""
    folder = tmp_path_factory.mktemp("head")
    # While the file GATE exists, every trial of the head's jobs waits after each reported epoch (kd_tune.sweep.hooks).
    h = RayHead(folder, env={GATE_ENV: str(folder / GATE)}, token=secrets.token_hex(32))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def open_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A head with token authentication off."""
    h = RayHead(tmp_path_factory.mktemp("open-head"))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def where(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Storage and MLflow store shared by the tests (absolute paths: the cluster's own, here the same machine's)."""
    root = tmp_path_factory.mktemp("shared")
    return {"storage": str(root / "store"), "tracking": f"sqlite:///{root / 'mlflow.db'}"}


def kd(*args: Any, cwd: Path, home: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as in a user's shell: no cluster, storage, store or Ray token settings in its
    environment (``RAY_AUTH_MODE`` unset) but ``env``; ``home``: its HOME (where ~/.ray/auth_token is looked for)."""
    environ = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "KD_TUNE_STORAGE", "KD_TUNE_DATA_DIR", "RAY_AUTH_MODE",
                "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        environ.pop(var, None)
    if home is not None:
        environ["HOME"] = str(home)
    environ |= env or {}
    return subprocess.run([sys.executable, "-m", "kd_tune.cli", *map(str, args)], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=600)


def _submit_flags(where: dict[str, str]) -> list[str]:
    return ["--storage", where["storage"], "--tracking-uri", where["tracking"], "--data-dir", str(FIXTURE_DATA), "--quiet"]


def _client(head: RayHead, monkeypatch: pytest.MonkeyPatch) -> Any:
    from ray.job_submission import JobSubmissionClient

    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    return JobSubmissionClient(head.url, headers=head.headers)


def _runs(where: dict[str, str], sweep: str) -> list[Any]:
    client = MlflowClient(where["tracking"])
    exp = client.get_experiment_by_name(sweep)
    assert exp is not None
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def check_record(where: dict[str, str], sweep: str, grid_points: int) -> None:
    """One run per grid point, all finished, each epoch's metrics logged once, under one finished parent run."""
    client = MlflowClient(where["tracking"])
    runs = _runs(where, sweep)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"]
    children = [r for r in runs if r.data.tags.get(TAG_ROLE) in ("student", "scratch")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len([r for r in runs if r.data.tags.get(TAG_ROLE) == "teacher"]) == 1
    by_point = Counter((r.data.tags[TAG_TRIAL], r.data.tags["kd_tune.epochs"]) for r in children)
    assert len(children) == grid_points and set(by_point.values()) == {1}, by_point
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags[TAG_PARENT] == parents[0].info.run_id
        for metric in EVERY_RUN_METRICS:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, metric)]
            assert sorted(steps) == list(range(1, int(r.data.params["epochs"]) + 1)), (r.info.run_name, metric, steps)


def test_bad_input_is_refused_before_anything_is_submitted(open_head: RayHead, where: dict[str, str], write_space: Callable[..., Path],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = open_head
    client = _client(head, monkeypatch)
    before = client.list_jobs()
    bad = write_space(tiny_space(name="bad", grid={"alpha": [2.0], "epochs": [1]}), "bad.yaml")
    res = kd("submit", bad, "--address", head.url, *_submit_flags(where), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"kd-tune submit: error: {bad}: key 'grid.alpha[0]': bad value 2.0; allowed: a number in [0, 1]",
                                       "(see 'kd-tune submit --help')"]
    good = write_space(FOLLOWED)
    refusals = [
        (["--address", head.address, *_submit_flags(where)], f"--address '{head.address}' is not an http:// address"),
        (["--address", f"http://127.0.0.1:{free_port()}", *_submit_flags(where)], "no job server answers there"),
        (["--address", head.url, "--storage", "relative/store", "--tracking-uri", where["tracking"]], "--storage 'relative/store' is a relative path"),
        (["--address", head.url, "--storage", where["storage"], "--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri 'sqlite:///mlflow.db' is a relative path"),
        (["--address", head.url, *_submit_flags(where), "--gpus-per-trial", "-1"], "--gpus-per-trial -1.0: allowed: a number >= 0"),
    ]
    for flags, problem in refusals:
        started = time.monotonic()
        res = kd("submit", good, *flags, cwd=tmp_path)
        assert res.returncode == 2 and problem in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 2 and time.monotonic() - started < 30  # one line, at once (no minutes of retries)
    assert client.list_jobs() == before  # nothing reached the job server
    assert not Path(where["storage"], "bad").exists()


def test_stop_mid_sweep_then_resume_by_job_and_follow_it_to_the_end(head: RayHead, where: dict[str, str], write_space: Callable[..., Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """One sweep's jobs serve every check of a job's life (each job's driver start-up costs ~20 s here): submitted,
    refused a second live job, stopped mid-sweep, resumed as a second job, followed to the end, listed."""
    space = write_space(STOPPED)
    gate = Path(head.env[GATE_ENV])
    gate.touch()  # held after each epoch until the stop
    request.addfinalizer(lambda: gate.unlink(missing_ok=True))  # never left holding the head's other jobs
    res = kd("submit", space, "--address", head.url, *_submit_flags(where), cwd=tmp_path, home=head.home)
    submitted = time.monotonic()
    assert res.returncode == 0, res.stderr
    assert f"sweep 'stopped': sweep submitted to {head.url} as Ray job kd-tune-stopped-1" in res.stdout
    assert f"kd-tune logs stopped --follow --address {head.url}" in res.stdout
    client, job = _client(head, monkeypatch), "kd-tune-stopped-1"

    again = kd("submit", space, "--address", head.url, *_submit_flags(where), cwd=tmp_path, home=head.home)  # one live job per sweep
    assert again.returncode == 2, again.stderr
    assert f"sweep 'stopped' has a live job on {head.url}: {job} (" in again.stderr
    assert "kd-tune logs stopped --follow" in again.stderr and "kd-tune stop stopped" in again.stderr

    # Wait (polling the storage, against a deadline) until a trial has reported its first epoch; the gate holds it there.
    results = Path(where["storage"], "stopped")
    deadline = time.monotonic() + 300
    while not any(f.read_text().strip() for f in results.glob("*/result.json")):
        assert str(client.get_job_status(job).value) in ("PENDING", "RUNNING"), client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "no epoch reported"
        time.sleep(0.1)  # polling a condition against a deadline
    first_epoch = time.monotonic() - submitted

    started = time.monotonic()
    stopped = kd("stop", "stopped", "--address", head.url, cwd=tmp_path, home=head.home)
    took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.splitlines() == [f"sweep 'stopped': job {job} is STOPPED",
                                           f"to continue it: kd-tune resume stopped --address {head.url} --storage {where['storage']}"]
    log = client.get_job_logs(job)
    assert "Stop signal received" in log  # Ctrl+C reached the driver: Tune stopped gracefully, not SIGKILLed
    runs = _runs(where, "stopped")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # nothing left open
    cut = [r for r in runs if r.data.tags.get(TAG_ROLE) in ("student", "scratch") and r.info.status != "FINISHED"]
    assert all(r.info.status == "KILLED" for r in cut)
    assert "sweep 'stopped': " in log and f"{GRID_POINTS}/{GRID_POINTS} grid points finished" not in log, log[-3000:]  # stopped mid-sweep

    gate.unlink()
    resumed = kd("resume", "stopped", "--address", head.url, "--storage", where["storage"], cwd=tmp_path, home=head.home)
    assert resumed.returncode == 0, resumed.stderr
    assert f"sweep 'stopped': resume submitted to {head.url} as Ray job kd-tune-stopped-2" in resumed.stdout
    # the same images as the first job: its --data-dir is carried over
    assert client.get_job_info("kd-tune-stopped-2").entrypoint.endswith(f"resume stopped --storage {where['storage']} --data-dir {FIXTURE_DATA}")
    logs = kd("logs", "stopped", "--follow", "--address", head.url, cwd=tmp_path, home=head.home)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr[-3000:]
    assert f"sweep 'stopped': {GRID_POINTS}/{GRID_POINTS} grid points finished, 0 errored, 0 diverged (" in logs.stdout
    assert "job kd-tune-stopped-2 of sweep 'stopped' is SUCCEEDED" in logs.stderr
    check_record(where, "stopped", GRID_POINTS)

    listing = kd("jobs", "--address", head.url, cwd=tmp_path, home=head.home)
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("stopped "))
    assert row[:5] == ["stopped", "kd-tune-stopped-2", "SUCCEEDED", "2", "4/4"]  # the newest of 2 jobs; 4 trials serve the 8 grid points
    assert row[5] == where["tracking"]  # the sweep's own record names its store and experiment
    print(f"\nsubmit returned -> first epoch in storage: {first_epoch:.1f} s; kd-tune stop (CLI, until STOPPED): {took:.1f} s")


def test_token_authentication_finds_the_token_as_rays_job_cli_does(head: RayHead, where: dict[str, str], write_space: Callable[..., Path],
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head wants a token: the CLI finds it in ~/.ray/auth_token with $RAY_AUTH_MODE unset, token or disabled, and
    in $RAY_AUTH_TOKEN_PATH; without one, or with a wrong one, each job command says so in one line (exit 2) and
    nothing reaches the cluster."""
    client = _client(head, monkeypatch)
    before = client.list_jobs()
    for mode in (None, "token", "disabled"):
        res = kd("jobs", "--address", head.url, cwd=tmp_path, home=head.home, env={"RAY_AUTH_MODE": mode} if mode else None)
        assert res.returncode == 0 and head.url in res.stdout.splitlines()[0], (mode, res.stdout, res.stderr)
    empty = tmp_path / "empty-home"
    empty.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(f"{head.token}\n")
    res = kd("jobs", "--address", head.url, cwd=tmp_path, home=empty, env={"RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert res.returncode == 0, res.stderr
    missing = (f"the job server at {head.url} requires a token (Ray's token authentication is on there) and none was found: kd-tune "
               f"looked in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH and {empty / '.ray' / 'auth_token'}")
    good = write_space(FOLLOWED)
    cases = [
        (["submit", good, *_submit_flags(where)], {}, missing),
        (["submit", good, *_submit_flags(where)], {"RAY_AUTH_MODE": "token"}, missing),
        (["submit", good, *_submit_flags(where)], {"RAY_AUTH_TOKEN": "0" * 64}, "refused the token from $RAY_AUTH_TOKEN (Forbidden: Invalid authentication token)"),
        (["submit", good, *_submit_flags(where)], {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, f"$RAY_AUTH_TOKEN_PATH '{tmp_path / 'none'}' cannot be read"),
        (["logs", "followed"], {}, missing),
        (["stop", "followed"], {}, missing),
        (["resume", "followed", "--storage", where["storage"]], {}, missing),
    ]
    for argv, env, problem in cases:
        res = kd(*argv, "--address", head.url, cwd=tmp_path, home=empty, env=env)
        assert res.returncode == 2 and problem in res.stderr and "Traceback" not in res.stderr, (argv, env, res.stderr)
        assert len(res.stderr.splitlines()) == 2, res.stderr  # the line, and where --help is
        assert head.token not in res.stdout + res.stderr
    assert client.list_jobs() == before  # nothing reached the job server
    assert not Path(where["storage"], "followed").exists()


def test_without_token_authentication_a_sweep_runs_as_a_job(open_head: RayHead, write_space: Callable[..., Path], tmp_path: Path) -> None:
    """Token authentication off: a sweep is submitted and followed to its end (a token file here, another cluster's, is
    neither needed nor in the way)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    shared = {"storage": str(tmp_path / "store"), "tracking": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    space = write_space(tiny_space(name="open", dataset=DATASET, grid={"alpha": [0.5], "epochs": [1]}))
    res = kd("submit", space, "--address", open_head.url, *_submit_flags(shared), cwd=tmp_path, home=home)
    assert res.returncode == 0, res.stderr
    logs = kd("logs", "open", "--follow", "--address", open_head.url, cwd=tmp_path, home=home)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr[-3000:]
    assert "sweep 'open': 1/1 grid points finished, 0 errored, 0 diverged" in logs.stdout
    check_record(shared, "open", 1)
