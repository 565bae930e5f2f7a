"""Which MLflow tracking store a command writes to, and opening it (a new one made once, whoever else races for it);
whether it answers is :mod:`kd_tune.tracking.store_checks`'.

Light to import (MLflow itself is imported only when a URI is resolved), so that a sweep can check
its store before Ray starts, while the heavy modules load on a thread beside Ray's start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from kd_tune.files import exclusive_lock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def resolve_tracking_uri(uri: str | None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else MLflow's default store (``mlflow.get_tracking_uri()``).

    MLflow is imported (0.8 s) only for its default: a given URI is used as it is, as MLflow would. Code
    that uses MLflow's fluent API sets the URI itself (see :func:`kd_tune.tracking.logged_models.using_tracking_uri`).
    """
    if uri:
        return uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    import mlflow

    return str(mlflow.get_tracking_uri())


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's other SQLAlchemy stores (``postgresql+psycopg2://`` too)
_MIGRATION_RACE_ERRORS = ("CommandError", "ProgrammingError", "IntegrityError")
"""What losing a race to create a database store raises (alembic's version row gone, a table or row already there);
a connection error (``OperationalError``) is not one: MLflow has already retried that for about 100 s."""


def local_store_path(uri: str) -> Path | None:
    """The file (``sqlite:///PATH``) or folder (``file:///PATH``, a plain path) of a tracking store on this
    machine's file system; ``None`` for any other store and for an in-memory database."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        db = unquote(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
        return Path(db) if db and db != ":memory:" and not db.startswith("file:") else None
    if scheme in ("", "file") and not uri.startswith("databricks"):  # "databricks": MLflow's word for the workspace's server
        path = unquote(urlparse(uri).path) if scheme else uri
        return Path(path) if path else None
    return None


def open_store(uri: str, *, attempts: int = 3) -> MlflowClient:
    """An MLflow client on ``uri``, whose store MLflow makes first where it is new (or upgrades, where older).

    MLflow creates a database store's tables, and migrates them, when a process first opens it, with nothing to keep
    two processes from doing it at once: two sweeps started together on a new ``sqlite:///mlflow.db`` ran the
    migrations side by side, and one failed (issue 35). So a local store (a sqlite file, a folder) is opened under an
    exclusive lock on ``<store>.lock`` beside it, which every kd-tune process takes first; the next one then finds
    the tables made. Another database (PostgreSQL, ...) is opened again, up to ``attempts`` times, when its first
    opening lost such a race: the loser's migration is rolled back (or found done), so a retry makes nothing twice.
    A tracking server migrates its own store."""
    from mlflow.tracking import MlflowClient

    local = local_store_path(uri)
    if local is not None:
        _make_folder(local.parent)  # as MLflow would (a sqlite file's folder): the lock file needs it first
        with exclusive_lock(local.with_name(local.name + ".lock")):
            return MlflowClient(uri)  # the constructor opens the store: MLflow creates / migrates its tables here
    if urlparse(uri).scheme.split("+")[0] not in DATABASE_SCHEMES:
        return MlflowClient(uri)
    attempt = 1
    while True:
        try:
            return MlflowClient(uri)
        except Exception as e:
            if attempt >= attempts or not _lost_creation_race(e):
                raise
        time.sleep(attempt)  # the winner's migrations take a few seconds
        attempt += 1


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # MLflow says what is wrong with the store's folder, in its own words


def _lost_creation_race(e: BaseException | None) -> bool:
    """Whether an exception (or one in its chain) is what a process that lost the race to create a database store gets."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _MIGRATION_RACE_ERRORS for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False
