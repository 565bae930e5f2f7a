"""A real PostgreSQL server for the tests, and a team's MLflow server on it (tests/test_postgres.py).

- :class:`PostgresServer`: Debian's ``postgresql`` binaries (``initdb``, ``postgres``) on 127.0.0.1 and a free port,
  its cluster in a temporary folder of its own, stopped by PID afterwards. PostgreSQL refuses to run as root, so a
  test run as root starts it as the ``postgres`` system user the package made (``subprocess``'s ``user=``), in a
  folder that user owns; as anyone else it runs as that user.
- :class:`PostgresMlflowServer`: ``kd-tune ui`` (``mlflow server``, one worker) with ``--backend-store-uri
  postgresql+psycopg2://...`` on one of its databases, artifacts proxied into a folder: what cluster.yaml's head runs.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .servers import MlflowServer, _start, free_port, kill_session, session_pids

SUPERUSER = "kd_admin"
PASSWORD = "kd-secret"  # scram over TCP, as a team's server would require; the tests' URIs carry it


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH (other distributions, Homebrew), else Debian's newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH); ``None`` when PostgreSQL is not installed."""
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
    return Path(found[-1]).parent if found else None


def _run_as() -> str | None:
    """The user PostgreSQL runs as: ``postgres`` when this process is root (``postgres`` refuses root), else this one."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise AssertionError("running as root, and there is no 'postgres' user to run PostgreSQL as (Debian's postgresql package makes it)") from None
    return "postgres"


class PostgresServer:
    """``initdb`` + ``postgres`` on 127.0.0.1:``port``, superuser :data:`SUPERUSER` with :data:`PASSWORD`.

    The cluster lives in a short /tmp folder of its own (its Unix socket path must fit 107 bytes, and pytest's
    tmp_path under /tmp/pytest-of-root is closed to the ``postgres`` user). Made without fsync: the tests need a
    database that answers, not one that survives a power cut. :meth:`stop` and :meth:`start` keep the cluster, so a
    test can take the database away under a running MLflow server and bring it back on the same port.
    """

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None, "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        self.bin, self.user = bin_dir, _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="kdpg-", dir="/tmp"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[Any] | None = None
        try:
            self.sockets.mkdir()
            pwfile = self.root / "pw"
            pwfile.write_text(PASSWORD + "\n")
            if self.user:
                for p in (self.root, self.sockets, pwfile):
                    shutil.chown(p, self.user, self.user)
            # trust on the Unix socket (only this cluster's owner reaches it), a password over TCP as on a team's host
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile), "--auth-local", "trust",
                       "--auth-host", "scram-sha-256", "--no-sync", "--encoding", "UTF8", "--locale", "C"])
            self.start()
        except BaseException:
            self.stop()
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run(cmd, user=self.user, group=self.user, extra_groups=[] if self.user else None, capture_output=True, text=True,
                             timeout=120, cwd=self.root)
        assert res.returncode == 0, f"{cmd[0]} failed: {res.stdout[-2000:]}{res.stderr[-2000:]}"

    def start(self) -> None:
        """Start (or restart) the server on its port and wait until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.sockets), "-p", str(self.port), "-h", "127.0.0.1",
               "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, user=self.user,
                                         group=self.user, extra_groups=[] if self.user else None)
        self.proc.log_path = str(self.log)  # type: ignore[attr-defined]
        self._wait_until_ready()

    def _wait_until_ready(self, timeout: float = 60) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"postgres exited: {self.log.read_text()[-3000:]}"
            try:
                psycopg2.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)  # polling a condition against a deadline

    def dsn(self, database: str, user: str = SUPERUSER, password: str = PASSWORD) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user} password={password}"

    def uri(self, database: str, user: str = SUPERUSER, password: str = PASSWORD, port: int | None = None) -> str:
        """An SQLAlchemy / MLflow URI of a database here (MLflow's ``--backend-store-uri``, kd-tune's ``--tracking-uri``)."""
        return f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{port or self.port}/{database}"

    def sql(self, *statements: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run statements as the superuser, each in autocommit (CREATE DATABASE cannot run in a transaction); the
        rows of the last one that returns rows."""
        import psycopg2

        rows: list[tuple[Any, ...]] = []
        con = psycopg2.connect(self.dsn(database), connect_timeout=10)
        try:
            con.autocommit = True
            with con.cursor() as cur:
                for s in statements:
                    cur.execute(s)
                    if cur.description is not None:
                        rows = list(cur.fetchall())
        finally:
            con.close()
        return rows

    def create_database(self, name: str, owner: str, password: str) -> str:
        """A role and a database it owns, as cluster.yaml's head setup makes them; the database's URI."""
        self.sql(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}'", f"CREATE DATABASE {name} OWNER {owner}")
        return self.uri(name, owner, password)

    def socket_env(self) -> dict[str, str]:
        """libpq's environment for this server's Unix socket: a URI without host and port (``postgresql+psycopg2:///DB``,
        cluster_postgres.yaml's) reaches it as it reaches the head's own PostgreSQL at Debian's default socket."""
        return {"PGHOST": str(self.sockets), "PGPORT": str(self.port)}

    def stop(self) -> None:
        """A fast shutdown (SIGINT: clients cut off, the cluster left whole), then anything of its session killed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_session(self.proc)
        assert not session_pids(self.proc.pid)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresMlflowServer(MlflowServer):
    """``kd-tune ui`` over a PostgreSQL database (``backend``, a ``postgresql+psycopg2://`` URI), artifacts proxied into
    ``folder / 'artifacts'``: a team's tracking server as cluster.yaml runs it on the head. Started like
    :class:`~tests.servers.MlflowServer` (its ``__enter__`` waits for ``/health``, :meth:`stop` kills its session)."""

    def __init__(self, folder: Path, backend: str, env: dict[str, str] | None = None) -> None:
        # Not MlflowServer.__init__, which starts a server on a sqlite file: the same attributes, another store.
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = backend
        self.artifacts = folder / "artifacts"
        self.log = folder / "server.log"
        self.proc = _start([sys.executable, "-m", "kd_tune.cli", "ui", "--tracking-uri", backend, "--port", str(self.port),
                            "--artifacts-destination", str(self.artifacts)], self.log, env=env, cwd=folder)
