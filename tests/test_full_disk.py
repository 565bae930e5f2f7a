"""A full disk (issue 35): the sweep's storage, its teacher cache or the MLflow store fills up. The command ends with one
line that names the full place, says that nothing finished is lost and how to go on; Ray's and MLflow's tracebacks of
it are one line each. Once there is room, the sweep goes on to the end: one run per grid point, each step once.

The full disks are real: small tmpfs mounts (the tests run as root), enlarged in place afterwards."""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ray.exceptions import RayTaskError

from kd_tune.errors import condensed_disk_full_logs, disk_full_cause

from .conftest import tiny_space
from .helpers import Sweep, check_record

SPACE = tiny_space(name="study")  # 2 trials for 4 grid points (epochs 1 and 2 share a trial); the whole sweep takes ~0.5 MB
GRID_POINTS = 4


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``size`` mounted on ``folder`` (a new one); yields what resizes it in place; unmounted at the end."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True) \
        if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        why = "no mount command" if mounted is None else mounted.stderr.strip() or f"exit {mounted.returncode}"
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one is not permitted here ({why})")

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(folder)], check=True)

    try:
        yield resize
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a process of the sweep still holds a file there


def _sweep(tmp_path: Path, write_space: Callable[..., Path], cwd: Path | None = None) -> Sweep:
    """The real CLI on SPACE with ``--storage`` given (the resume command then names it), run in ``cwd`` (MLflow's
    default store is there), its storage ``tmp_path/store``."""
    sweep = Sweep(cwd or tmp_path, write_space(SPACE))
    sweep.env.pop("KD_TUNE_STORAGE")
    sweep.storage, sweep.dir = tmp_path / "store", tmp_path / "store" / "study"
    return sweep


def _last_line(res: subprocess.CompletedProcess[str]) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]  # Ray's and MLflow's reports of the full disk are one line each
    return res.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_a_full_storage_is_said_and_resume_completes_the_sweep(write_space: Callable[..., Path], tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, write_space)
    store = sweep.storage
    with tmpfs(store, "300k") as resize:  # room for the teacher (~110 kB), not for the trials' checkpoints
        res = sweep.run("sweep", str(sweep.space), "--storage", str(store))
        last = _last_line(res)
        assert last.startswith(f"kd-tune sweep: error: the sweep's storage {store} is full ("), last
        assert last.endswith(f"): nothing finished is lost; once there is room, continue with: kd-tune resume study --storage {store}"), last
        assert "EOFError" not in res.stderr  # what Tune ended with, reading back the error file it could not write whole
        assert "No space left on device" in res.stderr  # Ray's reports, condensed

        resize("200m")
        done = sweep.run("resume", "study", "--storage", str(store))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # Every grid point in the table too, although the full disk cut the result files that the table reads first.
        assert f"{GRID_POINTS}/{GRID_POINTS} grid points finished" in done.stdout, done.stdout[-3000:]
        check_record(sweep, {}, GRID_POINTS)


@pytest.mark.integration
def test_a_full_teacher_cache_is_said_and_the_same_command_then_completes(write_space: Callable[..., Path], tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, write_space)
    store = sweep.storage
    with tmpfs(store, "64k") as resize:  # the teacher's cache entry (~110 kB) does not fit
        args = ("sweep", str(sweep.space), "--storage", str(store))
        res = sweep.run(*args)
        last = _last_line(res)
        assert last.startswith(f"kd-tune sweep: error: the sweep's storage {store} is full (writing the teacher cache) ("), last
        assert f"No space left on device: '{store}/_teachers/" in last
        # No Tune state was saved yet: not a resume, but the same command (it keeps the sweep's MLflow parent run).
        assert last.endswith("): nothing finished is lost; once there is room, run the same kd-tune sweep command again"), last

        resize("200m")
        done = sweep.run(*args)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"{GRID_POINTS}/{GRID_POINTS} grid points finished" in done.stdout
        check_record(sweep, {}, GRID_POINTS)


@pytest.mark.integration
def test_a_full_tracking_store_is_said_and_resume_completes_the_record(write_space: Callable[..., Path], tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"  # MLflow's default store (mlflow.db, and its artifacts in mlruns/) on a small disk of its own
    with tmpfs(cwd, "1200k") as resize:  # room for the new store's tables (~1 MB), not for the sweep's runs and models
        sweep = _sweep(tmp_path, write_space, cwd)
        res = sweep.run("sweep", str(sweep.space), "--storage", str(sweep.storage))
        last = _last_line(res)
        uri = f"sqlite:///{cwd / 'mlflow.db'}"
        assert last.startswith(f"kd-tune sweep: error: the MLflow tracking store {uri} is full ("), last
        assert last.endswith(f"): nothing finished is lost; once there is room, continue with: kd-tune resume study --storage {sweep.storage}"), last

        resize("200m")
        done = sweep.run("resume", "study", "--storage", str(sweep.storage))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        check_record(sweep, {}, GRID_POINTS)


def test_a_full_disk_is_found_deep_in_an_error() -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device")
    # A trial's checkpoint copy failed inside Ray's task error (Ray keeps the task's exception as .cause).
    ray_error = RayTaskError("ImplicitFunc.train", "Traceback ...", enospc).as_instanceof_cause()
    assert disk_full_cause(ray_error) is enospc
    # SQLite's own words (no errno) under SQLAlchemy's and MLflow's errors, as a cause or a context.
    full_db = sqlite3.OperationalError("database or disk is full")
    try:
        try:
            raise RuntimeError("(raised as a result of Query-invoked autoflush)") from full_db
        except RuntimeError:
            raise ValueError("closing the runs failed") from None
    except ValueError as e:
        assert e.__suppress_context__ and disk_full_cause(e) is full_db
    assert disk_full_cause(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    for other in (EOFError("Ran out of input"), OSError(errno.EACCES, "Permission denied"), RuntimeError("no space for you")):
        assert disk_full_cause(other) is None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_library_tracebacks_of_a_full_disk_become_one_line() -> None:
    log = logging.getLogger("ray.tune.execution.tune_controller")  # Ray's loggers do not propagate to pytest's: a handler of our own
    seen = _Records()
    log.addHandler(seen)
    full = RayTaskError("ImplicitFunc.train", "Traceback ...", OSError(errno.ENOSPC, "No space left on device")).as_instanceof_cause()
    other = ValueError("a bug")
    try:
        with condensed_disk_full_logs():
            log.error("Trial task failed for trial %s", "a0-T3-e1+2-s0", exc_info=full)
            log.error("Trial task failed for trial %s", "a1-T3-e1+2-s0", exc_info=other)
        log.error("after", exc_info=full)  # the filter is gone with the block
    finally:
        log.removeHandler(seen)
    condensed, kept, after = seen.records
    assert condensed.getMessage() == "Trial task failed for trial a0-T3-e1+2-s0: [Errno 28] No space left on device"
    assert condensed.exc_info is None
    assert kept.exc_info is not None and kept.exc_info[1] is other  # any other error keeps its traceback
    assert after.exc_info is not None
