"""What kd-tune changes in the process that runs it, in one place, each change with why, and how it is put back.

A sweep's driver (:func:`sweep_process`) sets some environment variables, a library logger's level and the garbage
collector for as long as the sweep runs, and restores each when it ends, with what the libraries it drives change
meanwhile (the environment, loggers and their handlers, MLflow's tracking URI, Ray Tune's Ctrl+C handler), so that a
notebook or a script that runs a sweep finds its process as it was (a second sweep in the same process starts from the
same state). The ``kd-tune`` command alone ends with :func:`fast_exit`. Standard library only (the core layer): a
library's state is read from ``sys.modules``, never imported here.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, NoReturn

CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""The MLflow client retries a failed request inside the call, for about 4 minutes by default. kd-tune's own outbox
retries tracking writes without blocking training, so the client should give up fast and leave the waiting to it."""
QUIET_DOWNLOADS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
"""A teacher's model or a report's confusion matrix is one small download: MLflow's progress bar for it is noise."""
SWEEP_ENVIRONMENT = {
    **CLIENT_RETRIES,
    **QUIET_DOWNLOADS,
    # kd-tune prints the runs page itself, once, at the end: MLflow's own line per run would flood the log.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Tune's classic output engine, the one the progress table needs: the newer one shows a grid point as one truncated dict.
    "RAY_AIR_NEW_OUTPUT": "0",
    # A checkpoint per epoch of short epochs is by design here, not the misuse Tune warns about.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # A diverged trial's last result has no accuracy; Tune's strict metric checking would stop the sweep over it.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # Tune adds no loggers of its own (its TensorBoard writer above all): the run config names the CSV and JSON ones
    # that Tune's analysis and the results table read, and a writer per trial costs the driver CPU the trials need.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
"""What a sweep's driver sets in its environment while it runs (a user's own value of any of them wins)."""
QUIET_LOGGERS = {"urllib3.connectionpool": logging.ERROR}
"""urllib3 logs a line per failed attempt at an unreachable tracking server: kd-tune says once that the store is away,
and when it is back."""


@contextmanager
def environment(defaults: Mapping[str, str]) -> Iterator[None]:
    """``defaults`` set in ``os.environ`` where the variable is unset, for the block; each put back as it was after it
    (a variable the block's code set or changed itself stays as that code left it, unless it is one of ``defaults``)."""
    before = {k: os.environ.get(k) for k in defaults}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, old in before.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextmanager
def environment_kept() -> Iterator[None]:
    """``os.environ`` as it was before the block, after it: what the block's libraries set there meanwhile (MLflow's
    tracking URI, torch's compiler cache folder, Ray's variables of a Ray the block started and stopped) is undone."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k not in before]:
            del os.environ[k]
        for k, v in before.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@contextmanager
def logger_levels(levels: Mapping[str, int]) -> Iterator[None]:
    """Library loggers at ``levels`` for the block, each at its own level again after it."""
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def _logger_state(logger: logging.Logger) -> tuple[int, list[logging.Handler], bool, bool, list[Any]]:
    return logger.level, list(logger.handlers), logger.propagate, logger.disabled, list(logger.filters)


@contextmanager
def loggers_kept() -> Iterator[None]:
    """Every logger that exists before the block (the root logger included) with its level, handlers, filters,
    ``propagate`` and ``disabled`` as they were, after it; and ``logging.disable``'s level.

    Why: what a sweep drives reconfigures logging as it goes: ``ray.init`` configures Ray's loggers, and MLflow's
    migrations of a new store run Alembic's ``logging.config.fileConfig``, which sets the root logger to WARN with a
    handler of its own on stderr and drops handlers elsewhere (measured: the root logger at ERROR with a new stderr
    handler after a sweep on a new sqlite store). Loggers made during the block (modules imported then) stay as made."""
    manager = logging.Logger.manager
    before = [(lg, _logger_state(lg)) for lg in (logging.root, *manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    disabled_below = manager.disable
    try:
        yield
    finally:
        for lg, (level, handlers, propagate, disabled, filters) in before:
            if _logger_state(lg) != (level, handlers, propagate, disabled, filters):
                lg.handlers[:], lg.filters[:] = handlers, filters
                lg.propagate, lg.disabled = propagate, disabled
                lg.setLevel(level)  # also clears the loggers' cached levels
        if manager.disable != disabled_below:
            logging.disable(disabled_below)


MLFLOW_FLUENT = "mlflow.tracking._tracking_service.utils"
"""The module that holds MLflow's own tracking URI (``mlflow.set_tracking_uri``'s global) in MLflow 2 and 3."""


def _mlflow_fluent() -> Any:
    utils = sys.modules.get(MLFLOW_FLUENT)
    return utils if utils is not None and hasattr(utils, "_tracking_uri") and hasattr(utils, "set_tracking_uri") else None


@contextmanager
def mlflow_tracking_uri_kept() -> Iterator[None]:
    """MLflow's own tracking URI (what ``mlflow.set_tracking_uri`` sets, and ``mlflow.log_metric`` and friends use) as it
    was before the block, after it, with ``$MLFLOW_TRACKING_URI`` (which ``set_tracking_uri`` also sets).

    Why: the report reads the runs with ``mlflow.search_runs`` and the sweep logs its models with ``mlflow.pytorch``,
    both through that process-wide setting: left set, a notebook's own ``mlflow.log_metric`` after a sweep would go to the
    sweep's store. Unset before (MLflow not even imported): unset after. MLflow is not imported here."""
    utils = _mlflow_fluent()
    before = utils._tracking_uri if utils is not None else None
    variable = "MLFLOW_TRACKING_URI"
    env = os.environ.get(variable)
    try:
        yield
    finally:
        utils = _mlflow_fluent()
        if utils is not None and utils._tracking_uri != before:
            utils.set_tracking_uri(before)  # None: unset, as before
        if env is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = env


