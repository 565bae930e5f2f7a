"""Sweeps as Ray jobs: submitted from a laptop to a cluster's job server, then listed, followed, stopped and
resumed by the sweep's name.

Why jobs: a driver started over SSH (``ray exec``) dies with the session; a job's driver runs on the head
node under Ray's job supervisor whatever happens to the laptop, and the job server keeps its status and
logs. The job server is the head's dashboard (port 8265; ``ray dashboard cluster.yaml`` forwards it). A job
is a command line plus a ``runtime_env``: here a temporary folder holding only the search-space file
(``working_dir``) and, with ``--ship-code``, this machine's ``kd_tune`` package (``py_modules``, which
reaches the trials too); without it the job runs the kd-tune installed on the cluster (cluster.yaml
installs the repository on every node at ``ray up``). No version probe (a probe job would cost as much as
the check is worth): the user decides, and ``kd-tune submit`` and the job's metadata say which code runs.

Names: a job's submission id is ``kd-tune-<sweep>-<n>`` (n counts that sweep's jobs) and its metadata
carries the sweep's name, storage and tracking URI, so a sweep's jobs are found by its name. A sweep has at
most one live (PENDING or RUNNING) job: a second submit is refused; two submits racing would both pick
the same ``n``, and the job server refuses the second id.

Stopping: Ray's job stop signals the driver's processes, then SIGKILLs them after
``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by default, too short for Tune to save its state and for the driver to
close its MLflow runs). Both are read from the job's own environment, so every kd-tune job sets them in its
``runtime_env``: the signal is SIGINT, i.e. Ctrl+C (``ray.init`` replaces a driver's SIGTERM handler with
``sys.exit``, while Tune turns SIGINT into a graceful stop), the grace :data:`STOP_WAIT_S`; whoever stops the
job (``kd-tune stop``, ``ray job stop``, the dashboard) gets an interrupted, resumable sweep.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kd_tune.config import NAME_ALLOWED, is_valid_name
from kd_tune.errors import FlagError, KdTuneError, UsageError, first_line
from kd_tune.options import SubmitOptions, SweepOptions, apply_overrides

JOB_SERVER_ALLOWED = ("the job server's http://HOST:PORT, the head's dashboard port (8265 by default), e.g. http://127.0.0.1:8265 "
                      "while `ray dashboard cluster.yaml` runs")
STORAGE_ALLOWED = "an absolute folder every node mounts, or a URI such as s3://bucket/prefix"
TRACKING_ALLOWED = ("a URI the head node reaches: http://127.0.0.1:5000 (the server cluster.yaml starts there), another http(s):// "
                    "server, or a database URI with an absolute path such as sqlite:////abs/mlflow.db")
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
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
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

    Raises :class:`FlagError` for an address that is not http(s):// or where no job server answers within
    a few seconds (Ray's client would retry for minutes), :class:`KdTuneError` when Ray's job client is not
    installed or the server refuses it.
    """
    url, source = _address(address, env)
    url = url.rstrip("/")
    if not is_job_server(url):
        raise FlagError(source, url, JOB_SERVER_ALLOWED, "is not an http:// address (jobs go to the dashboard's job server, not the GCS port)")
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S) as r:
            answer = json.loads(r.read())
        if not isinstance(answer, dict) or "ray_version" not in answer:
            raise ValueError("no Ray version in its answer")
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # those answer, but want a token: Ray's client sends it
            raise FlagError(source, url, JOB_SERVER_ALLOWED, f"is not a Ray job server (GET /api/version: HTTP {e.code})") from None
    except urllib.error.URLError as e:
        reason = first_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
        raise FlagError(source, url, JOB_SERVER_ALLOWED, f"no job server answers there ({reason})") from None
    except http.client.HTTPException:  # a port that does not speak HTTP, such as the GCS's
        raise FlagError(source, url, JOB_SERVER_ALLOWED, "is not a Ray job server (it does not answer in HTTP)") from None
    except (OSError, ValueError) as e:  # a timeout, a reset, an answer that is not Ray's
        raise FlagError(source, url, JOB_SERVER_ALLOWED, f"is not a Ray job server (GET /api/version: {first_line(e)})") from None
    try:
        import aiohttp  # noqa: F401 - what Ray's job client needs beyond ray itself (ray[default])
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
        client = retried(lambda: JobSubmissionClient(url), ConnectionError, CLIENT_RETRY_WAITS_S)
    except (ConnectionError, RuntimeError) as e:
        raise KdTuneError(f"the job server at {url} refused the connection: {first_line(e)}") from None
    finally:
        os.environ.update(saved)
    return JobServer(url, client)


