"""kd-tune on PostgreSQL, a team's tracking database (issue 40): a real PostgreSQL server (Debian's binaries, started by
tests/postgres_server.py), MLflow's server on it as cluster_postgres.yaml runs it on the head, real sweeps through the
CLI with a SIGKILLed driver and a resume, the report; and the one-line refusals of a database that cannot serve,
before anything trains.

Why its own tests: sqlite forgives what PostgreSQL refuses (a string longer than its column, a NUL character), a
server's database can be down while the server answers, and ray#29749 (Ray's MLflow callback giving ``mlflow.runName``
both as the run's name and as a tag) broke PostgreSQL alone, on the tags table's primary key.
"""

from __future__ import annotations

import getpass
import multiprocessing
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.errors import TrackingStoreError
from kd_tune.sweep.state.sweep_files import SWEEP_FILE
from kd_tune.tracking.store import open_store
from kd_tune.tracking.store_checks import check_database, check_tracking_store, shown_uri

from .conftest import REPO
from .helpers import SPACE, Sweep, check_record, kill_tree
from .postgres_server import PASSWORD, PostgresMlflowServer, PostgresServer, postgres_bin
from .servers import free_port

needs_postgres = pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL's server (apt-get install postgresql; .ci/run installs it)")

EPOCHS = 2
# SPACE's data, teacher (from the `teachers` cache) and students at 1 and 2 epochs: 3 trials (alpha 0, alpha 1,
# scratch), 6 grid points, ~1 s an epoch. Two CPUs run two trials at once, so when the first trial has finished the
# third has not: the kill lands with runs finished, runs open and a trial not started.
SMALL = {**SPACE, "grid": {"alpha": [0.0, 1.0], "epochs": [1, EPOCHS]}}
GRID_POINTS = 6


def recipe_backend() -> str:
    """The MLflow server's database URI in cluster_postgres.yaml (its ``KD_TUNE_MLFLOW_BACKEND``): the tests serve that
    very URI, so the recipe's form (no host, no password: the Unix socket) is the one tested."""
    config = yaml.safe_load((REPO / "cluster_postgres.yaml").read_text())
    (uri,) = re.findall(r"KD_TUNE_MLFLOW_BACKEND=(\S+?)'", " ".join(config["head_setup_commands"]))
    return str(uri)


class StoreSweep(Sweep):
    """:class:`~tests.helpers.Sweep` tracked in ``tracking_uri`` (a server or a database) instead of the folder's sqlite file."""

    def __init__(self, folder: Path, space: Path, teachers: Path, tracking_uri: str) -> None:
        super().__init__(folder, space, teachers)
        self.tracking_uri = tracking_uri
        self.env["MLFLOW_TRACKING_URI"] = tracking_uri

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def team_server(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresMlflowServer]:
    """cluster_postgres.yaml's head: a role named after the user the server runs as, a database it owns, and ``kd-tune ui``
    on the recipe's URI over the Unix socket."""
    backend = recipe_backend()
    database = backend.rsplit("/", 1)[1]
    postgres.sql(f'CREATE ROLE "{getpass.getuser()}" LOGIN', f'CREATE DATABASE {database} OWNER "{getpass.getuser()}"')
    with PostgresMlflowServer(tmp_path_factory.mktemp("team-mlflow"), backend, env=postgres.socket_env()) as server:
        yield server


def duplicates(postgres: PostgresServer, database: str) -> dict[str, list[tuple[object, ...]]]:
    """What the database itself holds twice, read with SQL: a run's ``mlflow.runName`` tag (ray#29749), a tag that
    disagrees with the run's name, a step of a metric."""
    return {
        "runName tags": postgres.sql("SELECT run_uuid, count(*) FROM tags WHERE key = 'mlflow.runName' GROUP BY run_uuid HAVING count(*) <> 1",
                                     database=database),
        "runs without their name as tag": postgres.sql("SELECT r.run_uuid FROM runs r LEFT JOIN tags t ON t.run_uuid = r.run_uuid AND "
                                                       "t.key = 'mlflow.runName' WHERE t.value IS DISTINCT FROM r.name", database=database),
        "metric steps": postgres.sql("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step HAVING count(*) > 1",
                                     database=database),
    }