_MLFLOW_URI_LOCK = threading.RLock()


@contextmanager
def mlflow_tracking_uri_held() -> Iterator[None]:
    """For a block that sets MLflow's process-wide tracking URI (``mlflow.set_tracking_uri``) and uses it: the setting put
    back after it (:func:`mlflow_tracking_uri_kept`), and one such block at a time across threads.

    Why the lock: the setting is one global, and the sweep logs models on its tracking thread while the main thread may
    read runs or fetch a model; one thread putting back its "before" (unset: the default store in the current folder)
    in the middle of another's ``log_model`` sent that model to the wrong store (seen in the test suite). A block
    must not wait on another thread that needs this lock. (MLflow is not imported here: the caller sets the URI.)"""
    with _MLFLOW_URI_LOCK, mlflow_tracking_uri_kept():
        yield


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


@contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """The handlers of Ctrl+C and the stop signals (:data:`STOP_SIGNALS`) as they were before the block, after it (only
    the main thread can set them: elsewhere nothing is done).

    Why: Ray Tune's ``fit`` installs its own SIGINT and SIGUSR1 handler (the first Ctrl+C stops the trials gracefully)
    and leaves it installed after the fit; in a notebook the next Ctrl+C, in any later cell, would only set the flag
    of a fit long over instead of interrupting the cell. ``ray.init`` replaces SIGTERM's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name))}
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)


class Startup:
    """The garbage collector during a sweep's start-up, as :func:`sweep_process` hands it out.

    The start-up imports torch, Ray Tune and MLflow: ~700,000 objects that live as long as the process. Python's
    collector, run on the heap's growth, walks them all again and again meanwhile (benchmarks/RESULTS.md, session 7,
    counts the full collections and their seconds) while one core does all the work. None of it is garbage: nothing
    is collected until the trials start (:meth:`trials_start`), where the survivors are frozen out of every later
    collection and the collector runs again."""

    def __init__(self) -> None:
        self.collecting = gc.isenabled()
        gc.disable()

    def trials_start(self) -> None:
        gc.freeze()
        gc.enable()

    def restore(self) -> None:
        gc.unfreeze()  # a later sweep in this process (a notebook, the tests) may collect this one's leftovers
        if self.collecting:
            gc.enable()
        else:
            gc.disable()


@contextmanager
def tracking_client() -> Iterator[None]:
    """A command's MLflow client settings for the block (:data:`CLIENT_RETRIES`, :data:`QUIET_DOWNLOADS`,
    :data:`QUIET_LOGGERS`: ``kd-tune report`` and ``sync``), put back after it, with MLflow's tracking URI and the
    loggers a new store's migrations reconfigure (:func:`mlflow_tracking_uri_kept`, :func:`loggers_kept`); a sweep has
    them in :func:`sweep_process`."""
    with environment({**CLIENT_RETRIES, **QUIET_DOWNLOADS}), loggers_kept(), mlflow_tracking_uri_kept(), logger_levels(QUIET_LOGGERS):
        yield


@contextmanager
def sweep_process() -> Iterator[Startup]:
    """Everything a sweep's driver changes in its process (:data:`SWEEP_ENVIRONMENT`, :data:`QUIET_LOGGERS`, the
    collector: :class:`Startup`), for the block, and put back after it, with whatever the libraries change meanwhile:
    the environment (:func:`environment_kept`), loggers (:func:`loggers_kept`), MLflow's tracking URI
    (:func:`mlflow_tracking_uri_kept`) and the signal handlers (:func:`signal_handlers_kept`)."""
    with ExitStack() as stack:
        stack.enter_context(environment_kept())
        stack.enter_context(loggers_kept())
        stack.enter_context(mlflow_tracking_uri_kept())
        stack.enter_context(signal_handlers_kept())
        stack.enter_context(environment(SWEEP_ENVIRONMENT))
        stack.enter_context(logger_levels(QUIET_LOGGERS))
        startup = Startup()
        stack.callback(startup.restore)
        yield startup


EXIT_GRACE_S = 15.0
"""How long threads that are not daemons may take to end after a command returned, before the exit goes ahead."""


def _shutdown_threads(code: int, grace: float = EXIT_GRACE_S) -> None:
    """What Python itself does first at exit (``threading._shutdown``): run the hooks registered with
    ``threading._register_atexit`` (a ``concurrent.futures`` pool tells its workers to stop there: MLflow's artifact
    downloads start such pools), then wait for every thread that is not a daemon.

    Joining those threads before their hooks ran waited forever (issue 35: a ``runs:/`` teacher's download pool).
    A thread that still does not end (a user's factory may start one) gets ``grace`` seconds: then a watchdog says
    which threads were left and exits anyway, since everything kd-tune wrote is closed by now."""

    def give_up() -> None:
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(f"kd-tune: exiting after {grace:g} s with threads still running: {', '.join(left)}", file=sys.stderr, flush=True)
        os._exit(code)

    watchdog = threading.Timer(grace, give_up)
    watchdog.daemon = True
    watchdog.start()
    shutdown = getattr(threading, "_shutdown", None)  # CPython's own exit step, 3.10 to 3.13
    if shutdown is not None:
        shutdown()
    else:  # pragma: no cover - another Python: join what is left (the hooks are then the threads' own business)
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    watchdog.cancel()


def fast_exit(code: int) -> NoReturn:
    """End the ``kd-tune`` command: Python's own exit steps in Python's order, but without its module teardown.

    Why: once a command has returned, everything it wrote is closed (MLflow runs ended, Ray shut down, files replaced
    atomically), yet tearing down the torch, Ray and MLflow modules it imported costs seconds on a 2-core machine
    (benchmarks/RESULTS.md, session 15, "the fast exit"). The threading shutdown runs first (:func:`_shutdown_threads`),
    then the exit handlers (logging, MLflow's temporary folders), as at a normal exit. Only for the command: a
    program that imports kd-tune ends as it likes."""
    _shutdown_threads(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away, or the stream is closed: nothing left to say
            pass
    os._exit(code)
