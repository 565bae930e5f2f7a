"""A tracking server outage never stops training (real CLI, real Ray, a real ``mlflow server`` killed and
restarted by PID on the same port and store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.sweep.callback import RETRY_MAX_ENV
from kd_tune.sweep.hooks import GATE_ENV

from .conftest import tiny_space
from .helpers import Sweep, check_record, kill_tree
from .servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 8
# Two trials side by side (~1 s an epoch each); epochs 3 and 8 share a trial, so a grid point ends
# (with its model) while the store is away.
SPACE = tiny_space(
    name="study",
    dataset={"name": "mnist", "train_size": 1800, "val_size": 200},
    student={"widths": [16, 32], "lr": 0.003, "batch_size": 16},
    grid={"alpha": [0.0, 1.0], "temperature": [3.0], "epochs": [3, EPOCHS], "seed": [0]},
)
# The MLflow client's whole retry budget is about 2 s here (1 retry, 1 s backoff); each outage lasts
# several epochs, far longer. The outbox retries at least every second once the store is away.
CLIENT_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                 RETRY_MAX_ENV: "1"}


def newest(p: dict[str, list[int]]) -> int:
    return max((max(e) for e in p.values() if e), default=0)


def logged_steps(client: MlflowClient) -> int:
    """The highest epoch the store has for any student run of the sweep."""
    exp = client.get_experiment_by_name("study")
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`kd_tune.epochs` = '{EPOCHS}'")
    return max((m.step for r in runs for m in client.get_metric_history(r.info.run_id, "test_acc")), default=0)


def ended_at_3(client: MlflowClient) -> int:
    """How many epochs-3 grid points the store has ended (FINISHED, with the model the outbox shipped after outage 1)."""
    exp = client.get_experiment_by_name("study")
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`kd_tune.epochs` = '3' and attributes.status = 'FINISHED'")
    return len(runs)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)  # polling a condition against a deadline
    raise AssertionError(f"not reached: {what}")


def start(tmp_path: Path, write_space: Callable[..., Path], teachers: Path) -> tuple[Sweep, MlflowServer]:
    server = MlflowServer(tmp_path / "server").__enter__()
    sweep = Sweep(tmp_path, write_space(SPACE), teachers)  # the teacher comes from the cache (conftest's teachers fixture)
    sweep.env.update(CLIENT_BUDGET)
    sweep.client = MlflowClient(server.url)
    return sweep, server


def restart(server: MlflowServer) -> MlflowServer:
    return MlflowServer(server.folder, port=server.port).__enter__()


def test_training_goes_on_through_outages_and_the_record_completes(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    sweep, server = start(tmp_path, write_space, teachers)
    gate = tmp_path / "gate"  # while it exists, trials wait after each epoch (kd_tune.faults)
    sweep.env[GATE_ENV] = str(gate)
    try:
        proc = sweep.start("sweep", str(sweep.space), "--tracking-uri", server.url, "--tracking-wait", "3")
        sweep.wait_until(proc, lambda p, base: newest(p) >= 1)
        # The server's graceful stop can take seconds on a busy machine: the trials wait meanwhile, so that the
        # outage begins with epochs left to train (else they could all be trained before the stop returned).
        gate.touch()
        server.stop()  # outage 1: the sweep must go on and catch up by itself
        at_kill = newest(sweep.progress())
        gate.unlink()
        # Trials trained 3 more epochs meanwhile, and each passed epoch 3, so both epochs-3 grid points ended (with their
        # models) during this outage: outage 2 lasts past the sweep's end, and by then Tune has deleted the epoch-3
        # checkpoints (it keeps two), so a grid point ending during outage 2 would have no model for sync to log.
        sweep.wait_until(proc, lambda p, base: newest(p) >= at_kill + 3 and len(p) == 2 and all(max(e, default=0) >= 3 for e in p.values()))
        gate.touch()  # hold the trials, so that the sweep cannot end while the server restarts (seconds)
        server = restart(server)
        at_restart = newest(sweep.progress())

        def caught_up() -> bool:
            assert proc.poll() is None, f"the sweep ended before catching up: {proc.stdout.read() if proc.stdout else ''}"
            return logged_steps(sweep.client) >= at_restart and ended_at_3(sweep.client) == 2

        wait_for(caught_up, "the sweep catching up while it runs")
        server.stop()  # outage 2 lasts past the sweep's end: it must end all the same, with exit 3 and the command
        gate.unlink()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 3, out[-3000:]
        # kd-tune's own output has no traceback (a Ray worker SIGTERMed by ray.shutdown() in the middle of
        # garbage collection may print Python's "Exception ignored" one, prefixed "(kd_trainable pid=...)": Ray's).
        assert not [ln for ln in out.splitlines() if "Traceback" in ln and "pid=" not in ln], out[-3000:]
        assert out.count("is unreachable") == 2 and out.count("is back after") == 1, out[-3000:]
        assert "4/4 grid points finished" in out
        assert "still unreachable" in out and "kd-tune sync study" in out

        server = restart(server)
        synced = sweep.run("sync", "study")
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert "epochs of metrics" in synced.stdout and "complete already" not in synced.stdout
        check_record(sweep, {}, 4)  # every run FINISHED, every epoch of every metric once, parent FINISHED
        for r in sweep.child_runs():
            assert len(r.outputs.model_outputs) == 1, r.info.run_name  # each grid point's model, the one ended mid-outage too
        again = sweep.run("sync", "study")
        assert again.returncode == 0 and "complete already" in again.stdout
    finally:
        server.stop()


def test_a_driver_killed_during_an_outage_is_completed_by_resume(write_space: Callable[..., Path], tmp_path: Path, teachers: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sweep, server = start(tmp_path, write_space, teachers)
    gate = tmp_path / "gate"  # while it exists, trials wait after each epoch (kd_tune.faults)
    sweep.env[GATE_ENV] = str(gate)
    try:
        proc = sweep.start("sweep", str(sweep.space), "--tracking-uri", server.url)
        sweep.wait_until(proc, lambda p, base: newest(p) >= 1)
        # As in the test above: the trials wait while the server stops (seconds on a busy machine), else they could
        # train to their last epoch before it is down, and the kill point below would never come (seen once in CI).
        gate.touch()
        server.stop()
        at_kill = newest(sweep.progress())
        gate.unlink()
        sweep.wait_until(proc, lambda p, base: newest(p) >= at_kill + 2)  # epochs the store never saw
        kill_tree(proc)

        # While the store is away every command says so in one line (no traceback) and starts nothing (in this
        # process: main() is the CLI; tests/test_cli.py checks that the real process exits as main() returns).
        for k, v in CLIENT_BUDGET.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(tmp_path)
        other = write_space({**SPACE, "name": "other"}, "other.yaml")
        store = ("--storage", str(sweep.storage))
        for args in (("resume", "study", *store), ("sync", "study", *store), ("report", "study", *store),
                     ("sweep", str(other), "--tracking-uri", server.url, *store)):
            capsys.readouterr()
            assert main(list(args)) == 1, args
            out, err = capsys.readouterr()
            assert "Traceback" not in out + err and "cannot be reached" in err and len(err.strip().splitlines()) == 1, (args, out, err)
        assert not (sweep.storage / "other").exists()
        assert sweep.run("status", "study").returncode == 0  # status needs no store

        server = restart(server)
        done = sweep.run("resume", "study")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "written from the trials' checkpoints" in done.stdout
        check_record(sweep, {}, 4)
    finally:
        server.stop()