def retried(make: Callable[[], Any], transient: type[BaseException], waits: Sequence[float], sleep: Callable[[float], None] = time.sleep) -> Any:
    """``make()``, tried again after each of ``waits`` seconds while it raises ``transient``; the last error is raised."""
    for wait in waits:
        try:
            return make()
        except transient:
            sleep(wait)
    return make()


# --- what the head node must be told explicitly ---------------------------------------------------


def cluster_storage(raw: str | None) -> str:
    """``--storage`` (else ``$KD_TUNE_STORAGE`` here) as the cluster sees it. Raises :class:`FlagError` when there
    is none or it is a relative path (the job runs in a temporary folder on the head)."""
    given = raw or os.environ.get("KD_TUNE_STORAGE")
    flag = "--storage" if raw else "$KD_TUNE_STORAGE"
    if not given:
        raise FlagError("--storage", None, STORAGE_ALLOWED, "none given, nor $KD_TUNE_STORAGE here; a sweep submitted as a job must "
                        "name where it lives, to be followed and resumed")
    if "://" in given:
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/?]+.*", given):
            raise FlagError(flag, given, STORAGE_ALLOWED, "has no bucket or folder")
        return given
    if not os.path.isabs(given):
        raise FlagError(flag, given, STORAGE_ALLOWED, "is a relative path: the job runs in a temporary folder on the head node")
    return os.path.normpath(given)


def cluster_tracking_uri(raw: str | None, required: bool = True) -> str | None:
    """``--tracking-uri`` (else ``$MLFLOW_TRACKING_URI`` here) as the head sees it. Raises :class:`FlagError` when
    there is none (and ``required``) or it names a file by a relative path (lost with the job's temporary folder)."""
    given = raw or os.environ.get("MLFLOW_TRACKING_URI")
    flag = "--tracking-uri" if raw else "$MLFLOW_TRACKING_URI"
    if not given:
        if required:
            raise FlagError("--tracking-uri", None, TRACKING_ALLOWED, "none given, nor $MLFLOW_TRACKING_URI here; MLflow's default store "
                            "would be a file in the job's temporary folder")
        return None
    relative = (("://" not in given and not given.startswith("file:") and not os.path.isabs(given))
                or (given.startswith("sqlite:") and not given.startswith("sqlite:////"))
                or (given.startswith("file:") and not given.startswith("file:///")))
    if relative:
        raise FlagError(flag, given, TRACKING_ALLOWED, "is a relative path: the job runs in a temporary folder on the head node")
    return given


def _cluster_data_dir(raw: str | None) -> str | None:
    if raw and not os.path.isabs(raw):
        raise FlagError("--data-dir", raw, "an absolute folder on the head node", "is a relative path: the job runs in a temporary folder there")
    return raw


def _flags(opts: Any, names: Sequence[str]) -> list[str]:
    """The command-line flags of the given option fields that are set."""
    out: list[str] = []
    for n in names:
        value, flag = getattr(opts, n), "--" + n.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return out


@dataclass(frozen=True)
class SeenFromHere:
    """A sweep's storage as this machine sees it: the cluster's storage may be out of reach from a laptop
    (the head's own disk, a bucket without credentials here); then nothing is known and nothing is refused."""

    readable: bool
    restorable: bool = False
    record: Any = None  # kd_tune.record.SweepRecord


def seen_from_here(storage: str, name: str) -> SeenFromHere:
    try:
        from kd_tune.record import SweepRecord, can_restore
        from kd_tune.storage import resolve_storage

        root = resolve_storage(storage)
        if not root.exists():
            return SeenFromHere(False)
        if not root.exists(name):
            return SeenFromHere(True)
        record = SweepRecord.load(root, name) if SweepRecord.exists(root, name) else None
        return SeenFromHere(True, can_restore(root, name), record)
    except Exception:  # noqa: BLE001 - a storage this machine cannot read is no error here
        return SeenFromHere(False)