@needs_postgres
@pytest.mark.integration
@pytest.mark.slow
def test_kill_and_resume_on_a_team_server_on_postgres(team_server: PostgresMlflowServer, postgres: PostgresServer,
                                                      write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    """A sweep on the team's server (MLflow on PostgreSQL), its driver and Ray SIGKILLed mid-sweep, then resumed: one
    run per grid point, no step twice, every run FINISHED, no run's name tagged twice; then the report from it."""
    sweep = StoreSweep(tmp_path, write_space(SMALL), teachers, team_server.url)

    def mid_sweep(*_: object) -> bool:
        """Checkpoints on disk (a trial persists one per epoch; Tune's result files can lag behind them): one of the 3
        trials has trained all its epochs, another has not."""
        counts = [len(list(t.glob("checkpoint_*"))) for t in sweep.dir.glob("*") if t.is_dir()]
        return 1 <= sum(c >= EPOCHS for c in counts) < 3

    proc = sweep.start("sweep", str(sweep.space))
    sweep.wait_until(proc, mid_sweep)
    kill_tree(proc)
    untouched = {r.info.run_id: r.info.end_time for r in sweep.child_runs() if r.info.status == "FINISHED"}
    assert len(sweep.child_runs()) < GRID_POINTS or len(untouched) < GRID_POINTS, "the kill came after the sweep's end"

    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{GRID_POINTS}/{GRID_POINTS} grid points finished" in done.stdout
    check_record(sweep, untouched, GRID_POINTS)
    database = recipe_backend().rsplit("/", 1)[1]
    assert duplicates(postgres, database) == {"runName tags": [], "runs without their name as tag": [], "metric steps": []}
    # The record is in PostgreSQL, not in a sqlite file beside the sweep.
    assert postgres.sql("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'kd_tune.role' "
                        "WHERE t.value IN ('student', 'scratch')", database=database) == [(GRID_POINTS,)]
    assert not (tmp_path / "mlflow.db").exists()

    report = sweep.run("report", "study", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert len(runs) == GRID_POINTS and runs["run_id"].nunique() == GRID_POINTS
    assert set(runs["run_id"]) == {r.info.run_id for r in sweep.child_runs()}
    parent = sweep.client.get_run(sweep.child_runs()[0].data.tags["mlflow.parentRunId"])
    logged = {f.path for f in sweep.client.list_artifacts(parent.info.run_id, "report")}
    assert "report/runs.csv" in logged  # through the server into its artifact store


@needs_postgres
@pytest.mark.integration
def test_a_sweep_tracked_in_postgres_directly(postgres: PostgresServer, write_space: Callable[..., Path], tmp_path: Path,
                                              teachers: Path) -> None:
    """A driver that opens the database itself (``--tracking-uri postgresql+psycopg2://...``, a new database: MLflow makes
    its tables there) records the same whole sweep. The password comes from libpq's ``PGPASSWORD`` (or ``~/.pgpass``), as
    docs/mlflow.md advises: a URI is printed at a sweep's end and kept in its record, so it should not carry one."""
    with_password = postgres.create_database("direct", "kd_direct", "direct-secret")
    uri = with_password.replace(":direct-secret@", "@")
    sweep = StoreSweep(tmp_path, write_space(SMALL), teachers, uri)
    sweep.env["PGPASSWORD"] = "direct-secret"
    res = sweep.run("sweep", str(sweep.space))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", "direct-secret")  # this process reads the record with the same URI
        check_record(sweep, {}, GRID_POINTS)
    assert duplicates(postgres, "direct") == {"runName tags": [], "runs without their name as tag": [], "metric steps": []}
    assert "direct-secret" not in res.stdout + res.stderr + (sweep.storage / "study" / SWEEP_FILE).read_text()


_FORK = multiprocessing.get_context("fork")


def _open(uri: str, start: threading.Barrier) -> None:
    start.wait(timeout=120)
    assert open_store(uri).get_experiment_by_name("Default") is not None


@needs_postgres
@pytest.mark.integration
def test_processes_racing_to_create_a_postgres_store_all_succeed(postgres: PostgresServer) -> None:
    """Three processes open one new database at once (two drivers started together, or a driver and ``kd-tune ui``): on
    PostgreSQL all of them start MLflow's migrations, and the losers fail on a unique index of PostgreSQL's catalog
    (``pg_type_typname_nsp_index``, alembic's version table made twice: seen on every round while this test was
    written); :func:`open_store` opens the store again after such a loss. Every process gets the store, migrated once."""
    import mlflow  # noqa: F401 - imported before the fork, as a command has it by the time it opens the store
    from mlflow.store.db.utils import _get_latest_schema_revision

    for i in range(2):
        uri = postgres.create_database(f"race{i}", f"kd_race{i}", "race-pw")
        start = _FORK.Barrier(3)
        procs = [_FORK.Process(target=_open, args=(uri, start)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0, 0, 0], f"round {i}: a process failed to open the new store"
        assert postgres.sql("SELECT version_num FROM alembic_version", database=f"race{i}") == [(_get_latest_schema_revision(),)]


@pytest.fixture
def refusals(tmp_path: Path, write_space: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> Callable[[str], tuple[int, str, float]]:
    """``kd-tune sweep SPACE --tracking-uri URI`` in this process (main() is the CLI): exit status, stderr, seconds."""
    space = write_space(SMALL)
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass of this machine's user answers for a URI without a password

    def sweep(uri: str) -> tuple[int, str, float]:
        capsys.readouterr()
        started = time.monotonic()
        code = main(["sweep", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "store"), "--quiet"])
        seconds = time.monotonic() - started
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, err
        return code, err, seconds

    return sweep


def assert_refused(code: int, err: str, seconds: float, uri: str, *said: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[1:] == ["(see 'kd-tune sweep --help')"], err  # one line of error, then the CLI's hint for every usage error
    assert f"the tracking store {shown_uri(uri)} " in lines[0] and "; allowed: " in lines[0] and "nothing started" in lines[0], lines[0]
    for s in said:
        assert s in lines[0], (s, lines[0])
    assert PASSWORD not in err and "direct-secret" not in err  # passwords are shown as ***
    # MLflow alone retries a connection for ~100 s; the probe answers at once (10 s connect timeout, for a silent host).
    assert seconds < 30, seconds


@needs_postgres
@pytest.mark.integration
def test_a_database_that_cannot_serve_is_refused_before_anything_starts(postgres: PostgresServer, tmp_path: Path,
                                                                         refusals: Callable[[str], tuple[int, str, float]]) -> None:
    nobody = free_port()
    postgres.sql("CREATE ROLE visitor LOGIN PASSWORD 'visitor-pw'", "CREATE DATABASE not_theirs")  # owned by the superuser
    cases = [
        (postgres.uri("mlflow", port=nobody), f'port {nobody} failed: Connection refused'),
        (postgres.uri("no_such_db"), 'database "no_such_db" does not exist'),
        (postgres.uri("postgres", password="wrong"), "password authentication failed"),
        (postgres.uri("postgres").replace(f":{PASSWORD}@", "@"), "no password supplied"),  # and none in PGPASSWORD or ~/.pgpass
        # PostgreSQL 15: a role that does not own the database may not make tables in its schema public
        (postgres.uri("not_theirs", "visitor", "visitor-pw"), "role 'visitor' may not make tables", "GRANT CREATE ON SCHEMA public TO visitor"),
    ]
    for uri, *said in cases:
        assert_refused(*refusals(uri), uri, *said)
    assert not (tmp_path / "store" / "study").exists()  # no sweep started, no folder written
    assert postgres.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database="not_theirs") == [(0,)]  # nothing made
    # The database that exists and is owned by the role passes (the probe is not refusing everything).
    check_tracking_store(postgres.create_database("fine", "kd_fine", "fine-pw"), "nothing started")


@needs_postgres
@pytest.mark.integration
def test_a_server_whose_database_is_down_is_refused(team_server: PostgresMlflowServer, postgres: PostgresServer,
                                                    refusals: Callable[[str], tuple[int, str, float]]) -> None:
    """MLflow's server keeps answering (``/health``: OK) when its database is gone, and says 503 TEMPORARILY_UNAVAILABLE to
    every request: one line naming the server and the database's error, exit 2. Once the database is back, it passes."""
    check_tracking_store(team_server.url, "nothing started")
    postgres.stop()
    try:
        code, err, seconds = refusals(team_server.url)
        assert_refused(code, err, seconds, team_server.url, "answers, but its own database does not", "No such file or directory")
    finally:
        postgres.start()  # same port, same cluster: the module's other tests go on with it
    check_tracking_store(team_server.url, "nothing started")  # the server reconnects by itself (SQLAlchemy's pool_pre_ping)


def test_passwords_are_masked_and_a_missing_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server needed: a URI's password never reaches a message; a plain ``postgresql://`` whose driver module is not
    installed (SQLAlchemy 2.1 takes psycopg 3 for it, kd-tune's extra installs psycopg2) is one line that says which."""
    assert shown_uri("postgresql+psycopg2://kd:s3cr%40t@db.example:5432/mlflow") == "postgresql+psycopg2://kd:***@db.example:5432/mlflow"
    assert shown_uri("postgresql+psycopg2:///mlflow") == "postgresql+psycopg2:///mlflow"
    assert shown_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails, as where it is not installed
    with pytest.raises(TrackingStoreError) as e:
        check_database("postgresql://kd:pw@127.0.0.1:1/mlflow", "nothing started")
    message = str(e.value)
    assert "'psycopg'" in message and "kd-tune[postgres]" in message and "postgresql+psycopg2://" in message and ":pw@" not in message
    assert e.value.exit_code == 2
    for malformed in ("postgresql+psycopg2://kd@127.0.0.1:port/mlflow", "postgres://kd@127.0.0.1:5432/mlflow"):
        with pytest.raises(TrackingStoreError, match="not a database URI .*; allowed: postgresql\\+psycopg2://"):
            check_tracking_store(malformed, "nothing started")
