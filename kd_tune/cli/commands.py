"""The subcommands: each a plain typed function of its arguments (:mod:`kd_tune.cli.args`), importing what it needs
when it runs. ``sweep``, ``resume``, ``status`` and ``report`` are calls of the Python API (:mod:`kd_tune.api`: ``run``,
``resume``, ``load(...).status()``, ``load(...).report()``) that print what they return.

Storage is resolved here, once, at the CLI boundary (``--storage``, else ``$KD_TUNE_STORAGE``, else
``./kd_tune_results``): the library's functions take a resolved :class:`~kd_tune.sweep.state.storage.Storage`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kd_tune.cli.args import (
    DataArgs,
    JobArgs,
    JobsArgs,
    LogsArgs,
    PlanArgs,
    ReplayArgs,
    ReportArgs,
    ResumeArgs,
    SubmitArgs,
    SweepArgs,
    SweepNameArgs,
    UiArgs,
)
from kd_tune.errors import FlagError, UsageError, condensed_disk_full_logs
from kd_tune.process import tracking_client

if TYPE_CHECKING:
    from kd_tune.api import Sweep
    from kd_tune.sweep.results import SweepOutcome
    from kd_tune.sweep.state.storage import Storage

TRACKING_BEHIND_EXIT = 3  # every trial ended, but the tracking store was unreachable: kd-tune sync NAME completes the record


def _storage(raw: str | None) -> Storage:
    from kd_tune.sweep.state.storage import resolve_storage

    return resolve_storage(raw)


def sweep(args: SweepArgs) -> int:
    """Run every trial of a search space; exit 0 only if every trial finished."""
    from kd_tune import api

    storage = _storage(args.storage)
    return _report(lambda log: _outcome(api.run(
        args.space, name=args.name, storage=storage, tracking_uri=args.tracking_uri, address=args.address, data_dir=args.data_dir,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, pack=args.pack, max_failures=args.max_failures,
        share_epochs=not args.no_share_epochs, resume=args.resume, tracking_wait=args.tracking_wait,
        progress=None if args.quiet else "table", log=log, interrupt="return")), args.quiet)


def replay(args: ReplayArgs) -> int:
    """Train a population sweep's best schedule again from scratch with fresh seeds (a grid sweep NAME-replay)."""
    from kd_tune import api

    try:
        seeds: int | list[int] = int(args.seeds) if "," not in args.seeds else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: a count (e.g. 3) or comma-separated seeds (e.g. 7,8,9)") from None
    if isinstance(seeds, int) and not 1 <= seeds <= 100:
        raise UsageError(f"--seeds {seeds}: a count in [1, 100], or comma-separated seeds")
    storage = _storage(args.storage)
    return _report(lambda log: _outcome(api.replay(
        args.name, member=args.member, seeds=seeds, new_name=args.new_name, storage=storage, tracking_uri=args.tracking_uri,
        address=args.address, data_dir=args.data_dir, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        tracking_wait=args.tracking_wait, progress=None if args.quiet else "table", log=log, interrupt="return")), args.quiet)


def plan(args: PlanArgs) -> int:
    """Validate a search space and print its trials (or packs) and their cost in student epochs (nothing runs)."""
    from kd_tune.cli.plan import show_plan

    return show_plan(args)


def resume(args: ResumeArgs) -> int:
    """Continue an interrupted sweep: finished trials stay, the others go on from their last checkpoint.

    With a job server's http:// address (--address, else $RAY_ADDRESS, else $RAY_API_SERVER_ADDRESS) the resume
    is submitted to the cluster as a Ray job, like kd-tune submit; any other address is joined from this process.
    """
    from kd_tune.sweep.cluster.job_server import JOB_SERVER_ALLOWED, RESUME_ADDRESS_ENV, is_job_server

    opts = args.as_sweep_options()
    address = opts.address or next((os.environ[v] for v in RESUME_ADDRESS_ENV if os.environ.get(v)), None)
    if is_job_server(address):
        from kd_tune.sweep.cluster.jobs import submit_resume

        print("\n".join(submit_resume(args.name, opts, args.ship_code).lines()))
        return 0
    if args.ship_code:
        raise FlagError("--address", address, JOB_SERVER_ALLOWED, "is not a job server's: --ship-code sends the code with a job")
    from kd_tune import api

    storage = _storage(opts.storage)
    return _report(lambda log: _outcome(api.resume(
        args.name, storage=storage, tracking_uri=opts.tracking_uri, address=opts.address, data_dir=opts.data_dir,
        cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial, tracking_wait=opts.tracking_wait,
        progress=None if opts.quiet else "table", log=log, interrupt="return")), opts.quiet)