# --- the commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """A job that runs a sweep (or its resume), and how to follow it."""

    name: str
    command: str
    job_id: str
    server: JobServer
    storage: str
    ship_code: bool

    def lines(self) -> list[str]:
        code = "this machine's kd_tune package" if self.ship_code else "the kd-tune installed on the cluster"
        a = self.server.flag
        return [f"sweep {self.name!r}: {self.command} submitted to {self.server.address} as Ray job {self.job_id} (running {code})",
                f"  follow it:   kd-tune logs {self.name} --follow {a}",
                f"  all sweeps:  kd-tune jobs {a}",
                f"  stop it:     kd-tune stop {self.name} {a}",
                f"  then resume: {resume_hint(self.name, self.server, self.storage)}"]


def resume_hint(name: str, server: JobServer, storage: str) -> str:
    return f"kd-tune resume {name} {server.flag} --storage {shlex.quote(storage)}"


def submit_sweep(space: Path, opts: SubmitOptions) -> Submitted:
    """Validate the space and flags here, then submit ``kd-tune sweep`` as a job.

    Raises :class:`~kd_tune.errors.SpaceError` / :class:`FlagError` for bad input (nothing is submitted),
    :class:`UsageError` when the sweep has a live job or already exists (without ``--resume``), and what
    :func:`connect` raises.
    """
    from kd_tune.config import load_space

    sweep_opts = opts.as_sweep_options()
    spec = apply_overrides(load_space(space), sweep_opts)
    storage = cluster_storage(opts.storage)
    tracking = cluster_tracking_uri(opts.tracking_uri)
    assert tracking is not None
    _cluster_data_dir(opts.data_dir)
    server = connect(opts.address)
    server.refuse_live(spec.name, server.sweep_jobs(spec.name))
    if not opts.resume and seen_from_here(storage, spec.name).restorable:
        raise UsageError(f"a sweep named {spec.name!r} already exists in {storage}; to continue it: {resume_hint(spec.name, server, storage)} "
                         "(or add --resume; or choose another --name)")
    argv = ["sweep", space.name, "--name", spec.name, "--storage", storage, "--tracking-uri", tracking,
            *_flags(sweep_opts, ["data_dir", "cpus_per_trial", "gpus_per_trial", "max_failures", "quiet", "resume", "no_share_epochs", "pack"])]
    with tempfile.TemporaryDirectory(prefix="kd-tune-submit-") as folder:
        shutil.copyfile(space, Path(folder) / space.name)  # the working_dir holds the space file and nothing else
        job_id = server.submit(spec.name, argv, {META_STORAGE: storage, META_TRACKING: tracking, META_DATA_DIR: opts.data_dir or ""},
                               opts.ship_code, working_dir=folder)
    return Submitted(spec.name, "sweep", job_id, server, storage, opts.ship_code)


def submit_resume(name: str, opts: SweepOptions, ship_code: bool = False) -> Submitted:
    """Submit ``kd-tune resume NAME`` as a job to the job server ``opts.address`` (else ``$RAY_ADDRESS``, else
    ``$RAY_API_SERVER_ADDRESS``).

    The job ships this machine's code if ``ship_code`` or the sweep's previous job did, and reads the data from
    the previous job's ``--data-dir`` unless given another (a resume must see the same images). Raises
    :class:`FlagError` for a bad name or flag, :class:`UsageError` when the sweep has a live job or, when its
    storage is readable from here, does not exist; and what :func:`connect` raises.
    """
    if not is_valid_name(name):
        raise FlagError("sweep name", name, NAME_ALLOWED, "is not allowed")
    storage = cluster_storage(opts.storage)
    tracking = cluster_tracking_uri(opts.tracking_uri, required=False) if opts.tracking_uri else None
    _cluster_data_dir(opts.data_dir)
    server = connect(opts.address, env=RESUME_ADDRESS_ENV)
    jobs = server.sweep_jobs(name)
    server.refuse_live(name, jobs)
    seen = seen_from_here(storage, name)
    if seen.readable and not seen.restorable:
        from kd_tune.record import require_sweep
        from kd_tune.storage import resolve_storage

        require_sweep(resolve_storage(storage), name, " (start one with kd-tune submit)")  # raises, naming the sweeps there
    record = seen.record
    last = jobs[-1].metadata if jobs else {}
    ship = ship_code or last.get(META_SHIP) == "true"
    if opts.data_dir is None and last.get(META_DATA_DIR):
        opts = replace(opts, data_dir=last[META_DATA_DIR])
    tracking = tracking or (record.tracking_uri if record else None) or last.get(META_TRACKING) or ""
    argv = ["resume", name, "--storage", storage, *_flags(opts, ["data_dir", "tracking_uri", "cpus_per_trial", "gpus_per_trial", "quiet"])]
    job_id = server.submit(name, argv, {META_STORAGE: storage, META_TRACKING: tracking, META_DATA_DIR: opts.data_dir or ""}, ship)
    return Submitted(name, "resume", job_id, server, storage, ship)


