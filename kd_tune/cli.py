"""``kd-tune``: a thin CLI mapping subcommands to plain typed functions.

Errors print one line (exit 2 for bad input, 1 otherwise; 3 when a sweep's trials ended but the tracking
store was still unreachable: ``kd-tune sync`` completes the record); ``--debug`` shows the traceback instead. Building the parser imports neither torch, Ray nor MLflow (the options are
plain dataclasses): each subcommand imports what it needs, so ``--help`` and ``plan`` answer at once.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kd_tune.errors import FlagError, KdTuneError, TrackingUnavailableError, UsageError
from kd_tune.options import STORAGE_HELP, ResumeOptions, SubmitOptions, SweepOptions, apply_overrides

if TYPE_CHECKING:
    from kd_tune.results import SweepOutcome

UI_HOST = "127.0.0.1"
TRACKING_BEHIND_EXIT = 3  # every trial ended, but the tracking store was unreachable: kd-tune sync NAME completes the record


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors name the subcommand's help (and exit 2, as argparse does)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def add_options(parser: argparse.ArgumentParser, cls: Any) -> None:
    """One ``--flag`` per field of a options dataclass; the field's metadata help is the flag's help."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        help_text = f.metadata.get("help", "")
        if kind == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            conv: Callable[[str], Any] = float if "float" in kind else int if "int" in kind else str
            parser.add_argument(flag, type=conv, default=None, metavar=f.name.upper(), help=help_text)


def options_from(args: argparse.Namespace, cls: Any) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# --- subcommands: plain functions ---------------------------------------------------------------


def sweep(space: Path, opts: SweepOptions) -> int:
    """Run every trial of a search space; exit 0 only if every trial finished."""
    from kd_tune.config import load_space
    from kd_tune.sweep import run_sweep

    try:
        return _report(lambda log: run_sweep(space, opts, log=log), opts.quiet)
    except (Exception, KeyboardInterrupt) as e:
        if not isinstance(e, (UsageError, TrackingUnavailableError)):  # nothing was started
            _hint_resume(lambda: opts.name or load_space(space).name, opts.storage)
        raise


def resume(name: str, opts: SweepOptions, ship_code: bool = False) -> int:
    """Continue an interrupted sweep: finished trials stay, the others go on from their last checkpoint.

    With a job server's http:// address (--address, else $RAY_ADDRESS, else $RAY_API_SERVER_ADDRESS) the resume
    is submitted to the cluster as a Ray job, like kd-tune submit; any other address is joined from this process.
    """
    from kd_tune.jobs import JOB_SERVER_ALLOWED, RESUME_ADDRESS_ENV, is_job_server

    address = opts.address or next((os.environ[v] for v in RESUME_ADDRESS_ENV if os.environ.get(v)), None)
    if is_job_server(address):
        from kd_tune.jobs import submit_resume

        print("\n".join(submit_resume(name, opts, ship_code).lines()))
        return 0
    if ship_code:
        raise FlagError("--address", address, JOB_SERVER_ALLOWED, "is not a job server's: --ship-code sends the code with a job")
    from kd_tune.sweep import resume_sweep

    try:
        return _report(lambda log: resume_sweep(name, opts, log=log), opts.quiet)
    except (Exception, KeyboardInterrupt) as e:
        if not isinstance(e, (UsageError, TrackingUnavailableError)):  # nothing was started
            _hint_resume(lambda: name, opts.storage)
        raise


def submit(space: Path, opts: SubmitOptions) -> int:
    """Submit a sweep to a Ray cluster's job server, from any machine that reaches it (a laptop: the driver
    runs on the head node, whatever happens to the laptop). The space and flags are validated here first;
    paths are the head node's."""
    from kd_tune.jobs import submit_sweep

    print("\n".join(submit_sweep(space, opts).lines()))
    return 0


def jobs(address: str | None) -> int:
    """The cluster's kd-tune sweeps: each one's newest job and its status, trials finished / total (read from the
    sweep's storage where this machine can read it) and its MLflow runs."""
    from kd_tune.jobs import format_jobs, sweep_jobs_table

    server, rows = sweep_jobs_table(address)
    print(f"kd-tune sweeps on {server.address}:" if rows else f"{server.address}:")
    print(format_jobs(rows))
    if any(r.trials == "-" for r in rows):
        print("(trials '-': the sweep has not saved its state yet, or its storage is not readable from here)")
    return 0


