"""kd-tune from Python: start a sweep from a search-space file or a dict, resume one, load one by name, and read its
results as pandas DataFrames (docs/python-api.md). The ``kd-tune`` command is a thin layer over these functions
(:mod:`kd_tune.cli.commands`): ``kd-tune sweep`` is :func:`run`, ``kd-tune resume`` :func:`resume`, ``kd-tune status``
``load(name).status()`` and ``kd-tune report`` ``load(name).report()``.

Every argument mirrors a flag of the command (:class:`~kd_tune.space.options.SweepOptions`) and is checked the same
way: bad input raises :class:`~kd_tune.errors.UsageError` (a :class:`~kd_tune.errors.KdTuneError`) whose message is the
one line the command prints after ``kd-tune sweep: error:``; nothing has been started or written then.

Light to import: torch, Ray, MLflow and pandas load when a function needs them, so ``import kd_tune`` is instant.
A sweep run here leaves the process as it found it (:func:`kd_tune.process.sweep_process`: the environment, loggers,
the garbage collector, MLflow's tracking URI, the signal handlers), joins a Ray the caller started with ``ray.init()``
(and leaves it running), or starts one for the sweep and stops it after; a second sweep in the same process works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kd_tune.errors import DiskFullError, FlagError, KdTuneError, TrackingUnavailableError, UsageError, first_line
from kd_tune.space.options import SweepOptions

if TYPE_CHECKING:
    from typing import TypeAlias

    import pandas as pd

    from kd_tune.report.report import Report
    from kd_tune.report.stats import Best
    from kd_tune.space.schema import SweepSpec
    from kd_tune.sweep.results import SweepOutcome, SweepStatus
    from kd_tune.sweep.state.storage import Storage

    StorageLike: TypeAlias = str | os.PathLike[str] | Storage
    """A storage: a folder, a URI such as ``s3://bucket/prefix``, or a resolved :class:`~kd_tune.sweep.state.storage.Storage`."""
    SpaceLike: TypeAlias = str | os.PathLike[str] | Mapping[str, Any] | SweepSpec
    """A search space: a YAML file's path, the same data as a dict, or a :class:`~kd_tune.space.schema.SweepSpec`."""

__all__ = ["KdTuneError", "Sweep", "UsageError", "load", "resume", "run"]

