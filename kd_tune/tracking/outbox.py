"""An ordered outbox for tracking writes: the Tune loop hands each write over and goes on; one
background thread ships them in order, and while the store is away it waits and retries.

Why: Ray Tune waits for its callbacks. A callback that writes to MLflow directly stalls every trial
while the client retries an unreachable server (minutes), then ends the sweep with the client's
exception. Here a write is a *job*, a small function that reads back from the store what it needs
(the run's last logged step, its status), so a job redone after it failed half-way never logs a step
twice. Jobs wait in memory while the store is away, and whatever they would write is also in the
trials' checkpoints in the sweep's storage: ``kd-tune sync`` (or ``resume``) rebuilds it after a kill.

A failed job is told apart from an unreachable store by a probe: when the store answers the probe,
the job itself is at fault (a bug, a store refusing a value): it is tried ``attempts`` times, then
skipped with one line, never ending the sweep.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from kd_tune.errors import first_line

Log = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    run: Callable[[], object]
    what: str
    """For the one line said when it is skipped: e.g. ``epoch 3 of a0.5_T3_e10_s0``."""
    steps: int = 0
    """Metric steps (epochs) the job logs: how far behind tracking is, in the user's terms."""


@dataclass(frozen=True)
class Backlog:
    jobs: int
    steps: int
    pending: tuple[str, ...] = ()
    """What each job left would record (its ``what``), in order."""

    def __bool__(self) -> bool:
        return self.jobs > 0

    def describe(self) -> str:
        return f"{self.jobs} tracking writes ({self.steps} epochs of metrics)"


class Outbox:
    """Runs jobs in the order they were put, on one daemon thread, retrying while the store is away.

    ``probe`` raises when the store cannot be reached; ``on_failure`` is called after any failed job,
    before it is retried (the recorder forgets what it cached, so the retry reads the store again).
    ``log`` gets the outage's first line and the catch-up line; ``store`` names the store in them.
    """

    def __init__(self, store: str, probe: Callable[[], None], on_failure: Callable[[], None], log: Log, *,
                 first_backoff: float = 1.0, max_backoff: float = 30.0, attempts: int = 3) -> None:
        self.store, self.probe, self.on_failure, self.log = store, probe, on_failure, log
        self.first_backoff, self.max_backoff, self.attempts = first_backoff, max_backoff, attempts
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # the thread holds a job (it stays in the queue until done)
        self.down_since: float | None = None
        self.outages: list[float] = []  # seconds each ended outage lasted
        self.skipped: list[str] = []
        self._thread = threading.Thread(target=self._work, name="kd-tune-tracking", daemon=True)
        self._thread.start()

    def put(self, run: Callable[[], object], what: str, steps: int = 0) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the tracking outbox is closed")
            self._jobs.append(Job(run, what, steps))
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def backlog(self) -> Backlog:
        with self._cond:
            return self._backlog()

    def _backlog(self) -> Backlog:
        return Backlog(len(self._jobs), sum(j.steps for j in self._jobs), tuple(j.what for j in self._jobs))

    def drain(self, timeout: float) -> Backlog:
        """Wait up to ``timeout`` seconds for every job put so far to be shipped; what is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._jobs and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._backlog()

    def close(self) -> Backlog:
        """Stop the thread (after the job it is running, if any); what was left unshipped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        return self.backlog()

    # --- the thread -------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            return None if self._closed else self._jobs[0]

    def _done(self) -> None:
        with self._cond:
            self._jobs.popleft()
            self._cond.notify_all()

    def _pause(self, seconds: float) -> bool:
        """Wait before a retry; False when the outbox was closed meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout=seconds)
            return not self._closed

    def _work(self) -> None:
        failures, backoff = 0, self.first_backoff
        while (job := self._next()) is not None:
            try:
                job.run()
            except Exception as e:  # noqa: BLE001 - nothing a tracking write raises may end the sweep
                self._safely(self.on_failure)
                if self._reachable():
                    failures += 1
                    if failures >= self.attempts:  # the store answers but refuses this job: skip it, say so
                        self.skipped.append(job.what)
                        line = f"kd-tune: tracking: could not record {job.what} in {self.store} ({first_line(e)}); skipped"
                        self._safely(partial(self.log, line))
                        failures = 0
                        self._done()
                    continue
                self._went_down(e)
                if not self._pause(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff)
                continue
            failures, backoff = 0, self.first_backoff
            self._done()
            self._came_back()

    def _reachable(self) -> bool:
        try:
            self.probe()
            return True
        except Exception:  # noqa: BLE001 - any failure of the probe means "not reachable now"
            return False

    def _went_down(self, e: Exception) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        behind = self.backlog()
        self._safely(lambda: self.log(f"kd-tune: tracking store {self.store} is unreachable ({first_line(e)[:160]}); training goes on, "
                                      f"tracking is {behind.describe()} behind and catches up when the store is back"))

    def _came_back(self) -> None:
        if self.down_since is None:
            return
        lasted = time.monotonic() - self.down_since
        self.down_since = None
        self.outages.append(lasted)
        self._safely(lambda: self.log(f"kd-tune: tracking store {self.store} is back after {lasted:.0f} s; catching up "
                                      f"({self.backlog().describe()} to go)"))

    @staticmethod
    def _safely(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - logging or a cache reset must never kill the sender
            pass