def logs(name: str, follow: bool, address: str | None) -> int:
    """The logs of a sweep's newest job; --follow streams them until the job ends (exit 0 if it succeeded)."""
    from kd_tune.jobs import show_logs

    return show_logs(address, name, follow, lambda text: print(text, end="", flush=True))


def stop(name: str, address: str | None) -> int:
    """Stop a sweep's job: its driver ends the sweep as after Ctrl+C (trials stopped, MLflow runs closed as
    KILLED, state saved), so kd-tune resume continues it."""
    from kd_tune.jobs import META_STORAGE, resume_hint, seen_from_here, stop_sweep

    server, job, final = stop_sweep(address, name)
    storage = job.metadata.get(META_STORAGE, "")
    print(f"sweep {name!r}: job {job.submission_id} is {final}")
    seen = seen_from_here(storage, name)
    if seen.readable and not seen.restorable:
        print(f"it had not started its trials (nothing to resume in {storage}): submit it again to start it")
    else:
        print(f"to continue it: {resume_hint(name, server, storage)}")
    return 0 if final == "STOPPED" else 1


def status(name: str, storage: str | None) -> int:
    """Trials finished / running / pending / errored of a sweep, read from its storage."""
    from kd_tune.results import sweep_status

    print(sweep_status(name, storage).format())
    return 0


def sync(name: str, storage: str | None) -> int:
    """Complete a sweep's MLflow record from its storage, training nothing: the epochs, run ends and models that
    never reached the tracking store (it was unreachable when the sweep ended, or the driver was killed meanwhile).
    Safe to repeat: what the store has is not written again. Exit 0 once the record holds every trial's checkpoints."""
    from kd_tune.sync import sync_sweep

    print("\n".join(sync_sweep(name, storage).lines()))
    return 0


def report(name: str, out: str | None, tracking_uri: str | None, storage: str | None) -> int:
    """Tables and figures of a sweep from its MLflow runs; also logged on the sweep's parent run."""
    from kd_tune.record import SweepRecord, sweep_path
    from kd_tune.report import make_report
    from kd_tune.storage import resolve_storage
    from kd_tune.tracking_store import check_tracking_store, configure_client_retries, resolve_tracking_uri

    root = resolve_storage(storage)
    sweep_path(root, name)
    uri = resolve_tracking_uri(tracking_uri)
    if tracking_uri is None and SweepRecord.exists(root, name):
        uri = SweepRecord.load(root, name).tracking_uri  # where that sweep logged, whatever the defaults now
    configure_client_retries()
    check_tracking_store(uri, "no report was made")
    # The report downloads one small JSON (the best run's confusion matrix): MLflow's progress bar for it is only
    # noise between the command and its tables (a user's own setting wins).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rep = make_report(name, uri, Path(out) if out else Path("reports") / name)
    print(rep.markdown())
    print("files (also on the sweep's parent run in MLflow, under report/):")
    for f in rep.files:
        print(f"  {f}")
    return 0