def submit(args: SubmitArgs) -> int:
    """Submit a sweep to a Ray cluster's job server, from any machine that reaches it (a laptop: the driver
    runs on the head node, whatever happens to the laptop). The space and flags are validated here first;
    paths are the head node's."""
    from kd_tune.sweep.cluster.jobs import submit_sweep

    print("\n".join(submit_sweep(args.space, args).lines()))
    return 0


def jobs(args: JobsArgs) -> int:
    """The cluster's kd-tune sweeps: each one's newest job and its status, trials finished / total (read from the
    sweep's storage where this machine can read it) and its MLflow runs."""
    from kd_tune.sweep.cluster.jobs import format_jobs, sweep_jobs_table

    server, rows = sweep_jobs_table(args.address)
    print(f"kd-tune sweeps on {server.address}:" if rows else f"{server.address}:")
    print(format_jobs(rows))
    if any(r.trials == "-" for r in rows):
        print("(trials '-': the sweep has not saved its state yet, or its storage is not readable from here)")
    return 0


def logs(args: LogsArgs) -> int:
    """The logs of a sweep's newest job; --follow streams them until the job ends (exit 0 if it succeeded)."""
    from kd_tune.sweep.cluster.jobs import show_logs

    return show_logs(args.address, args.name, args.follow, lambda text: print(text, end="", flush=True))


def stop(args: JobArgs) -> int:
    """Stop a sweep's job: its driver ends the sweep as after Ctrl+C (trials stopped, MLflow runs closed as
    KILLED, state saved), so kd-tune resume continues it."""
    from kd_tune.sweep.cluster.job_server import META_STORAGE
    from kd_tune.sweep.cluster.jobs import resume_hint, seen_from_here, stop_sweep

    server, job, final = stop_sweep(args.address, args.name)
    storage = job.metadata.get(META_STORAGE, "")
    print(f"sweep {args.name!r}: job {job.submission_id} is {final}")
    seen = seen_from_here(storage, args.name)
    if seen.readable and not seen.restorable:
        print(f"it had not started its trials (nothing to resume in {storage}): submit it again to start it")
    else:
        print(f"to continue it: {resume_hint(args.name, server, storage)}")
    return 0 if final == "STOPPED" else 1


def status(args: SweepNameArgs) -> int:
    """Trials finished / running / pending / errored of a sweep, read from its storage."""
    from kd_tune import api

    print(api.load(args.name, storage=_storage(args.storage)).status().format())
    return 0


def sync(args: SweepNameArgs) -> int:
    """Complete a sweep's MLflow record from its storage, training nothing: the epochs, run ends and models that
    never reached the tracking store (it was unreachable when the sweep ended, or the driver was killed meanwhile).
    Safe to repeat: what the store has is not written again. Exit 0 once the record holds every trial's checkpoints."""
    from kd_tune.sweep.state.sync import sync_sweep

    # A full store: MLflow's tracebacks of it one line each (main() ends with the cause); the client's short retries.
    with condensed_disk_full_logs(), tracking_client():
        print("\n".join(sync_sweep(args.name, _storage(args.storage)).lines()))
    return 0


