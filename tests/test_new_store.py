"""Several kd-tune processes that open a new MLflow store at once: MLflow creates its tables in the first process that
opens it, with nothing of its own to stop two doing it together (issue 35: two sweeps started together on a new
``sqlite:///mlflow.db``, one failed on alembic's version row). kd-tune opens a local store under a lock beside it."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kd_tune.files import exclusive_lock
from kd_tune.tracking.store import local_store_path, open_store

from .conftest import tiny_space
from .helpers import Sweep, check_record


def _open(uri: str, start: threading.Barrier, cwd: str) -> None:
    """A process of its own opening the store (the lock is between processes), once every party is at ``start``."""
    os.chdir(cwd)
    start.wait(timeout=120)
    client = open_store(uri)
    assert client.get_experiment_by_name("Default") is not None


def _processes(uri: str, n: int, cwd: Path, start: threading.Barrier) -> list[multiprocessing.process.BaseProcess]:
    """``n`` processes that open the store at ``uri`` once released by ``start`` (forked: each starts at once, mlflow
    imported already; forked before the test takes any lock, which a fork would otherwise hold on to)."""
    procs = [_FORK.Process(target=_open, args=(uri, start, str(cwd))) for _ in range(n)]
    for p in procs:
        p.start()
    return procs


_FORK = multiprocessing.get_context("fork")


def _revisions(db: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(db) as con:
        return list(con.execute("SELECT version_num FROM alembic_version"))


@pytest.mark.parametrize("uri_form", ["absolute", "relative"])
def test_processes_racing_to_create_a_sqlite_store_all_succeed(tmp_path: Path, uri_form: str) -> None:
    import mlflow  # noqa: F401 - imported before the fork, as a command has it by the time it opens the store
    from mlflow.store.db.utils import _get_latest_schema_revision

    # Three rounds, each on a new store, three processes each (without the lock one of two failed about one round in three).
    for i in range(3):
        db = tmp_path / f"r{i}" / "mlflow.db"
        uri = f"sqlite:///{db}" if uri_form == "absolute" else f"sqlite:///r{i}/mlflow.db"
        procs = _processes(uri, 3, tmp_path, _FORK.Barrier(3))
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0, 0, 0], f"round {i}: a process failed to open the new store"
        assert _revisions(db) == [(_get_latest_schema_revision(),)]  # migrated once, to MLflow's head
        assert (db.parent / "mlflow.db.lock").exists()


def _lock_waiters(lock: Path) -> int:
    """How many processes wait for a lock on ``lock`` now (``/proc/locks`` lists them with "->")."""
    inode = f":{os.stat(lock).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line + " ")


def test_the_store_is_made_only_under_the_lock(tmp_path: Path) -> None:
    import mlflow  # noqa: F401

    db = tmp_path / "mlflow.db"
    lock = tmp_path / "mlflow.db.lock"
    start = _FORK.Barrier(2)
    (proc,) = _processes(f"sqlite:///{db}", 1, tmp_path, start)
    with exclusive_lock(lock) as held:  # another kd-tune process is making the store
        assert held
        start.wait(timeout=120)
        deadline = time.monotonic() + 120
        while _lock_waiters(lock) == 0:
            assert proc.is_alive() and time.monotonic() < deadline, "the process did not wait for the lock"
            time.sleep(0.02)  # polling a condition against a deadline
        assert not db.exists()  # it waits before MLflow touches the file
    proc.join(timeout=300)
    assert proc.exitcode == 0 and db.exists()


def test_where_the_lock_goes() -> None:
    assert local_store_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert local_store_path("sqlite:////abs/kd%20runs/mlflow.db") == Path("/abs/kd runs/mlflow.db")
    assert local_store_path("file:///abs/mlruns") == Path("/abs/mlruns")
    assert local_store_path("./mlruns") == Path("mlruns")
    for not_here in ("sqlite://", "sqlite:///:memory:", "postgresql://u@h/db", "http://127.0.0.1:5000", "databricks"):
        assert local_store_path(not_here) is None, not_here


def test_only_a_lost_creation_race_is_retried() -> None:
    """Another database is opened again only after what losing the race to create it raises (alembic's version row gone,
    a table or row made meanwhile), not after a connection error, which MLflow has retried for ~100 s already."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    from kd_tune.tracking.store import _lost_creation_race

    race = CommandError("Online migration expected to match one row when updating 'a' to 'b' in 'alembic_version'; 0 found")
    assert _lost_creation_race(race)
    assert _lost_creation_race(ProgrammingError("CREATE TABLE experiments", {}, Exception("relation already exists")))
    try:
        try:
            raise IntegrityError("INSERT INTO experiments", {}, Exception("duplicate key"))
        except IntegrityError as e:
            raise RuntimeError("MLflow's wrapper") from e
    except RuntimeError as wrapped:
        assert _lost_creation_race(wrapped)
    assert not _lost_creation_race(OperationalError("connect", {}, Exception("could not connect to server")))


def test_the_lock_is_skipped_where_it_cannot_be_made(tmp_path: Path) -> None:
    """A lock file that cannot be made (its folder missing, or read-only) leaves the block unlocked rather than failing."""
    ran = []
    with exclusive_lock(tmp_path / "missing" / "mlflow.db.lock") as held:
        ran.append(held)
    assert ran == [False]
    with exclusive_lock(tmp_path / "mlflow.db.lock") as held:
        ran.append(held)
    assert ran == [False, True]


@pytest.mark.integration
def test_two_sweeps_started_together_on_a_new_store(write_space: Callable[..., Path], tmp_path: Path) -> None:
    """Two real ``kd-tune sweep`` commands, started in the same second in a new folder: one default store
    (``sqlite:///mlflow.db``, not there yet), one storage, one teacher (trained by both at once). Both finish, each
    with one run per grid point."""
    space = write_space(tiny_space(name="study"))
    sweep = Sweep(tmp_path, space)
    assert not (tmp_path / "mlflow.db").exists()
    procs = {name: sweep.start("sweep", str(space), "--name", name) for name in ("a", "b")}
    outs = {}
    for name, proc in procs.items():
        outs[name], _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sweep {name}:\n{outs[name][-3000:]}"
    both = "".join(outs.values())
    assert both.count("Creating initial MLflow database tables") == 1, both[-3000:]  # the store was made once
    for name in ("a", "b"):
        check_record(sweep, {}, 4, name=name)
