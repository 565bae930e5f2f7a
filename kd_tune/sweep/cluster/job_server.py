"""A Ray cluster's job server (the head's dashboard, port 8265), reached through Ray's ``JobSubmissionClient``.

Names: a job's submission id is ``kd-tune-<sweep>-<n>`` (n counts that sweep's jobs) and its metadata carries the
sweep's name, storage and tracking URI, so a sweep's jobs are found by its name. A sweep has at most one live
(PENDING or RUNNING) job: a second submit is refused; two submits racing would both pick the same ``n``, and the
job server refuses the second id.

Stopping: Ray's job stop signals the driver's processes, then SIGKILLs them after ``RAY_JOB_STOP_WAIT_TIME_S``
(3 s by default, too short for Tune to save its state and for the driver to close its MLflow runs). Both are read
from the job's own environment, so every kd-tune job sets them in its ``runtime_env``: the signal is SIGINT, i.e.
Ctrl+C (``ray.init`` replaces a driver's SIGTERM handler with ``sys.exit``, while Tune turns SIGINT into a
graceful stop), the grace :data:`STOP_WAIT_S`; whoever stops the job gets an interrupted, resumable sweep.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_tune.errors import FlagError, KdTuneError, UsageError, first_line
from kd_tune.sweep.cluster.ray_token import WANTS_TOKEN, TokenError, find_token, token_refused, token_required

JOB_SERVER_ALLOWED = ("the job server's http://HOST:PORT, the head's dashboard port (8265 by default), e.g. http://127.0.0.1:8265 "
                      "while `ray dashboard cluster.yaml` runs")
SUBMIT_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's job CLI reads them in this order
# resume: $RAY_ADDRESS first, as before jobs (a HOST:PORT there is joined from this process, not submitted to)
RESUME_ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
META_SWEEP, META_STORAGE, META_TRACKING = "kd_tune.sweep", "kd_tune.storage", "kd_tune.tracking_uri"
META_COMMAND, META_SHIP, META_DATA_DIR = "kd_tune.command", "kd_tune.ship_code", "kd_tune.data_dir"
LIVE = ("PENDING", "RUNNING")
STOP_SIGNAL = "SIGINT"
STOP_WAIT_S = 120
"""Seconds a stopped job's driver gets to end the sweep cleanly before Ray SIGKILLs it (a SIGKILLed sweep
is still resumable: every file is written atomically, a resume closes what was left open)."""
CONNECT_TIMEOUT_S = 5.0
CLIENT_RETRY_WAITS_S = (1.0, 3.0)  # Ray's job client made again after these pauses when the server drops it


def is_job_server(address: str | None) -> bool:
    """An address of a job server (http:// or https://), rather than a cluster's GCS (HOST:PORT, auto, ray://)."""
    return bool(address) and str(address).startswith(("http://", "https://"))


def _entrypoint(argv: Sequence[str]) -> str:
    # `python` as in Ray's own job examples: on a cluster it is the interpreter Ray and kd-tune are installed in.
    return shlex.join(["python", "-m", "kd_tune.cli", *argv])


def _seq(job: Any, name: str) -> int:
    m = re.fullmatch(rf"kd-tune-{re.escape(name)}-(\d+)", job.submission_id or "")
    return int(m.group(1)) if m else 0


def _status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


@dataclass(frozen=True)
class JobServer:
    """A cluster's job server, reached through Ray's ``JobSubmissionClient``."""

    address: str
    client: Any  # ray.job_submission.JobSubmissionClient (imported only when a command needs it)

    @property
    def flag(self) -> str:
        """``--address URL``, for the commands kd-tune prints (always explicit: the environment may differ)."""
        return f"--address {shlex.quote(self.address)}"

    def sweep_jobs(self, name: str | None = None) -> list[Any]:
        """kd-tune's jobs (only sweep ``name``'s when given), oldest first."""
        jobs = [j for j in self.client.list_jobs() if (j.metadata or {}).get(META_SWEEP) and (name is None or j.metadata[META_SWEEP] == name)]
        return sorted(jobs, key=lambda j: (j.start_time or 0, _seq(j, j.metadata[META_SWEEP])))

    def newest(self, name: str) -> Any:
        """The sweep's newest job. Raises :class:`UsageError` listing the sweeps that have jobs when it has none."""
        jobs = self.sweep_jobs(name)
        if not jobs:
            known = sorted({j.metadata[META_SWEEP] for j in self.sweep_jobs()})
            raise UsageError(f"no job of a sweep named {name!r} on {self.address}; allowed: "
                             f"{', '.join(known) or 'none there yet (start one with kd-tune submit)'}")
        return jobs[-1]

    def refuse_live(self, name: str, jobs: list[Any]) -> None:
        """Raises :class:`UsageError` when one of the sweep's ``jobs`` is PENDING or RUNNING (one live job per sweep)."""
        live = [j for j in jobs if _status(j) in LIVE]
        if live:
            job = live[-1]
            raise UsageError(f"sweep {name!r} has a live job on {self.address}: {job.submission_id} ({_status(job)}); allowed: one job per "
                             f"sweep: follow it with kd-tune logs {name} --follow {self.flag}, or stop it with kd-tune stop {name} {self.flag}")

    def submit(self, name: str, argv: list[str], metadata: dict[str, str], ship_code: bool, working_dir: str | None = None) -> str:
        """Submit ``python -m kd_tune.cli ARGV`` as the sweep's next job; its submission id.

        Raises :class:`UsageError` when the sweep has a live job (or another submit took the same id just now),
        :class:`KdTuneError` when the job server refuses the job."""
        jobs = self.sweep_jobs(name)
        self.refuse_live(name, jobs)
        submission_id = f"kd-tune-{name}-{1 + max((_seq(j, name) for j in jobs), default=0)}"
        runtime_env: dict[str, Any] = {"env_vars": {"RAY_JOB_STOP_SIGNAL": STOP_SIGNAL, "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}}
        if working_dir:
            runtime_env["working_dir"] = working_dir
        if ship_code:
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parents[1])]  # the kd_tune package (this file is kd_tune/sweep/cluster/job_server.py)
        if working_dir or ship_code:
            runtime_env["excludes"] = ["__pycache__/"]
        metadata = {"job_name": f"kd-tune {argv[0]} {name}", META_SWEEP: name, META_SHIP: str(ship_code).lower(), META_COMMAND: argv[0], **metadata}
        try:
            return str(self.client.submit_job(entrypoint=_entrypoint(argv), submission_id=submission_id, runtime_env=runtime_env,
                                              metadata=metadata))
        except RuntimeError as e:
            if "already exists" in str(e):
                raise UsageError(f"another job of sweep {name!r} was submitted just now ({submission_id}); allowed: one job per sweep: "
                                 f"see kd-tune jobs {self.flag}") from None
            raise KdTuneError(f"the job server at {self.address} refused the job: {first_line(e)}") from None


def _address(address: str | None, env: Sequence[str]) -> tuple[str, str]:
    """The job server's address and where it came from (the flag, or the first of ``env`` that is set)."""
    if address:
        return address, "--address"
    for var in env:
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    raise FlagError("--address", None, JOB_SERVER_ALLOWED, f"none given, nor {' or '.join('$' + v for v in env)}")


def connect(address: str | None, env: Sequence[str] = SUBMIT_ADDRESS_ENV) -> JobServer:
    """The job server at ``address`` (else at the first of the ``env`` variables that is set).

    A job server with Ray's token authentication on gets the cluster's token (:mod:`kd_tune.sweep.cluster.ray_token`),
    one without it none. Raises :class:`FlagError` for an address that is not http(s):// or where no job server
    answers within a few seconds (Ray's client would retry for minutes), :class:`~kd_tune.sweep.cluster.ray_token.TokenError`
    when the server wants a token that cannot be found or that it refuses, :class:`KdTuneError` when Ray's job client
    is not installed or the server refuses it.
    """
    url, source = _address(address, env)
    url = url.rstrip("/")
    if not is_job_server(url):
        raise FlagError(source, url, JOB_SERVER_ALLOWED, "is not an http:// address (jobs go to the dashboard's job server, not the GCS port)")
    status, answer = _probe(url, source, {})
    token = None
    if status in WANTS_TOKEN:  # Ray's token authentication is on there: send the cluster's token, found as Ray finds it
        token = find_token()
        if token is None:
            raise token_required(url)
        status, answer = _probe(url, source, token.headers())
        if status in WANTS_TOKEN:
            raise token_refused(url, token, answer)
    try:
        import aiohttp  # noqa: F401 - what Ray's job client needs beyond ray itself (ray[default])
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise KdTuneError(f"Ray's job client is not installed ({first_line(e)}); pip install 'kd-tune[cluster]' (ray[default])") from None
    for noisy in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # "Uploading package ...", "WebSocket closed ...": not news to a user
    # Ray's client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address it is given: the flag wins here.
    saved = {v: os.environ.pop(v) for v in SUBMIT_ADDRESS_ENV if v in os.environ}
    try:
        # The server has just answered the probe above, so a connection error now is a dashboard busy starting a
        # job's driver dropping a connection (seen on a loaded 2-core head): worth another try or two.
        client = retried(lambda: JobSubmissionClient(url, headers=token.headers() if token else None), ConnectionError, CLIENT_RETRY_WAITS_S)
    except AuthenticationError as e:  # e.g. $RAY_AUTH_MODE=token here and no token anywhere: Ray's client refuses to start
        raise TokenError(f"Ray's job client for {url}: {first_line(e)}") from None
    except (ConnectionError, RuntimeError) as e:
        raise KdTuneError(f"the job server at {url} refused the connection: {first_line(e)}") from None
    finally:
        os.environ.update(saved)
    return JobServer(url, client)


def _probe(url: str, source: str, headers: dict[str, str]) -> tuple[int, str]:
    """``GET /api/version`` within a few seconds: (200, "") from a Ray job server, (401 or 403, its answer) from one
    that wants a token (another, or none). Raises :class:`FlagError` naming ``source`` when no Ray job server answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=headers), timeout=CONNECT_TIMEOUT_S) as r:
            answer = json.loads(r.read())
        if not isinstance(answer, dict) or "ray_version" not in answer:
            raise ValueError("no Ray version in its answer")
        return 200, ""
    except urllib.error.HTTPError as e:
        if e.code in WANTS_TOKEN:
            body = (e.read() if e.fp else b"").decode(errors="replace").strip()
            return e.code, body.splitlines()[0] if body else f"HTTP {e.code}"
        raise FlagError(source, url, JOB_SERVER_ALLOWED, f"is not a Ray job server (GET /api/version: HTTP {e.code})") from None
    except urllib.error.URLError as e:
        reason = first_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
        raise FlagError(source, url, JOB_SERVER_ALLOWED, f"no job server answers there ({reason})") from None
    except http.client.HTTPException:  # a port that does not speak HTTP, such as the GCS's
        raise FlagError(source, url, JOB_SERVER_ALLOWED, "is not a Ray job server (it does not answer in HTTP)") from None
    except (OSError, ValueError) as e:  # a timeout, a reset, an answer that is not Ray's
        raise FlagError(source, url, JOB_SERVER_ALLOWED, f"is not a Ray job server (GET /api/version: {first_line(e)})") from None


def retried(make: Callable[[], Any], transient: type[BaseException], waits: Sequence[float], sleep: Callable[[float], None] = time.sleep) -> Any:
    """``make()``, tried again after each of ``waits`` seconds while it raises ``transient``; the last error is raised."""
    for wait in waits:
        try:
            return make()
        except transient:
            sleep(wait)
    return make()
