"""What kd-tune changes in its process is put back (kd_tune.process): the environment, library loggers, the collector.
test_sweep.py checks the same around a real in-process sweep."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from kd_tune.process import SWEEP_ENVIRONMENT, Startup, environment, environment_kept, logger_levels, sweep_process


def test_environment_sets_what_is_unset_and_puts_everything_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDT_A", raising=False)
    monkeypatch.setenv("KDT_B", "user")
    with environment({"KDT_A": "1", "KDT_B": "2"}):
        assert os.environ["KDT_A"] == "1"
        assert os.environ["KDT_B"] == "user"  # a user's own value wins
        os.environ["KDT_B"] = "changed by the block"
    assert "KDT_A" not in os.environ and os.environ["KDT_B"] == "user"


def test_environment_puts_back_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDT_A", raising=False)
    with pytest.raises(RuntimeError), environment({"KDT_A": "1"}):
        raise RuntimeError
    assert "KDT_A" not in os.environ


def test_what_libraries_set_in_the_environment_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDT_KEPT", "mine")
    monkeypatch.setenv("KDT_GONE", "mine")
    monkeypatch.delenv("KDT_NEW", raising=False)
    with environment_kept():
        os.environ["KDT_NEW"] = "a library's"  # as mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI
        os.environ["KDT_KEPT"] = "changed"
        del os.environ["KDT_GONE"]
    assert "KDT_NEW" not in os.environ and os.environ["KDT_KEPT"] == "mine" and os.environ["KDT_GONE"] == "mine"


def test_logger_levels_are_put_back() -> None:
    logger = logging.getLogger("kdt.test.library")
    logger.setLevel(logging.INFO)
    with logger_levels({"kdt.test.library": logging.ERROR}):
        assert logger.level == logging.ERROR
    assert logger.level == logging.INFO


def test_the_collector_is_paused_then_frozen_then_as_it_was() -> None:
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            startup = Startup()
            assert not gc.isenabled()
            startup.trials_start()
            assert gc.isenabled() and gc.get_freeze_count() > 0
            startup.restore()
            assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
    finally:
        (gc.enable if was else gc.disable)()


def test_a_sweep_process_leaves_the_process_as_it_found_it() -> None:
    environ, enabled = dict(os.environ), gc.isenabled()
    with sweep_process() as startup:
        assert all(os.environ[k] == os.environ.get(k, v) for k, v in SWEEP_ENVIRONMENT.items())
        startup.trials_start()
    assert dict(os.environ) == environ and gc.isenabled() == enabled and gc.get_freeze_count() == 0


def test_the_fast_exit_runs_the_threading_hooks_before_joining() -> None:
    """A concurrent.futures pool's idle workers end only when Python's threading exit hook tells them to: the fast exit
    runs it (joining first waited forever), then the exit handlers, and exits with the command's code."""
    code = textwrap.dedent("""
        import atexit, concurrent.futures, threading
        from kd_tune.process import fast_exit
        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(lambda: None).result()  # its worker threads now wait for work, as MLflow's download pool's did
        atexit.register(lambda: print("exit handler ran", flush=True))
        fast_exit(7)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == "exit handler ran" and "threads still running" not in proc.stderr


def test_the_fast_exit_gives_up_on_a_thread_that_never_ends() -> None:
    code = textwrap.dedent("""
        import threading, time
        import kd_tune.process as p
        threading.Thread(target=lambda: time.sleep(3600), name="forever").start()
        p._shutdown_threads(5, grace=0.5)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5 and "exiting after 0.5 s with threads still running: forever" in proc.stderr