Progress = Literal["line", "table"] | None
"""What a sweep shows while its trials run: ``"line"``, one compact line (grid points done / running / pending, time
elapsed and left; in a notebook one output updated in place, elsewhere a line every 20 s); ``"table"``, Ray Tune's
progress table every 30 s (what ``kd-tune sweep`` prints); ``None``, nothing."""
Interrupt = Literal["raise", "return"]
"""What :func:`run` and :func:`resume` do after Ctrl+C (a notebook's interrupt) stopped the trials: ``"raise"`` raises
``KeyboardInterrupt`` once the sweep is saved and resumable; ``"return"`` returns the :class:`Sweep` as it stands
(``interrupted`` is then True): what ``kd-tune sweep`` does (it prints what finished, then exits 1)."""
Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def run(space: SpaceLike, *, name: str | None = None, storage: StorageLike | None = None, tracking_uri: str | None = None,
        address: str | None = None, data_dir: str | os.PathLike[str] | None = None, cpus_per_trial: float | None = None,
        gpus_per_trial: float | None = None, pack: int | None = None, max_failures: int | None = None, share_epochs: bool = True,
        resume: bool = False, tracking_wait: float | None = None, progress: Progress = "line", log: Log | None = _print,
        interrupt: Interrupt = "raise") -> Sweep:
    """Run a sweep: every trial of a search space, on Ray, recorded in MLflow (``kd-tune sweep SPACE``).

    Args:
        space: a search-space YAML file's path, or the same data as a dict (validated alike: docs/search-spaces.md).
        name: the sweep's name (``--name``; default: the space's ``name``).
        storage: where sweeps and the teacher cache live, a folder or a URI (``--storage``; default
            ``$KD_TUNE_STORAGE``, else ``./kd_tune_results``).
        tracking_uri: the MLflow store (``--tracking-uri``; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
            in the current folder).
        address: a Ray cluster to join (``--address``, e.g. ``"auto"``; default ``$RAY_ADDRESS``, else the Ray this
            process already runs (``ray.init()``), else a local Ray started for the sweep and stopped after it).
        data_dir: the dataset folder (``--data-dir``; default ``$KD_TUNE_DATA_DIR`` or ``~/.cache/kd-tune/data``).
        cpus_per_trial, gpus_per_trial, pack, max_failures: override the space's ``resources.cpu``, ``resources.gpu``,
            ``resources.pack`` and ``max_failures`` (the flags of the same names).
        share_epochs: False trains one trial per epochs value (``--no-share-epochs``); True keeps the space's setting.
        resume: continue the sweep if one of this name exists (``--resume``); else a taken name is refused.
        tracking_wait: seconds the end waits for MLflow writes held back by an unreachable store (``--tracking-wait``).
        progress: ``"line"``, ``"table"`` or ``None`` (:data:`Progress`).
        log: where kd-tune's own lines go (the start, the teacher, warnings); None: nowhere.
        interrupt: after Ctrl+C, ``"raise"`` (KeyboardInterrupt) or ``"return"`` (:data:`Interrupt`).

    Returns:
        The :class:`Sweep`, ended: ``ok`` when every grid point finished.

    Raises:
        UsageError: bad input (a space, a value, a name that is taken); the message is the command's error line.
        KdTuneError: an error said in one line (an unreachable tracking store, a full disk with the way on).
        KeyboardInterrupt: Ctrl+C, after the sweep was stopped and saved (:func:`resume` continues it).
    """
    from kd_tune.sweep.start import read_space, run_sweep

    _check(progress, interrupt)
    root = _storage(storage)
    opts = SweepOptions(name=name, storage=root.given, data_dir=_text(data_dir), address=address, tracking_uri=tracking_uri,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, max_failures=max_failures,
                        quiet=log is None and progress is None, resume=resume, no_share_epochs=not share_epochs, pack=pack,
                        tracking_wait=tracking_wait)
    say, given = log or _silent, _space_arg(space)
    outcome = _running(lambda: run_sweep(given, root, opts, say, progress), lambda: name or read_space(given)[0].name, root, tracking_uri)
    return _ended(Sweep(outcome.name, root, tracking_uri=outcome.tracking_uri, outcome=outcome), interrupt, say)


def resume(name: str, *, storage: StorageLike | None = None, tracking_uri: str | None = None, address: str | None = None,
           data_dir: str | os.PathLike[str] | None = None, cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
           tracking_wait: float | None = None, progress: Progress = "line", log: Log | None = _print,
           interrupt: Interrupt = "raise") -> Sweep:
    """Continue an interrupted sweep from this process (``kd-tune resume NAME``): finished trials stay, the others go on
    from their last checkpoints, into the same MLflow runs. The space, the packs and the MLflow store are the sweep's
    own (``tracking_uri``, if given, must be that store); the other arguments are :func:`run`'s.

    Raises:
        UsageError: no sweep of that name in the storage (the message lists those there), or a bad value.
        KdTuneError, KeyboardInterrupt: as :func:`run`.
    """
    from kd_tune.sweep.start import resume_sweep

    _check(progress, interrupt)
    root = _storage(storage)
    opts = SweepOptions(storage=root.given, data_dir=_text(data_dir), address=address, tracking_uri=tracking_uri,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, quiet=log is None and progress is None,
                        tracking_wait=tracking_wait)
    say = log or _silent
    outcome = _running(lambda: resume_sweep(name, root, opts, say, progress), lambda: name, root, tracking_uri)
    return _ended(Sweep(outcome.name, root, tracking_uri=outcome.tracking_uri, outcome=outcome), interrupt, say)


