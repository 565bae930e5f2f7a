"""Whether the tracking store a command will write to can serve, settled before anything starts: a tracking server that
answers (and whose own database does), a database store that answers, exists, lets the role in and (new) lets it make
MLflow's tables. Each refusal is one line. Light to import: MLflow, SQLAlchemy and the drivers load only when probed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from kd_tune.errors import TrackingStoreError, TrackingUnavailableError, first_line
from kd_tune.tracking.store import DATABASE_SCHEMES


def check_tracking_store(uri: str, doing: str) -> None:
    """Make sure the tracking store at ``uri`` answers; ``doing`` says what was not done when it does not.

    A tracking server that does not answer raises :class:`TrackingUnavailableError`; one that answers that its own
    database does not (MLflow's 503), and a database (PostgreSQL, MySQL, MSSQL) that cannot be used as given, raise
    :class:`TrackingStoreError`. A sqlite file or a folder is not probed: the command opens (and, when new, makes)
    it itself, and a refused command must not leave a new store behind (nor does the database probe make anything)."""
    # "postgres://" (Heroku's and others' DATABASE_URL) is no scheme MLflow or SQLAlchemy takes: said here, not by MLflow's model registry
    if urlparse(uri).scheme.split("+")[0] in (*DATABASE_SCHEMES, "postgres"):
        check_database(uri, doing)
        return
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    check_server_database(uri, doing)  # first: MLflow's client retries a 503 for seconds, then drops what the server said
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - whatever the store or the network says, the user gets one line
        raise TrackingUnavailableError(f"the tracking store {shown_uri(uri)} cannot be reached ({first_line(e)[:200]}); {doing}") from e


DATABASE_CONNECT_TIMEOUT_S = 10
"""How long the start-up probe waits for a database's server (a host that drops packets); MLflow's own opening of a
database retries a failed connection for about 100 s, with a warning each time, before it gives up."""
_TIMEOUT_DRIVERS = ("psycopg2", "psycopg", "pymysql", "mysqldb")  # the drivers that take ``connect_timeout``
SERVER_PROBE_TIMEOUT_S = 10
"""The one request that asks a tracking server whether its database answers (no retries); the client's own check follows."""
POSTGRES_ALLOWED = ("postgresql+psycopg2://USER[:PASSWORD]@HOST:PORT/DATABASE with PostgreSQL answering there, the database made and "
                    "the role let in (sudo -u postgres createuser USER; sudo -u postgres createdb -O USER DATABASE)")
OTHER_DATABASE_ALLOWED = "a database server that answers there, with the database made and the URI's user let in"


def shown_uri(uri: str) -> str:
    """The URI as messages show it: a password in it replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user_info, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user_info.split(':', 1)[0]}:***@{host}"))


def check_database(uri: str, doing: str) -> None:
    """Connect to a database store once, with a timeout, and refuse it in one line (:class:`TrackingStoreError`) when
    it cannot serve: no driver module here, nothing answering, no such database, the role refused, or (PostgreSQL 15 and
    later) a new store whose role may not make tables in the database's schema, where MLflow makes its tables on first
    use. The probe makes nothing. Without it, MLflow's own opening retries a dead connection for about 100 s, and a
    missing privilege fails mid-migration with a traceback."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = shown_uri(uri)
    allowed = POSTGRES_ALLOWED if uri.startswith("postgresql") else OTHER_DATABASE_ALLOWED

    def refuse(problem: str, what: str = allowed) -> TrackingStoreError:
        return TrackingStoreError(f"the tracking store {shown} {problem}; allowed: {what}; {doing}")

    try:
        url = sqlalchemy.engine.make_url(uri)
        driver = url.get_dialect().driver
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as e:  # ValueError: a port that is no number
        raise refuse(f"is not a database URI SQLAlchemy can open ({first_line(e)[:200]})",
                     "postgresql+psycopg2://..., mysql+pymysql://..., mssql+pyodbc://..., sqlite:///PATH") from None
    connect_args = {"connect_timeout": DATABASE_CONNECT_TIMEOUT_S} if driver in _TIMEOUT_DRIVERS else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except ImportError as e:
        # SQLAlchemy 2.1 made psycopg (3) the driver of a plain postgresql://, where 2.0 took psycopg2 (kd-tune's postgres extra)
        fix = ("postgresql+psycopg2://... with psycopg2 installed (pip install 'kd-tune[postgres]'), or psycopg installed (pip install "
               "'psycopg[binary]')" if url.get_backend_name() == "postgresql" else f"the driver {driver} installed, or another one named in the URI "
               f"({url.get_backend_name()}+DRIVER://...)")
        raise refuse(f"needs the Python module {e.name or driver!r} (its driver, {driver}), which is not installed here", fix) from None
    try:
        with engine.connect() as con:
            if engine.dialect.name == "postgresql":
                _check_can_make_tables(con, refuse)
    except sqlalchemy.exc.DBAPIError as e:
        said = " ".join(first_line(e.orig if e.orig is not None else e).split())  # the server's words ("FATAL:  database ...")
        raise refuse(f"cannot be opened ({said[:300]})") from None
    finally:
        engine.dispose()


def _check_can_make_tables(con: Any, refuse: Callable[[str, str], TrackingStoreError]) -> None:
    """A new MLflow store on PostgreSQL: its role must be allowed to make tables in the schema MLflow will use.
    PostgreSQL 15 stopped granting CREATE on schema ``public`` to every role; only the database's owner has it now."""
    import sqlalchemy

    if sqlalchemy.inspect(con).has_table("alembic_version"):  # MLflow's tables are there already
        return
    can, user, schema, database = con.execute(sqlalchemy.text(
        "SELECT has_schema_privilege(current_user, current_schema(), 'CREATE'), current_user, current_schema(), current_database()")).one()
    if not can:
        raise refuse(f"is a database where role {user!r} may not make tables (in schema {schema or 'public'!r} of database {database!r}), "
                     "and MLflow makes its tables there on first use (PostgreSQL 15 and later grant that to the database's owner only)",
                     f"a database the role owns (ALTER DATABASE {database} OWNER TO {user}; or createdb -O {user} DATABASE), "
                     f"or GRANT CREATE ON SCHEMA {schema or 'public'} TO {user}")


def check_server_database(uri: str, doing: str) -> None:
    """A tracking server that answers, but not from its database: MLflow's server turns the database's connection error
    into 503 ``TEMPORARILY_UNAVAILABLE`` with the driver's message (its ``/health`` still says OK). One request, no
    retries; anything else (no answer, another status) is left to the client's check. Raises :class:`TrackingStoreError`."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET", max_retries=0, backoff_factor=0,
                                timeout=SERVER_PROBE_TIMEOUT_S, raise_on_status=False, params={"max_results": 1})
        body = response.json() if response.status_code == 503 else {}
    except Exception:  # noqa: BLE001 - no answer, or not MLflow's: the client's check says what it is
        return
    if not isinstance(body, dict) or body.get("error_code") != "TEMPORARILY_UNAVAILABLE":
        return
    said = " ".join((str(body.get("message", "")).strip().splitlines() or [""])[0].split())
    # Any SQLAlchemy OperationalError is a 503; SQLite's "database is locked" is a moment's contention, not a database away.
    if not said.startswith("(") or "OperationalError)" not in said or "database is locked" in said:
        return
    said = said.split(") ", 1)[-1]  # "(psycopg2.OperationalError) connection to server at ..." -> the driver's words
    raise TrackingStoreError(f"the tracking store {shown_uri(uri)} answers, but its own database does not ({said[:300]}); "
                             "allowed: a tracking server whose database answers it (start the database; on cluster.yaml's head: "
                             f"sudo systemctl start postgresql); {doing}")