def plan(space: Path, share_epochs: bool | None, pack: int | None = None) -> int:
    """Validate a search space and print its trials (or packs) and their cost in student epochs (nothing runs)."""
    from dataclasses import replace

    from kd_tune.config import load_space

    spec = load_space(space)
    if share_epochs is not None:
        spec = replace(spec, share_epochs=share_epochs)
    if pack is not None:
        spec = apply_overrides(spec, SweepOptions(pack=pack))
    shared, separate = replace(spec, share_epochs=True), replace(spec, share_epochs=False)
    precision = None if spec.student.precision == "float32" else f"students train in {spec.student.precision}"
    if spec.is_search:
        from kd_tune.search import describe  # imports Ray Tune: only for a search

        print(f"{space}: sweep {spec.name!r}, a search: {spec.search.num_samples} student trials sampled by Ray Tune"
              f"{f', plus {len(spec.trials())} baseline trials' if spec.trials() else ''}{f' ({precision})' if precision else ''}")
        print("\n".join(describe(spec)))
    else:
        n = len(spec.packs()) if spec.packed else len(spec.trials())
        trials = f"{n} {'packed ' if spec.packed else ''}trial{'' if n == 1 else 's'}" + (f" of up to {spec.resources.pack_size} students" if spec.packed else "")
        print(f"{space}: sweep {spec.name!r}, {len(spec.grid_points())} grid points, {trials} "
              f"(epoch sharing {'on' if spec.share_epochs else 'off'}{f'; {precision}' if precision else ''})")
    if spec.packed:
        packs = spec.packs()
        why = ("resources.pack / --pack" if spec.resources.pack is not None else
               f"resources.pack unset: {spec.resources.pack_size} when trials get a GPU, as resources.gpu {spec.resources.gpu:g} asks; "
               "--pack 1 for one student per trial")
        print(f"{len(spec.trials())} students in {len(packs)} pack{'' if len(packs) == 1 else 's'} ({why}), each pack one trial and one model:")
        for i, members in enumerate(packs, 1):
            print(f"  pack {i}: {len(members)} students, trains {members[0].epochs} epochs: {', '.join(t.label for t in members)}")
    else:
        for t in spec.trials():
            print(f"  {t.label:<32} trains {t.epochs} epochs, reports {', '.join(map(str, t.milestones))}")
    saved = separate.student_epochs() - shared.student_epochs()
    repeated = spec.repeated_trainings()
    if repeated:
        again = sum(len(g) - 1 for g in repeated)
        shown = "; ".join(" = ".join(t.label for t in g) for g in repeated[:2]) + ("; ..." if len(repeated) > 2 else "")
        print(f"note: {again} trial{'s' if again > 1 else ''} ({sum(t.epochs for g in repeated for t in g[1:])} student epochs) train{'' if again > 1 else 's'} "
              f"the same weights as another: alpha 1 leaves the teacher out, so alpha 1 at any T is the scratch student of its seed "
              f"({shown})")
    if spec.is_search:
        print(f"student epochs: at most {spec.student_epochs()} ({spec.search.num_samples} x {max(spec.grid.epochs)} for the search"
              f"{', fewer as the scheduler stops trials' if spec.scheduler else ''}; {shared.student_epochs() - spec.search.num_samples * max(spec.grid.epochs)} "
              f"for the baselines)")
        return 0
    print(f"student epochs: {spec.student_epochs()} (with sharing {shared.student_epochs()}, without {separate.student_epochs()}: "
          f"sharing saves {saved}, {saved / separate.student_epochs():.0%})")
    return 0


def _report(run: Callable[[Callable[[str], None]], SweepOutcome], quiet: bool) -> int:
    from kd_tune.results import format_table

    log = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    outcome = run(log)
    print()
    print(outcome.summary_line())
    print(format_table(outcome.table))
    print()
    print(f"MLflow: experiment {outcome.name!r} (id {outcome.experiment_id}) in {outcome.tracking_uri}")
    ui = f"kd-tune ui {outcome.name}" + ("" if outcome.tracking_uri == _default_tracking_uri() else f" --tracking-uri '{outcome.tracking_uri}'")
    print(f"Open the UI: {ui}   (then the runs page it prints: {runs_page(UI_HOST, 5000, outcome.experiment_id)})")
    if not outcome.ok:
        print(f"Not every trial finished; to retry the rest: {outcome.resume_command}")
    if outcome.tracking_behind:
        then = (f"{outcome.resume_command} (the teachers' runs are among them: sync writes the trials' record only)"
                if outcome.tracking_needs_resume else outcome.resume_command.replace("kd-tune resume", "kd-tune sync", 1))
        print(f"kd-tune: the tracking store {outcome.tracking_uri} is still unreachable: {outcome.tracking_behind} for the record are "
              f"pending (safe in the trials' checkpoints); once it is back: {then}", file=sys.stderr, flush=True)
        return TRACKING_BEHIND_EXIT
    return 0 if outcome.ok else 1