def replay(name: str, *, member: str | None = None, seeds: int | list[int] = 3, new_name: str | None = None,
           storage: StorageLike | None = None, tracking_uri: str | None = None, **options: Any) -> Sweep:
    """Train a population sweep's best schedule again from scratch with fresh seeds (``kd-tune replay NAME``).

    The member (default: the best, selected on validation) leaves its alpha and T of every epoch, inherited through each
    exploit, in its checkpoint's lineage; a grid sweep ``new_name`` (default ``NAME-replay``) trains them as fixed
    ``table`` schedules with ``seeds`` (a count of fresh seeds, or the seeds themselves), beside the sweep's baselines of
    those seeds, in the same storage and MLflow store. ``options``: :func:`run`'s (address, data_dir, progress, ...).

    Raises:
        UsageError: a sweep without a population, an unknown member, a member that has not finished its epochs.
    """
    from kd_tune.space.parse import load_space_text
    from kd_tune.sweep.schedule_replay import replay_spec
    from kd_tune.sweep.state.sweep_files import SPACE_FILE, sweep_path

    root = _storage(storage)
    sweep_path(root, name)
    if not root.exists(name, SPACE_FILE):
        raise UsageError(f"no sweep {name!r} in {root.show()} (its {SPACE_FILE} is not there)")
    spec = load_space_text(root.read_text(name, SPACE_FILE), root.show(name, SPACE_FILE))
    replayed, chosen = replay_spec(spec, root, name, member=member, seeds=seeds, name=new_name)
    say = options.get("log", _print) or _silent
    say(f"replaying {chosen.label} of sweep {name!r} (selected on {chosen.metric}: {chosen.score:.4f} at epoch {chosen.epoch}; "
        f"{len(chosen.lineage.exploits)} exploits) as sweep {replayed.name!r}, seeds {', '.join(map(str, replayed.grid.seed))}")
    return run(replayed, storage=root, tracking_uri=tracking_uri or load(name, storage=root).tracking_uri, **options)


def load(name: str, *, storage: StorageLike | None = None, tracking_uri: str | None = None) -> Sweep:
    """A sweep by name, finished or still running, as its storage and its MLflow record hold it (nothing is read yet:
    each of the :class:`Sweep`'s methods reads what it needs when called, and raises :class:`UsageError` when that is
    not there, e.g. a name that neither the storage nor the store knows).

    Args:
        storage: the storage it was run with (default ``$KD_TUNE_STORAGE``, else ``./kd_tune_results``).
        tracking_uri: its MLflow store (default: the one the sweep recorded in its storage, else ``$MLFLOW_TRACKING_URI``
            or ``sqlite:///mlflow.db`` here).

    Raises:
        UsageError: a name that is not allowed, or a storage URI that cannot be read.
    """
    from kd_tune.sweep.state.sweep_files import sweep_path

    root = _storage(storage)
    sweep_path(root, name)
    return Sweep(name, root, tracking_uri=tracking_uri)