def report(args: ReportArgs) -> int:
    """Tables and figures of a sweep from its MLflow runs; also logged on the sweep's parent run."""
    from kd_tune import api

    # The report downloads one small JSON (the best run's confusion matrix): MLflow's progress bar for it is only
    # noise between the command and its tables (a user's own setting wins: kd_tune.process.tracking_client).
    rep = api.load(args.name, storage=_storage(args.storage), tracking_uri=args.tracking_uri).report(args.out)
    print(rep.markdown())
    print("files (also on the sweep's parent run in MLflow, under report/):")
    for f in rep.files:
        print(f"  {f}")
    return 0


def ui(args: UiArgs) -> int:
    """Serve the MLflow UI and tracking server over the sweeps' store (replaces this process with the server).

    Before it starts, prints the address of each sweep's runs page (or of sweep NAME's only). One
    worker and no job execution keep it at ~0.5 GB; on a cluster's head it is the team's tracking
    server (drivers log to http://127.0.0.1:PORT there; people reach it through `ray attach --port-forward`).
    A store the UI cannot serve, or a NAME that is not a sweep there, is refused (FlagError: exit 2).
    """
    from kd_tune.tracking.store import resolve_tracking_uri
    from kd_tune.tracking.ui import serve

    serve(resolve_tracking_uri(args.tracking_uri), args.host, args.port, args.artifacts_destination, args.name)
    return 0  # not reached: serve() replaces this process


def data(args: DataArgs) -> int:
    """Fetch (or verify) a dataset's files ahead of a sweep, e.g. on a cluster's shared disk."""
    from kd_tune.data.registry import REGISTRY

    if args.name not in REGISTRY:
        raise FlagError("dataset", args.name, ", ".join(REGISTRY), "is unknown")
    from kd_tune.data.sources import default_data_dir, load

    root = Path(args.data_dir) if args.data_dir else default_data_dir()
    info, train_x, _, test_x, _ = load(args.name, root)
    print(f"{args.name}: {len(train_x)} training and {len(test_x)} test images of shape {tuple(info.shape)} under {root}")
    return 0


def _outcome(sweep: Sweep) -> SweepOutcome:
    assert sweep.outcome is not None  # api.run and api.resume return the sweep they ran
    return sweep.outcome


def _report(run: Callable[[Callable[[str], None] | None], SweepOutcome], quiet: bool) -> int:
    """Run a sweep or resume (``run`` gets where its lines go: None when quiet), then print its end: the results table,
    where it is tracked, what to do next; the exit status."""
    from kd_tune.sweep.results import format_table
    from kd_tune.tracking.store import resolve_tracking_uri
    from kd_tune.tracking.store_checks import shown_uri
    from kd_tune.tracking.ui import UI_HOST, runs_page, sweep_page

    outcome = run(None if quiet else (lambda s: print(s, flush=True)))
    print()
    print(outcome.summary_line())
    print(format_table(outcome.table))
    print()
    print(f"MLflow: experiment {outcome.name!r} (id {outcome.experiment_id}) in {shown_uri(outcome.tracking_uri)}")
    ui = f"kd-tune ui {outcome.name}" + ("" if outcome.tracking_uri == resolve_tracking_uri(None) else f" --tracking-uri '{outcome.tracking_uri}'")
    # The page on the view of the sweep's grid points, saved now (an unreachable store: the plain runs page).
    page = (runs_page(UI_HOST, 5000, outcome.experiment_id) if outcome.tracking_behind
            else sweep_page(outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id))
    print(f"Open the UI: {ui}   (then the runs page it prints: {page})")
    if not outcome.ok:
        print(f"Not every trial finished; to retry the rest: {outcome.resume_command}")
    if outcome.tracking_behind:
        then = (f"{outcome.resume_command} (the teachers' runs are among them: sync writes the trials' record only)"
                if outcome.tracking_needs_resume else outcome.resume_command.replace("kd-tune resume", "kd-tune sync", 1))
        print(f"kd-tune: the tracking store {outcome.tracking_uri} is still unreachable: {outcome.tracking_behind} for the record are "
              f"pending (safe in the trials' checkpoints); once it is back: {then}", file=sys.stderr, flush=True)
        return TRACKING_BEHIND_EXIT
    return 0 if outcome.ok else 1
