"""The errors kd-tune shows to users: one clear line each, no traceback unless --debug."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run on), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class KdTuneError(Exception):
    """An error whose message is meant for the user. ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class UsageError(KdTuneError):
    """Bad input from the user (a flag, a name, a search space): exit status 2, nothing started."""

    exit_code = 2


class SpaceError(UsageError):
    """A search-space file that is malformed; the message names the file, key, value and what is allowed."""

    def __init__(self, source: str, key: str, value: object, allowed: str) -> None:
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        where = f"key '{key}'" if key else "top level"
        super().__init__(f"{source}: {where}: bad value {shown}; allowed: {allowed}")


class TrackingStoreError(UsageError):
    """A tracking store that cannot serve as given (exit 2, before anything starts): a database that does not answer, does
    not exist, refuses the role or has no driver here, or a tracking server whose own database does not answer. Unlike
    :class:`~kd_tune.errors.TrackingUnavailableError` (a server that does not answer at all: an outage, over when it
    is back), each needs someone to fix the URI or the database."""


class FlagError(UsageError):
    """A bad command-line flag or argument (or the environment variable standing for it): the message
    names the flag, the value and what is allowed, as :class:`SpaceError` does for a search-space key.

    ``problem`` says what is wrong when "not allowed" is not enough; a problem phrased as a predicate
    ("is a folder that ...") follows the value directly, any other after a colon.
    """

    def __init__(self, flag: str, value: object, allowed: str, problem: str = "") -> None:
        self.flag, self.value, self.allowed, self.problem = flag, value, allowed, problem
        if not problem:
            said = ":"
        elif problem.startswith(("is ", "has ")):
            said = f" {problem};"
        else:
            said = f": {problem};"
        super().__init__(f"{flag} {value!r}{said} allowed: {allowed}")


class TrackingUnavailableError(KdTuneError):
    """The MLflow store cannot be reached (a server down, a database away) when a command needs it now;
    the message says what was not done."""


class DiskFullError(KdTuneError):
    """A disk kd-tune writes to is full: the message names the place (the sweep's storage, its teacher cache, the
    MLflow store), says that nothing finished was lost, and how to go on once there is room."""


# What a full disk says where the errno is gone: the OS's words (in a library's message), SQLite's own (SQLITE_FULL).
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def disk_full_cause(e: BaseException | None) -> BaseException | None:
    """The exception that says a disk is full (``ENOSPC``, ``EDQUOT``), searched in ``e``, its causes and contexts, and
    the cause a Ray task error wraps; ``None`` when there is none. A full disk surfaces deep in such chains: a trial's
    checkpoint copy inside Ray's task error, SQLite's error inside SQLAlchemy's inside MLflow's."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        if any(t in first_line(x) for t in DISK_FULL_TEXTS):
            return x
        cause = getattr(x, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception here
        todo += [x.__cause__, x.__context__, cause if isinstance(cause, BaseException) else None]
    return None


class _CondenseDiskFull(logging.Filter):
    """A library's log record whose exception is a full disk becomes one line (its message and the cause);
    any other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = disk_full_cause(record.exc_info[1]) if record.exc_info else None
        if cause is not None:
            said = record.getMessage().strip().splitlines()
            record.msg, record.args = f"{said[0].rstrip(' :.') if said else 'a disk is full'}: {first_line(cause)}", None
            record.exc_info, record.exc_text = None, None
        return True


# Where the libraries log a full disk with a traceback each time: Ray Tune's failed trial and failed state save
# (five tracebacks of the same ENOSPC in one sweep), MLflow's failed database write.
DISK_FULL_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "mlflow.store.db.utils")


@contextmanager
def condensed_disk_full_logs(loggers: tuple[str, ...] = DISK_FULL_LOGGERS) -> Iterator[None]:
    """While it lasts, the ``loggers``' records of a full disk are one line each (the error that ends the command
    says which disk, and what to do); their other records, tracebacks included, are untouched."""
    condense = _CondenseDiskFull()
    for name in loggers:
        logging.getLogger(name).addFilter(condense)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(condense)


class DataUnavailableError(KdTuneError):
    """A dataset's files are not on disk and could not be fetched from any source."""


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss; the trial stops instead of wasting its budget."""

    def __init__(self, epoch: int, loss: float) -> None:
        self.epoch, self.loss = epoch, loss
        super().__init__(f"training diverged at epoch {epoch}: loss = {loss}")