class Sweep:
    """A sweep, by name: what :func:`run`, :func:`resume` and :func:`load` return.

    Its tables are pandas DataFrames: :meth:`table` (one row per grid point: the table ``kd-tune sweep`` ends with),
    :meth:`runs` (one row per MLflow run: ``kd-tune report``'s ``runs.csv``), :meth:`summary` and :meth:`gains` (its
    ``summary.csv`` and ``gains.csv``); :meth:`best` is the configuration selected on validation with its paired gain
    over scratch; :meth:`status` is ``kd-tune status``; :meth:`report` writes ``kd-tune report``'s files.
    """

    def __init__(self, name: str, storage: Storage, *, tracking_uri: str | None = None, outcome: SweepOutcome | None = None) -> None:
        self.name = name
        self.storage = storage
        """Where the sweep lives (:class:`~kd_tune.sweep.state.storage.Storage`)."""
        self.outcome = outcome
        """What the sweep ended with when this process ran it (:class:`~kd_tune.sweep.results.SweepOutcome`), else None."""
        self._tracking_uri = tracking_uri

    @property
    def tracking_uri(self) -> str:
        """Its MLflow store: the one given, else the one it recorded in its storage, else MLflow's default."""
        if self.outcome is not None:
            return self.outcome.tracking_uri
        from kd_tune.sweep.state.sweep_files import SweepRecord
        from kd_tune.tracking.store import resolve_tracking_uri

        if self._tracking_uri is None and SweepRecord.exists(self.storage, self.name):
            self._tracking_uri = SweepRecord.load(self.storage, self.name).tracking_uri
        self._tracking_uri = resolve_tracking_uri(self._tracking_uri)
        return self._tracking_uri

    @property
    def ok(self) -> bool:
        """Every grid point finished (in the run that returned this object; a loaded sweep: see :meth:`status`)."""
        return self.outcome is not None and self.outcome.ok

    @property
    def interrupted(self) -> bool:
        """The run that returned this object was stopped (Ctrl+C) before every trial ended: :meth:`resume` continues it."""
        if self.outcome is None:
            return False
        table = self.outcome.table
        return bool((table["status"] == "unfinished").any()) or len(table) < self.outcome.total

    def table(self) -> pd.DataFrame:
        """One row per grid point (a trial serving several epochs values gives a row for each): its values, status and
        test accuracy, loss and teacher agreement at its epochs, as ``kd-tune sweep`` prints it at the end. Read from the
        run that returned this object, else from the sweep's storage (Ray Tune's record of its trials)."""
        if self.outcome is not None:
            return self.outcome.table.copy()
        from ray import tune

        from kd_tune.sweep.results import results_table
        from kd_tune.sweep.state.tune_state import require_sweep

        path = require_sweep(self.storage, self.name)
        return results_table(tune.ResultGrid(tune.ExperimentAnalysis(path, storage_filesystem=self.storage.ray_filesystem)))

    def runs(self) -> pd.DataFrame:
        """Every student and scratch run of its MLflow record, one row each, with params, status and last metrics: what
        ``kd-tune report`` reads, and writes as ``runs.csv``."""
        from kd_tune.report.run_table import load_runs

        with self._store():
            return load_runs(self.name, self.tracking_uri)[0]

    def summary(self) -> pd.DataFrame:
        """Test accuracy per configuration over seeds (mean, 95 % interval, n; mean validation accuracy): ``summary.csv``."""
        from kd_tune.report.run_table import selectable
        from kd_tune.report.stats import summarize

        return summarize(selectable(self.runs()))

    def gains(self) -> pd.DataFrame:
        """Each distilled configuration's gain over scratch, paired by seed, with its interval and Holm-adjusted p:
        ``gains.csv``."""
        from kd_tune.report.run_table import selectable
        from kd_tune.report.stats import gains_over_scratch

        return gains_over_scratch(selectable(self.runs()))

    def best(self, distilled_only: bool = False) -> Best | None:
        """The configuration selected on validation (on test without a validation split), with its test accuracy and
        its paired gain over scratch, as ``kd-tune report`` computes it; ``distilled_only``: among the configurations
        that learn from the teacher. None while no student run finished."""
        from kd_tune.report.run_table import selectable
        from kd_tune.report.stats import best_config, gains_over_scratch, protocol_of, summarize

        runs = selectable(self.runs())
        if runs.empty:
            return None
        protocol = protocol_of(runs)
        return best_config(runs, summarize(runs), gains_over_scratch(runs), distilled_only=distilled_only, select_on=protocol.selected_on)

    def status(self) -> SweepStatus:
        """Its trials as its storage tells them (``kd-tune status``): ``counts`` (finished, running, interrupted,
        pending, errored, diverged...), ``table`` (one row per trial, a DataFrame), ``driver_alive``; ``format()`` is
        the command's output.

        Raises :class:`UsageError` when the storage holds no sweep of that name."""
        from kd_tune.sweep.results import sweep_status

        return sweep_status(self.name, self.storage)

    def report(self, out: str | os.PathLike[str] | None = None) -> Report:
        """``kd-tune report``: the CSVs, the summary (``summary.md``) and the figures written into ``out`` (default
        ``reports/NAME``) and logged on the sweep's parent run under ``report/``. The returned report has the tables
        (``runs``, ``summary``, ``gains``), the selected configurations (``best``, ``best_distilled``), the ``files``, and
        ``markdown()``.

        Raises :class:`UsageError` for a sweep the store does not know or without student runs; :class:`KdTuneError`
        when the store does not answer."""
        from kd_tune.report.report import make_report

        with self._store("no report was made"):
            return make_report(self.name, self.tracking_uri, Path(out) if out is not None else Path("reports") / self.name)

    def resume(self, **options: Any) -> Sweep:
        """:func:`resume` of this sweep, in its storage (``options``: that function's)."""
        return resume(self.name, storage=self.storage, **options)

    def _store(self, doing: str = "nothing was read") -> Any:
        """The MLflow client's settings for the block (:func:`kd_tune.process.tracking_client`), once the store answers."""
        from contextlib import ExitStack

        from kd_tune.process import tracking_client
        from kd_tune.tracking.store import open_store
        from kd_tune.tracking.store_checks import check_tracking_store

        stack = ExitStack()
        stack.enter_context(tracking_client())
        try:
            check_tracking_store(self.tracking_uri, doing)
            open_store(self.tracking_uri)  # made safely if new (several processes at once), as the report needs it
        except BaseException:
            stack.close()
            raise
        return stack

    def __repr__(self) -> str:
        state = ""
        if self.outcome is not None:
            o = self.outcome
            state = f", {o.finished}/{o.total} grid points finished" + (", interrupted" if self.interrupted else "")
        return f"Sweep({self.name!r}, storage={self.storage.given!r}{state})"


