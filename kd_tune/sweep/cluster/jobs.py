"""Sweeps as Ray jobs: submitted from a laptop to a cluster's job server, then listed, followed, stopped and
resumed by the sweep's name (the job server itself, and how to reach it, is :mod:`kd_tune.sweep.cluster.job_server`).

Why jobs: a driver started over SSH (``ray exec``) dies with the session; a job's driver runs on the head node
under Ray's job supervisor whatever happens to the laptop, and the job server keeps its status and logs. A job is
a command line plus a ``runtime_env``: here a temporary folder holding only the search-space file
(``working_dir``) and, with ``--ship-code``, this machine's ``kd_tune`` package (``py_modules``, which reaches the
trials too); without it the job runs the kd-tune installed on the cluster (cluster.yaml installs the repository on
every node at ``ray up``). Paths a job is given are the head node's: they are checked to be absolute here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kd_tune.errors import FlagError, KdTuneError, UsageError, first_line
from kd_tune.space.options import SubmitOptions, SweepOptions, apply_overrides
from kd_tune.space.schema import NAME_ALLOWED, is_valid_name
from kd_tune.sweep.cluster.job_server import (
    LIVE,
    META_DATA_DIR,
    META_SHIP,
    META_STORAGE,
    META_SWEEP,
    META_TRACKING,
    RESUME_ADDRESS_ENV,
    STOP_WAIT_S,
    JobServer,
    _status,
    connect,
)

STORAGE_ALLOWED = "an absolute folder every node mounts, or a URI such as s3://bucket/prefix"
TRACKING_ALLOWED = ("a URI the head node reaches: http://127.0.0.1:5000 (the server cluster.yaml starts there), another http(s):// "
                    "server, or a database URI with an absolute path such as sqlite:////abs/mlflow.db")


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
    record: Any = None  # kd_tune.sweep.state.sweep_files.SweepRecord
    root: Any = None  # kd_tune.sweep.state.storage.Storage, where readable


def seen_from_here(storage: str, name: str) -> SeenFromHere:
    try:
        from kd_tune.sweep.state.storage import resolve_storage
        from kd_tune.sweep.state.sweep_files import SweepRecord
        from kd_tune.sweep.state.tune_state import can_restore

        root = resolve_storage(storage)
        if not root.exists():
            return SeenFromHere(False)
        if not root.exists(name):
            return SeenFromHere(True, root=root)
        record = SweepRecord.load(root, name) if SweepRecord.exists(root, name) else None
        return SeenFromHere(True, can_restore(root, name), record, root)
    except Exception:  # noqa: BLE001 - a storage this machine cannot read is no error here
        return SeenFromHere(False)


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
    from kd_tune.space.parse import load_space

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
        from kd_tune.sweep.state.tune_state import require_sweep

        require_sweep(seen.root, name, " (start one with kd-tune submit)")  # raises, naming the sweeps there
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
    seen = seen_from_here(storage, name)
    if not seen.restorable:
        return "-"
    try:
        from kd_tune.sweep.results import sweep_status

        st = sweep_status(name, seen.root)
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