def _hint_resume(name: Callable[[], str], storage: str | None) -> None:
    """After an abnormal end of a sweep that had started, say how to continue it."""
    from kd_tune.record import SweepRecord, resume_command, sweep_path
    from kd_tune.storage import resolve_storage

    try:
        root = resolve_storage(storage)
        sweep_path(root, name())
        if SweepRecord.exists(root, name()):
            print(f"kd-tune: the sweep did not end normally; to continue it: {resume_command(name(), root)}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        pass


def _default_tracking_uri() -> str:
    from kd_tune.tracking_store import resolve_tracking_uri

    return resolve_tracking_uri(None)


def ui(tracking_uri: str | None, host: str, port: int, artifacts_destination: str | None = None, name: str | None = None) -> int:
    """Serve the MLflow UI and tracking server over the sweeps' store (replaces this process with the server).

    Before it starts, prints the address of each sweep's runs page (or of sweep NAME's only). One
    worker and no job execution keep it at ~0.5 GB; on a cluster's head it is the team's tracking
    server (drivers log to http://127.0.0.1:PORT there; people reach it through `ray attach --port-forward`).
    A store the UI cannot serve, or a NAME that is not a sweep there, is refused (FlagError: exit 2).
    """
    from kd_tune.tracking_store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if "://" not in uri or uri.startswith(("http://", "https://")):
        raise FlagError("--tracking-uri", uri, "sqlite:///PATH or another SQLAlchemy URI", "the UI serves a database store")
    lines = ui_lines(uri, host, port, name)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        # The server stores the artifacts clients send it (proxied uploads): drivers need no access to that storage.
        cmd += ["--artifacts-destination", artifacts_destination]
    print("\n".join(lines), flush=True)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def runs_page(host: str, port: int, experiment_id: str) -> str:
    """The address of an experiment's runs page in MLflow's UI, in its "Model training" view.

    MLflow 3.17's UI takes the view from the page address or the browser's last choice, by default
    GenAI (it no longer reads the experiment's ``mlflow.experimentKind`` tag for that): without
    ``workflowType=machine_learning`` the runs table opens beside a GenAI side bar (traces, judges,
    prompts) and the experiment's own link leads to the GenAI overview.
    """
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_lines(uri: str, host: str, port: int, name: str | None = None) -> list[str]:
    """What ``kd-tune ui`` prints before the server starts: where it serves, then the runs page of each
    sweep (:func:`runs_page`), or of sweep NAME only.

    Sweeps are the experiments holding a kd-tune parent run; older ones get the experiment tag that
    makes MLflow's UI open on their runs on the way. Raises FlagError for a NAME that is not a sweep in the store.
    """
    from mlflow.tracking import MlflowClient

    from kd_tune.mlflow_runs import sweep_experiments

    sweeps = sweep_experiments(MlflowClient(uri))
    if name is not None:
        if name not in sweeps:
            known = ", ".join(sorted(sweeps)) if sweeps else "none yet (start one with kd-tune sweep)"
            raise FlagError("sweep", name, f"one of the sweeps there: {known}", f"is not tracked in {uri}")
        sweeps = {name: sweeps[name]}
    lines = [f"MLflow UI for {uri} on http://{host}:{port} (Ctrl+C stops it)"]
    if sweeps:
        width = max(map(len, sweeps))
        lines.append("runs of each sweep:" if name is None else f"runs of sweep {name!r}:")
        lines += [f"  {n:<{width}}  {runs_page(host, port, i)}" for n, i in sorted(sweeps.items())]
    return lines


def data(name: str, data_dir: str | None) -> int:
    """Fetch (or verify) a dataset's files ahead of a sweep, e.g. on a cluster's shared disk."""
    from kd_tune.datasets import REGISTRY

    if name not in REGISTRY:
        raise FlagError("dataset", name, ", ".join(REGISTRY), "is unknown")
    from kd_tune.data import default_data_dir, load

    root = Path(data_dir) if data_dir else default_data_dir()
    info, train_x, _, test_x, _ = load(name, root)
    print(f"{name}: {len(train_x)} training and {len(test_x)} test images of shape {tuple(info.shape)} under {root}")
    return 0


# --- wiring -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd-tune", description="Hyperparameter sweeps for knowledge distillation (Ray Tune + MLflow).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("sweep", help="run a sweep from a search-space YAML file", description=sweep.__doc__)
    p.add_argument("space", type=Path, help="search-space YAML, e.g. search_spaces/smoke.yaml")
    add_options(p, SweepOptions)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: sweep(a.space, options_from(a, SweepOptions)))

    p = sub.add_parser("plan", help="validate a search space and show its trials and cost", description=plan.__doc__)
    p.add_argument("space", type=Path, help="search-space YAML")
    p.add_argument("--no-share-epochs", dest="share", action="store_false", default=None, help="plan without epoch sharing")
    p.add_argument("--pack", type=int, default=None, metavar="PACK", help=SweepOptions.__dataclass_fields__["pack"].metadata["help"])
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: plan(a.space, a.share, a.pack))

    p = sub.add_parser("report", help="tables and figures of a sweep, from MLflow", description=report.__doc__)
    p.add_argument("name", help="the sweep's name")
    p.add_argument("--out", default=None, help="folder for the CSV, summary and PNG files (default: reports/NAME)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the sweep's own, else $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: report(a.name, a.out, a.tracking_uri, a.storage))

    p = sub.add_parser("resume", help="continue an interrupted sweep", description=resume.__doc__)
    p.add_argument("name", help="the sweep's name")
    add_options(p, ResumeOptions)
    p.add_argument("--ship-code", action="store_true",
                   help="with a job server's --address: send this machine's kd_tune package with the job (default: as the sweep's last job did)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: resume(a.name, options_from(a, ResumeOptions).as_sweep_options(), a.ship_code))

    p = sub.add_parser("submit", help="submit a sweep to a Ray cluster as a job (from a laptop)", description=submit.__doc__)
    p.add_argument("space", type=Path, help="search-space YAML on this machine, e.g. search_spaces/smoke.yaml")
    add_options(p, SubmitOptions)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: submit(a.space, options_from(a, SubmitOptions)))

    address_help = SubmitOptions.__dataclass_fields__["address"].metadata["help"]
    p = sub.add_parser("jobs", help="the kd-tune sweeps submitted to a cluster, their jobs and progress", description=jobs.__doc__)
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: jobs(a.address))

    p = sub.add_parser("logs", help="the logs of a sweep's job", description=logs.__doc__)
    p.add_argument("name", help="the sweep's name")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: logs(a.name, a.follow, a.address))

    p = sub.add_parser("stop", help="stop a sweep's job (it can be resumed)", description=stop.__doc__)
    p.add_argument("name", help="the sweep's name")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: stop(a.name, a.address))

    p = sub.add_parser("sync", help="complete a sweep's MLflow record from its checkpoints (after a tracking outage)", description=sync.__doc__)
    p.add_argument("name", help="the sweep's name")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: sync(a.name, a.storage))

    p = sub.add_parser("status", help="trials finished / running / pending / errored of a sweep", description=status.__doc__)
    p.add_argument("name", help="the sweep's name")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: status(a.name, a.storage))

    p = sub.add_parser("ui", help="MLflow UI and tracking server on 127.0.0.1 over the same store", description=ui.__doc__)
    p.add_argument("name", nargs="?", default=None, help="a sweep's name: print the address of its runs page only (default: every sweep's)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--host", default=UI_HOST, help="address to bind (default 127.0.0.1: only this machine; use ssh/ray port forwarding)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--artifacts-destination", default=None,
                   help="where the server keeps the artifacts clients log through it: a folder or a URI such as s3://bucket/mlflow "
                        "(default: MLflow's ./mlartifacts)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: ui(a.tracking_uri, a.host, a.port, a.artifacts_destination, a.name))

    p = sub.add_parser("data", help="fetch or verify a dataset's files", description=data.__doc__)
    p.add_argument("name", help="dataset name, e.g. mnist")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(run=lambda a: data(a.name, a.data_dir))
    return parser


def _stop_like_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM handler: do what Ctrl+C does now (Tune's graceful stop during a sweep, KeyboardInterrupt otherwise)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _stop_signals() -> Callable[[], None]:
    """Make SIGTERM (kill, a supervisor, Ray's job stop by default) end a command as Ctrl+C does, so a sweep
    ends as an interrupted sweep: runs closed as KILLED, the resume command printed. (``ray.init`` installs
    its own SIGTERM handler, ``sys.exit``, which still closes the runs; kd-tune's jobs are stopped with
    SIGINT, see kd_tune.jobs.) A Ray job's driver starts with SIGINT ignored, as Ray's workers have it;
    it gets Python's Ctrl+C back. Returns what puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    # The variable marks a driver started by Ray's job supervisor (ray._private.runtime_env.constants).
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and before[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore() -> None:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_signals = _stop_signals()
    try:
        return int(args.run(args))
    except KdTuneError as e:
        if args.debug:
            raise
        print(f"kd-tune {args.command}: error: {e}", file=sys.stderr)
        if isinstance(e, UsageError):
            print(f"(see 'kd-tune {args.command} --help')", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"kd-tune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kd-tune plan ... | head`): not an error of ours; keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        # Anything else (a library's error, a bug of ours): one line, the traceback only on request.
        if args.debug:
            raise
        from kd_tune.errors import first_line

        print(f"kd-tune {args.command}: error: {type(e).__name__}: {first_line(e)[:500]}\n(run it again with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        restore_signals()


def run() -> NoReturn:
    """The ``kd-tune`` command: :func:`main`, then exit without Python's module teardown.

    Why: once a subcommand has returned, everything it wrote is closed (MLflow runs ended, Ray shut
    down, files replaced atomically), yet tearing down the torch, Ray and MLflow modules it imported takes
    about 3 s more on a 2-core machine: a tenth of a short sweep. The exit handlers still run (logging,
    MLflow's temporary folders) and threads that are not daemons are still waited for, as at a normal exit.
    """
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away, or the stream is closed: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