def _silent(line: str) -> None:
    pass


def _check(progress: object, interrupt: object) -> None:
    if progress is not None and progress not in ("line", "table"):
        raise FlagError("progress", progress, "'line', 'table' or None")
    if interrupt not in ("raise", "return"):
        raise FlagError("interrupt", interrupt, "'raise' or 'return'")


def _text(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


def _space_arg(space: SpaceLike) -> str | Path | Mapping[str, Any] | SweepSpec:
    """A path-like space as the path it names (a path, a dict or a spec as it is)."""
    return space if isinstance(space, str | Path | Mapping) or not isinstance(space, os.PathLike) else Path(os.fspath(space))


def _storage(storage: StorageLike | None) -> Storage:
    """A storage argument resolved as ``--storage`` is (:func:`~kd_tune.sweep.state.storage.resolve_storage`)."""
    from kd_tune.sweep.state.storage import Storage, resolve_storage

    if isinstance(storage, Storage):
        return storage
    return resolve_storage(None if storage is None else os.fspath(storage))


def _running(call: Callable[[], SweepOutcome], name: Callable[[], str], storage: Storage, tracking_uri: str | None) -> SweepOutcome:
    """A sweep's or resume's run; after an abnormal end of one that had started, a full disk is said as such (raises
    :class:`DiskFullError`, which gives the way on) and anything else gets the resume command (on stderr)."""
    from kd_tune.errors import condensed_disk_full_logs

    try:
        with condensed_disk_full_logs():  # a full disk: Ray's and MLflow's tracebacks of it one line each, the end says which disk
            return call()
    except (Exception, KeyboardInterrupt) as e:
        if not isinstance(e, (UsageError, TrackingUnavailableError)):  # nothing was started
            if not isinstance(e, KeyboardInterrupt) and (full := disk_full_error(e, name, storage, tracking_uri)) is not None:
                raise full from e
            _hint_resume(name, storage)
        raise


def _ended(sweep: Sweep, interrupt: Interrupt, say: Log) -> Sweep:
    if interrupt == "raise" and sweep.interrupted:
        o = sweep.outcome
        assert o is not None
        message = (f"sweep {sweep.name!r} interrupted ({o.finished}/{o.total} grid points finished); "
                   f"to continue it: {resume_call(sweep.name, sweep.storage)}")
        say(message)
        raise KeyboardInterrupt(message)
    return sweep


def resume_call(name: str, storage: Storage) -> str:
    """The Python call that continues a sweep (``kd-tune resume``'s equivalent: :func:`kd_tune.sweep.state.sweep_files.resume_command`)."""
    from kd_tune.sweep.state.storage import resolve_storage

    where = "" if storage.given == resolve_storage(None).given else f", storage={storage.given!r}"
    return f"kd_tune.resume({name!r}{where})"


def _hint_resume(name: Callable[[], str], storage: Storage) -> None:
    """After an abnormal end of a sweep that had started, say how to continue it."""
    from kd_tune.sweep.state.sweep_files import SweepRecord, resume_command, sweep_path

    try:
        sweep_path(storage, name())
        if SweepRecord.exists(storage, name()):
            print(f"kd-tune: the sweep did not end normally; to continue it: {resume_command(name(), storage)}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        pass


def disk_full_error(e: BaseException, name: Callable[[], str], storage: Storage, tracking_uri: str | None) -> DiskFullError | None:
    """The one line for a sweep that a full disk ended (None if none did): which place is full, that nothing finished is
    lost, and the command that goes on once there is room.

    Where: the file the error names (kd-tune's own writes name it: the teacher cache's), else SQLite's own words (the
    tracking store), else the place with no room left. That last one also catches a full disk whose error is gone from
    the chain: Tune, after its syncer failed on the full storage, reads back the error file it truncated there and
    ends with ``EOFError: Ran out of input``."""
    from kd_tune.errors import disk_full_cause
    from kd_tune.sweep.state.storage import FULL_BELOW_BYTES, free_bytes
    from kd_tune.sweep.state.sweep_files import SweepRecord, resume_command
    from kd_tune.sweep.state.tune_state import can_restore
    from kd_tune.sweep.teacher_cache import CACHE_FOLDER
    from kd_tune.tracking.store import local_store_path, resolve_tracking_uri

    try:
        sweep = name()
        uri = SweepRecord.load(storage, sweep).tracking_uri if SweepRecord.exists(storage, sweep) else resolve_tracking_uri(tracking_uri)
        cause = disk_full_cause(e)
        store = local_store_path(uri)
        full, tracking = f"the sweep's storage {storage.show()} is full", f"the MLflow tracking store {uri} is full"
        places = {  # what to say -> the local paths it covers; "mlruns": MLflow's default artifact root beside a database store
            f"{full} (writing the teacher cache)": [Path(storage.path(CACHE_FOLDER))] if storage.is_local else [],
            full: [Path(storage.root)] if storage.is_local else [],
            tracking: [store, Path("mlruns")] if store is not None else [],
        }
        named = [Path(str(f)).absolute() for f in (getattr(cause, "filename", None), getattr(cause, "filename2", None)) if f]
        where = next((place for place, paths in places.items() for f in named for p in paths if f == p.absolute() or p.absolute() in f.parents),
                     None)
        if where is None and cause is not None and "database or disk is full" in first_line(cause):
            where = tracking
        room = None
        for place in (full, tracking) if where is None else ():
            room = min((b for b in map(free_bytes, places[place]) if b is not None), default=None)
            if room is not None and room < FULL_BELOW_BYTES:
                where = place
                break
        if where is None and cause is None:
            return None
        said = first_line(cause)[:300] if cause is not None else f"{(room or 0) // 1024} KiB left on its disk"
        try:
            restorable = can_restore(storage, sweep)
        except OSError:  # it puts back a Tune state cut short, which the full disk refused: a resume does it once there is room
            restorable = True
        go_on = f"continue with: {resume_command(sweep, storage)}" if restorable else "run the same kd-tune sweep command again"
        return DiskFullError(f"{where or 'a disk is full'} ({said}): nothing finished is lost; once there is room, {go_on}")
    except Exception:  # noqa: BLE001 - saying which disk is full must never hide the error itself
        return None