@dataclass(frozen=True)
class SweepJob:
    """One row of ``kd-tune jobs``: a sweep and its newest job."""

    name: str
    job_id: str
    status: str
    jobs: int
    trials: str
    mlflow: str


def sweep_jobs_table(address: str | None) -> tuple[JobServer, list[SweepJob]]:
    """The cluster's kd-tune sweeps, each with its newest job, trials finished / total (read from the sweep's
    storage where this machine can read it) and its MLflow runs page (or store) when known."""
    server = connect(address)
    by_name: dict[str, list[Any]] = {}
    for j in server.sweep_jobs():
        by_name.setdefault(j.metadata[META_SWEEP], []).append(j)
    rows = []
    for name, jobs in sorted(by_name.items()):
        job = jobs[-1]
        storage, tracking = job.metadata.get(META_STORAGE, ""), job.metadata.get(META_TRACKING, "")
        rows.append(SweepJob(name, job.submission_id, _status(job), len(jobs), _trials(name, storage), _mlflow_link(name, storage, tracking)))
    return server, rows


def _trials(name: str, storage: str) -> str:
    if not seen_from_here(storage, name).restorable:
        return "-"
    try:
        from kd_tune.results import sweep_status

        st = sweep_status(name, storage)
        return f"{st.counts['finished']}/{len(st.table)}"
    except Exception:  # noqa: BLE001 - a storage out of reach from here: shown as unknown
        return "-"


def _mlflow_link(name: str, storage: str, tracking: str) -> str:
    record = seen_from_here(storage, name).record
    if record is None:
        return tracking or "-"
    if record.tracking_uri.startswith(("http://", "https://")):
        return f"{record.tracking_uri.rstrip('/')}/#/experiments/{record.experiment_id}/runs"
    return f"{record.tracking_uri} (experiment {record.experiment_id})"


def format_jobs(rows: list[SweepJob]) -> str:
    if not rows:
        return "no kd-tune sweeps on this cluster yet (start one with kd-tune submit)"
    head = ("sweep", "job", "status", "jobs", "trials", "MLflow")
    cells = [head] + [(r.name, r.job_id, r.status, str(r.jobs), r.trials, r.mlflow) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    lines = ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def show_logs(address: str | None, name: str, follow: bool, write: Callable[[str], None]) -> int:
    """The logs of the sweep's newest job; with ``follow``, as they come until the job ends. 0 when the job
    succeeded or (without ``follow``) whatever its state, 1 when a followed job ended otherwise."""
    server = connect(address)
    job = server.newest(name)
    if not follow:
        write(server.client.get_job_logs(job.submission_id))
        return 0

    async def tail() -> None:
        async for chunk in server.client.tail_job_logs(job.submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the job server went away mid-stream
        raise KdTuneError(f"following job {job.submission_id} at {server.address} broke off: {first_line(e)}") from None
    except KeyboardInterrupt:
        print(f"kd-tune logs: stopped following; job {job.submission_id} goes on (kd-tune stop {name} {server.flag} stops it)", file=sys.stderr)
        return 130
    status = str(server.client.get_job_status(job.submission_id).value)
    print(f"kd-tune logs: job {job.submission_id} of sweep {name!r} is {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def stop_sweep(address: str | None, name: str) -> tuple[JobServer, Any, str]:
    """Stop the sweep's live job and wait until it has ended (the driver closes the sweep as after Ctrl+C).

    Returns the server, the job and its final status. Raises :class:`UsageError` when the sweep has no live job.
    """
    server = connect(address)
    job = server.newest(name)
    live = [j for j in server.sweep_jobs(name) if _status(j) in LIVE]
    if not live:
        raise UsageError(f"sweep {name!r} has no live job on {server.address} (its newest, {job.submission_id}, is {_status(job)}); "
                         f"allowed: a sweep with a PENDING or RUNNING job (see kd-tune jobs {server.flag})")
    job = live[-1]
    server.client.stop_job(job.submission_id)
    deadline = time.monotonic() + STOP_WAIT_S + 30
    status = _status(job)
    while time.monotonic() < deadline:
        status = str(server.client.get_job_status(job.submission_id).value)
        if status not in LIVE:
            break
        time.sleep(0.5)  # polling the job's state against a deadline
    return server, job, status
