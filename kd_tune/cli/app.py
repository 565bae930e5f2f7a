"""``kd-tune``: the parser, built from the table of subcommands (:data:`COMMANDS`: name, help, arguments dataclass,
function).

Errors print one line (exit 2 for bad input, 1 otherwise; 3 when a sweep's trials ended but the tracking store was
still unreachable: ``kd-tune sync`` completes the record); ``--debug`` shows the traceback instead. Building the
parser imports neither torch, Ray nor MLflow (the arguments are plain dataclasses, the commands import what they
need), so ``--help`` and ``plan`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kd_tune.cli import args as a
from kd_tune.cli import commands
from kd_tune.errors import KdTuneError, UsageError
from kd_tune.process import fast_exit


@dataclass(frozen=True)
class Command:
    """One subcommand: what ``kd-tune --help`` lists, the dataclass its arguments fill, the function they go to."""

    name: str
    help: str
    args: type
    run: Callable[[Any], int]


COMMANDS = (
    Command("sweep", "run a sweep from a search-space YAML file", a.SweepArgs, commands.sweep),
    Command("plan", "validate a search space and show its trials and cost", a.PlanArgs, commands.plan),
    Command("report", "tables and figures of a sweep, from MLflow", a.ReportArgs, commands.report),
    Command("resume", "continue an interrupted sweep", a.ResumeArgs, commands.resume),
    Command("replay", "train a population sweep's best alpha/T schedule again from scratch, with fresh seeds", a.ReplayArgs, commands.replay),
    Command("submit", "submit a sweep to a Ray cluster as a job (from a laptop)", a.SubmitArgs, commands.submit),
    Command("jobs", "the kd-tune sweeps submitted to a cluster, their jobs and progress", a.JobsArgs, commands.jobs),
    Command("logs", "the logs of a sweep's job", a.LogsArgs, commands.logs),
    Command("stop", "stop a sweep's job (it can be resumed)", a.JobArgs, commands.stop),
    Command("sync", "complete a sweep's MLflow record from its checkpoints (after a tracking outage)", a.SweepNameArgs, commands.sync),
    Command("status", "a sweep's trials: finished, running, pending, errored", a.SweepNameArgs, commands.status),
    Command("ui", "MLflow UI and tracking server on 127.0.0.1 over the same store", a.UiArgs, commands.ui),
    Command("data", "fetch or verify a dataset's files", a.DataArgs, commands.data),
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors name the subcommand's help (and exit 2, as argparse does)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def _converter(kind: str) -> Callable[[str], Any]:
    return Path if "Path" in kind else float if "float" in kind else int if "int" in kind else str


def add_arguments(parser: argparse.ArgumentParser, cls: Any) -> None:
    """One argument per field of an arguments dataclass: positional where its metadata says so, else ``--flag``
    (a bool a switch); the field's metadata help is the argument's help."""
    fields = dataclasses.fields(cls)
    for f in sorted(fields, key=lambda f: not f.metadata.get("positional")):  # positionals first in the usage line
        kind, help_text = str(f.type), f.metadata.get("help", "")
        if f.metadata.get("positional"):
            extra: dict[str, Any] = {"nargs": "?", "default": None} if f.metadata.get("optional") else {}
            parser.add_argument(f.name, type=_converter(kind), help=help_text, **extra)
        elif kind == "bool":
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help_text)
        else:
            default = None if f.default is dataclasses.MISSING else f.default
            parser.add_argument("--" + f.name.replace("_", "-"), type=_converter(kind), default=default, metavar=f.name.upper(), help=help_text)


def arguments_from(ns: argparse.Namespace, cls: Any) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd-tune", description="Hyperparameter sweeps for knowledge distillation (Ray Tune + MLflow).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.run.__doc__)
        add_arguments(p, c.args)
        # After the subcommand too (`kd-tune sweep space.yaml --debug`); SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(run=lambda ns, c=c: c.run(arguments_from(ns, c.args)))
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
    SIGINT, see kd_tune.sweep.cluster.job_server.) A Ray job's driver starts with SIGINT ignored, as Ray's workers have it;
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
        from kd_tune.errors import DiskFullError, disk_full_cause, first_line

        if (full := disk_full_cause(e)) is not None:
            # A full disk deep in a library's error (a report's MLflow write, a dataset's download): that cause, not the wrapper.
            # (A sweep and a resume say which disk, and how to go on: kd_tune.cli.commands.)
            print(f"kd-tune {args.command}: error: a disk is full ({first_line(full)[:300]}); once there is room, run it again", file=sys.stderr)
            return DiskFullError.exit_code
        print(f"kd-tune {args.command}: error: {type(e).__name__}: {first_line(e)[:500]}\n(run it again with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        restore_signals()


def run() -> NoReturn:
    """The ``kd-tune`` command: :func:`main`, then :func:`kd_tune.process.fast_exit` (Python's exit steps without its
    module teardown, which costs seconds once torch, Ray and MLflow are loaded)."""
    fast_exit(main())
