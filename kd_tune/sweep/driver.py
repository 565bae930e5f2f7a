"""A sweep's driver once Ray is up: its data and MLflow record, the teachers, the ``Tuner`` (new or
restored), and the end (tracking flushed, runs closed, results, the summary on the parent run).

The MLflow store and experiment are created by the driver before any trial runs (a fresh sqlite
store raced on first concurrent use); the teacher's logits are put in Ray's object store once, and
every trial reads them from there. :mod:`kd_tune.sweep.start` checks everything first and calls in here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from kd_tune.data.split import DataSplit, flip_labels, prepare
from kd_tune.distill.online import TeacherNet
from kd_tune.distill.pretrained import portable_bytes
from kd_tune.distill.teacher import Teacher, ensemble_logits, log_teacher_summary
from kd_tune.errors import FlagError, disk_full_cause
from kd_tune.process import Startup
from kd_tune.report.summary import summarize_on_parent
from kd_tune.space.options import SweepOptions
from kd_tune.space.parse import space_to_yaml
from kd_tune.space.schema import SweepSpec
from kd_tune.space.sections import is_model_uri
from kd_tune.space.trial_report import TrialReport
from kd_tune.space.trials import PACK, PARAM_COLUMNS, POINT, TrialConfig
from kd_tune.sweep import hooks, population, search
from kd_tune.sweep.callback import MlflowTrackingCallback, open_outbox, outbox_of
from kd_tune.sweep.checks import run_params
from kd_tune.sweep.cluster.connect import driver_is_the_only_node, teacher_cpus
from kd_tune.sweep.names import trial_dirname, trial_name
from kd_tune.sweep.results import SweepOutcome, results_table
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.sweep_files import (
    SPACE_FILE,
    SweepRecord,
    claim_driver,
    release_driver,
    resume_command,
    save_tracking_inputs,
    sweep_path,
)
from kd_tune.sweep.state.sync import recorder_for, replay
from kd_tune.sweep.state.tune_state import can_restore
from kd_tune.sweep.teacher_cache import get_teachers
from kd_tune.sweep.trainable import TrialBundle, kd_trainable
from kd_tune.tracking.datasets import DataInput, dataset_inputs, log_sweep_inputs
from kd_tune.tracking.logged_models import input_example
from kd_tune.tracking.model_uri import fetch
from kd_tune.tracking.outbox import Backlog
from kd_tune.tracking.runs import (
    close_running_runs,
    complete_parent_run,
    create_parent_run,
    discard_forgotten_runs,
    get_or_create_experiment,
    log_metrics,
    log_teacher_runs,
)
from kd_tune.tracking.store import open_store, resolve_tracking_uri

Log = Callable[[str], None]
INTERRUPTED_WAIT_S = 15.0  # after Ctrl+C: the user wants the prompt back
TEACHERS_RECORD = "the teachers' runs"  # the driver's own tracking write (kd-tune sync does not make it; a resume does)


@dataclass(frozen=True)
class Loaded:
    """What the sweep reads before Ray is needed: the data, its labels per noise level, the MLflow record."""

    split: DataSplit
    labels: dict[float, torch.Tensor]
    client: MlflowClient | None
    record: SweepRecord | None
    """The record (the existing one, or made now) once opened; ``None`` until :func:`_open_tracking` ran."""


def load(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None, log: Log, *, open_record: bool) -> Loaded:
    """Read the sweep's data (and, with ``open_record``, open its MLflow record): nothing here needs Ray."""
    ds = spec.dataset
    data_dir = Path(opts.data_dir) if opts.data_dir else None
    split = prepare(ds.name, ds.train_size, 0.0, ds.seed, data_dir, log, val_size=ds.val_size, normalize=ds.normalize, path=ds.path,
                    test_split=ds.test_split)
    # The same fixed flips as prepare() would make, once per noise level of the sweep.
    labels = {n: flip_labels(split.train_y, n, spec.dataset.seed, split.info.num_classes) for n in spec.noise_levels()}
    if not open_record:
        return Loaded(split, labels, None, record)
    client, record = _open_tracking(spec, storage, opts, record)
    return Loaded(split, labels, client, record)


TeacherKey = tuple[str, float]
"""(``grid.teacher`` entry, label-noise level): which logits a student learns from ("" without a teacher axis)."""


@dataclass(frozen=True)
class _Teachers:
    """The teachers' logits per (teacher, label-noise level) the students see, the first one's accuracy, and their MLflow record."""

    train: dict[TeacherKey, torch.Tensor]
    test: dict[TeacherKey, torch.Tensor]
    nets: dict[TeacherKey, list[TeacherNet]]
    """The networks themselves, for students whose teacher runs live (augmented batches); empty when none does."""
    acc: float
    record: Callable[[], None]
    """Writes the teachers' runs (with their models) and the parent run's datasets, teachers and teacher
    accuracy; safe to call again after it failed half-way (what the store has is not written twice)."""


def drive(spec: SweepSpec, storage: Storage, opts: SweepOptions, loaded: Loaded, log: Log, *, started: float, wait: float,
          startup: Startup) -> SweepOutcome:
    """Run the sweep on the Ray this process is connected to; ``wait``: seconds the end waits for tracking (``--tracking-wait``);
    ``startup``: the collector paused during the start-up (:func:`kd_tune.process.sweep_process`), running again once the trials start."""
    data_dir = Path(spec.dataset.path) if spec.dataset.path else Path(opts.data_dir) if opts.data_dir else None  # where the images came from
    split, labels = loaded.split, loaded.labels
    if loaded.client is not None and loaded.record is not None:
        client, record = loaded.client, loaded.record
    else:
        client, record = _open_tracking(spec, storage, opts, loaded.record)
    restoring = can_restore(storage, spec.name)
    finished_before: set[str] = set()
    if restoring:
        analysis = tune.ExperimentAnalysis(sweep_path(storage, spec.name), storage_filesystem=storage.ray_filesystem)
        finished_before = {t.trial_id for t in analysis.trials if t.status == "TERMINATED"}
        # Trials Ray created after its last saved state are gone with a killed driver (a search suggests them anew).
        discard_forgotten_runs(client, record.experiment_id, record.parent_run_id, {str(t.trial_id) for t in analysis.trials})

    claim_driver(storage, spec.name)
    try:
        if restoring:
            # What the last driver never got to MLflow (killed while the store was away) is in the checkpoints.
            replayed = replay(recorder_for(storage, record, spec), storage, spec.name, analysis.trials)
            if replayed.steps or replayed.ended:
                log(f"tracking: {replayed.steps} epochs of metrics and {replayed.ended} run ends the last driver had not recorded "
                    "were written from the trials' checkpoints")
        inputs = dataset_inputs(split, labels, data_dir)  # the runs' datasets for MLflow, fingerprinted once
        example = input_example(split)  # every logged model's input example: the teachers' and the students'
        teachers = _get_teachers(spec, split, labels, storage, client, record, opts.quiet, log, inputs=inputs, example=example,
                                 data_dir=data_dir, in_driver=driver_is_the_only_node(opts.address))
        trials, total = spec.trials(), spec.planned_rows()
        n_trials = len(spec.packs()) + spec.search.num_samples
        verb = f"resuming ({len(finished_before)} of {n_trials} trials finished before)" if finished_before or opts.resume else "starting"
        what = (f"{len(trials)} baseline trials + {spec.search.num_samples} {spec.search.algorithm} search trials (at most "
                if spec.is_search else f"{len(spec.packs())} packs of up to {spec.resources.pack_size} students ({len(trials)} epoch-shared students) "
                f"for {total} grid points (" if spec.packed else f"{len(trials)} trials for {total} grid points (")
        log(f"sweep {spec.name!r}: {verb}; {what}{spec.student_epochs()} student epochs), "
            f"{spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU each; results in {storage.show(spec.name)}")
        # Object refs do not survive a restore: the bundle is put in the object store anew each run.
        bundle = TrialBundle(split, spec.students(), labels, teachers.train, teachers.test, storage, spec.name, next(iter(spec.teachers())),
                             hooks.from_environment(storage), teachers.nets,
                             {name: t.weights() for name, t in spec.teachers().items() if t.ensemble_weights})
        tuner = _make_tuner(spec, storage, bundle, record, restoring, opts.quiet, inputs=inputs, example=example)
        # The teachers' MLflow record is the sweep's first tracking write, shipped while the trial workers start
        # rather than before: it is seconds of one core (their models' torch.export, the first one importing
        # torch's compiler stack; benchmarks/RESULTS.md, session 7), and a store that is away then no longer keeps the trials from training.
        open_outbox(spec.name, record.tracking_uri).put(teachers.record, TEACHERS_RECORD)
        # Everything made so far (the modules, the data, the teachers' logits) lives until the sweep ends:
        # take it out of the collector's walks, then let the collector run again.
        startup.trials_start()
        try:
            grid = tuner.fit()
            if full := next((e for e in grid.errors if disk_full_cause(e)), None):
                raise full  # trials failed on a full disk: the CLI says which, and how to go on, rather than "errored"
        except BaseException:
            if not _flush_tracking(spec.name, min(wait, INTERRUPTED_WAIT_S), log):
                # Runs of trials cut short (Ctrl+C, a crash in the driver) are not left RUNNING; a resume reopens them.
                close_running_runs(client, record.experiment_id, record.parent_run_id)
            raise
        behind = _flush_tracking(spec.name, wait, log)
        if not behind:
            close_running_runs(client, record.experiment_id, record.parent_run_id)
        table = results_table(grid, finished_before)
        counts = {s: int((table["status"] == s).sum()) for s in ("finished", "stopped early", "errored", "diverged")}
        done = counts["finished"] + counts["stopped early"]  # a trial the scheduler stopped ended as it should
        if not behind:
            summarize_on_parent(spec.name, record.tracking_uri, log)
            client.set_terminated(record.parent_run_id, "FINISHED" if done == total else "FAILED")
        return SweepOutcome(spec.name, storage.show(spec.name), table, total, done, counts["errored"], counts["diverged"],
                            record.tracking_uri, record.experiment_id, record.parent_run_id, teachers.acc, time.perf_counter() - started,
                            resume_command(spec.name, storage), tracking_behind=behind.describe() if behind else "",
                            tracking_needs_resume=TEACHERS_RECORD in behind.pending)
    except BaseException:
        try:
            client.set_terminated(record.parent_run_id, "KILLED")
        except Exception:  # noqa: BLE001 - the store may be away: kd-tune sync or resume closes the parent run
            pass
        raise
    finally:
        release_driver(storage, spec.name)


def _flush_tracking(name: str, wait: float, log: Log) -> Backlog:
    """Wait up to ``wait`` s for the tracking writes still queued, then stop the sender; what is left unsent."""
    outbox = outbox_of(name)
    if outbox is None:
        return Backlog(0, 0)
    behind = outbox.backlog()
    if behind and outbox.down_since is not None:
        log(f"waiting up to {wait:.0f} s for the tracking store ({behind.describe()} to send)")
    outbox.drain(wait)
    return outbox.close()


def _open_tracking(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None) -> tuple[MlflowClient, SweepRecord]:
    """The sweep's MLflow experiment and parent run: made now (and recorded beside the sweep at once), or reattached."""
    tracking_uri = record.tracking_uri if record else resolve_tracking_uri(opts.tracking_uri)
    client = open_store(tracking_uri)  # made here when new, safely beside other kd-tune processes doing the same
    experiment_id = get_or_create_experiment(client, spec.name)  # by the driver, before any trial: no sqlite race
    space_yaml = space_to_yaml(spec)
    if record is None:
        storage.write_text(space_yaml, spec.name, SPACE_FILE)
        parent = create_parent_run(client, experiment_id, spec.name, storage.show(spec.name))
        record = SweepRecord(spec.name, tracking_uri, experiment_id, parent)
        record.save(storage)  # at once: a kill from here on reattaches this parent run instead of making another
    else:
        client.update_run(record.parent_run_id, status="RUNNING")  # reattached, not duplicated
    complete_parent_run(client, record.parent_run_id, spec, space_yaml, SPACE_FILE)
    return client, record


def _get_teachers(spec: SweepSpec, split: DataSplit, labels: dict[float, torch.Tensor], storage: Storage, client: MlflowClient,
                  record: SweepRecord, quiet: bool, log: Log, *, inputs: dict[float, list[DataInput]], example: np.ndarray,
                  data_dir: Path | None, in_driver: bool) -> _Teachers:
    """Each teacher of the sweep (the ``teacher`` section, or each ``grid.teacher`` entry; one, or an ensemble) per
    label-noise level, recorded under the parent run (by the returned ``record``): it learns from the labels the
    students see, unless teacher.clean asks for the clean labels (then one serves every level); a pre-trained teacher
    (``teacher.from``) serves every level.

    ``inputs``: the students' datasets per label-noise level (:func:`~kd_tune.tracking.datasets.dataset_inputs`,
    computed once by the caller); a clean teacher's labels, when no student sees them, are fingerprinted here.
    ``example``: the logged models' input example (:func:`~kd_tune.tracking.logged_models.input_example`).
    ``in_driver``: this machine is the Ray cluster's one node (:func:`~kd_tune.sweep.cluster.connect.driver_is_the_only_node`):
    CPU teachers train here (:func:`get_teachers`)."""
    node_cpus = teacher_cpus(spec.resources, log)
    inputs = dict(inputs)
    # each teacher (or ensemble): its name, its spec with the noise level it saw, its members, that level
    learned: list[tuple[str, SweepSpec, list[Teacher], float]] = []
    train: dict[TeacherKey, torch.Tensor] = {}
    test: dict[TeacherKey, torch.Tensor] = {}
    accs: dict[TeacherKey, float] = {}
    fetched: dict[str, Path] = {}
    nets: dict[TeacherKey, list[TeacherNet]] = {}
    online = any(s.online for s in spec.students().values())

    def local_file(source: str) -> Path:
        """A pre-trained teacher's file: the path itself, or an MLflow model URI's download (once)."""
        if not is_model_uri(source):
            return Path(source)
        if source not in fetched:
            fetched[source] = fetch(source, record.tracking_uri)
        return fetched[source]

    for name, teacher in spec.teachers().items():
        for noise in spec.noise_levels():
            seen = 0.0 if teacher.clean or teacher.source is not None else noise
            if (name, seen) not in accs:
                tspec = replace(spec, dataset=replace(spec.dataset, label_noise=seen), teacher=teacher)
                tsplit = replace(split, train_y=labels.get(seen, split.train_y))
                members = get_teachers(tspec, tsplit, storage, node_cpus, log, not quiet, local_file, in_driver)
                if seen not in inputs:
                    inputs |= dataset_inputs(split, {seen: tsplit.train_y}, data_dir)
                learned.append((name, tspec, members, seen))
                train[name, seen], test[name, seen], accs[name, seen] = ensemble_logits(members, split.test_y,
                                                                                        teacher.weights() if teacher.ensemble_weights else ())
                log_teacher_summary(members, accs[name, seen], log)
                if online:
                    nets[name, seen] = [_net(t, local_file) for t in members]
            train[name, noise], test[name, noise], accs[name, noise] = train[name, seen], test[name, seen], accs[name, seen]
            if online:
                nets[name, noise] = nets[name, seen]
    first = (next(iter(spec.teachers())), spec.noise_levels()[0])
    parent_metrics = {"teacher_test_acc": accs[first]} | {
        "_".join(["teacher_test_acc", *([name] if name else []), *([f"noise_{n:g}"] if len(spec.noise_levels()) > 1 else [])]): a
        for (name, n), a in accs.items() if len(accs) > 1}

    def record_teachers() -> None:
        models = [m for name, tspec, members, seen in learned
                  for m in log_teacher_runs(client, record.experiment_id, record.parent_run_id, tspec, members, inputs[seen], example, name=name)]
        # The parent run shows every dataset of the sweep (the teachers' and the students') and its teachers.
        log_sweep_inputs(client, record.parent_run_id, [d for level in inputs.values() for d in level], models)
        # Once: a resumed sweep's teachers are the same ones (a second value at step 0 would be a duplicate step).
        have = client.get_run(record.parent_run_id).data.metrics
        if missing := {k: v for k, v in parent_metrics.items() if k not in have}:
            log_metrics(client, record.parent_run_id, missing, step=0)

    return _Teachers(train, test, nets, accs[first], record_teachers)


def _net(teacher: Teacher, local_file: Callable[[str], Path]) -> TeacherNet:
    """What a trial rebuilds a live teacher from: its weights, or a pre-trained teacher's file."""
    if teacher.source is None:
        return TeacherNet(teacher.model_args, teacher.state_dict)
    path = local_file(teacher.source)
    return TeacherNet(teacher.model_args, {}, portable_bytes(path), path.suffix)


def _make_tuner(spec: SweepSpec, storage: Storage, bundle: TrialBundle, record: SweepRecord, restoring: bool, quiet: bool, *,
                inputs: dict[float, list[DataInput]], example: np.ndarray) -> tune.Tuner:
    """A new Tuner over the trials, or the sweep's own restored (its run config brings back the MLflow callback).

    The callback gets the runs' datasets (``inputs``) and an example model input: plain data, pickled
    with it, so a restored sweep logs them as the first driver did."""
    path, fs = sweep_path(storage, spec.name), storage.ray_filesystem
    trainable = tune.with_resources(tune.with_parameters(kd_trainable, bundle=bundle), {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if restoring:
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    save_tracking_inputs(storage, spec.name, inputs, example)  # what kd-tune sync needs to make a run
    tracking = MlflowTrackingCallback(tracking_uri=record.tracking_uri, experiment_id=record.experiment_id,
                                      parent_run_id=record.parent_run_id, sweep=spec.name, static_params=run_params(spec),
                                      inputs=inputs, example=example)
    names: dict[str, Any] = {"trial_name_creator": trial_name, "trial_dirname_creator": trial_dirname, "reuse_actors": True}
    is_population = spec.scheduler is not None and spec.scheduler.population
    if is_population:  # the baselines and a population whose alpha and T Ray's PBT / PB2 change (kd_tune.sweep.population)
        param_space, tune_config = population.param_space(spec), population.tune_config(spec, **names)
    elif spec.is_search:  # the baselines, then num_samples students sampled by Ray Tune (kd_tune.sweep.search)
        param_space, tune_config = search.param_space(spec), search.tune_config(spec, **names)
    else:
        configs = spec.tune_configs()  # {"point": ...} each, or with resources.pack > 1 {"pack": [...]} each
        key = PACK if spec.packed else POINT
        param_space, tune_config = {key: tune.grid_search([c[key] for c in configs])}, tune.TuneConfig(**names)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=storage.root,
            storage_filesystem=fs,
            # Tune's result files (its analysis and our results table read them), but not its TensorBoard
            # files: MLflow is the tracking here, and a TensorBoard writer per trial costs the driver CPU
            # that the trials need (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS in kd_tune.process.SWEEP_ENVIRONMENT).
            callbacks=[tracking, CSVLoggerCallback(), JsonLoggerCallback()],
            # A population keeps every checkpoint: a member exploits another's at its last perturbation, which the
            # donor may have trained past by then (Ray warns of num_to_keep <= 2 with PBT for that reason).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if is_population else 2),
            # A crashed trial, or one whose node died, restarts from its last checkpoint on any live node.
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0 if quiet else 1,
            progress_reporter=progress_reporter(),
        ),
    )


PROGRESS_STYLES = ("line", "table")
"""How a sweep shows its progress while the trials run (:func:`progress_style`): ``"line"``, one compact line
(:class:`ProgressLine`); ``"table"``, Ray Tune's classic table (what ``kd-tune sweep`` prints); ``None``, nothing."""
LINE_EVERY_S = 20.0
"""Seconds between two progress lines (the last one, when the trials end, comes whatever the time)."""


_PROGRESS: ContextVar[tuple[str | None, str]] = ContextVar("kd_tune_progress", default=("table", ""))
"""(style, sweep name) of the sweep this driver runs now (:func:`progress_style`)."""


@contextmanager
def progress_style(style: str | None, name: str = "") -> Iterator[None]:
    """The progress a sweep run in the block shows (:data:`PROGRESS_STYLES`; the sweep's ``name`` starts the line).
    Outside any such block: the table, as ``kd-tune sweep`` has always shown it.

    Why a setting read while the sweep runs rather than the reporter's own: Ray Tune pickles the reporter with the
    sweep's run config and a resumed sweep gets that one back, so a sweep shows what its current driver asks for."""
    if style is not None and style not in PROGRESS_STYLES:
        raise FlagError("progress", style, "'line', 'table' or None")
    token = _PROGRESS.set((style, name))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _table_reporter() -> tune.CLIReporter:
    """Ray's classic table, every 30 s: trials done / running / pending, with their grid point and epoch (the classic
    output engine: ``RAY_AIR_NEW_OUTPUT=0`` in :data:`kd_tune.process.SWEEP_ENVIRONMENT`)."""
    return tune.CLIReporter(
        parameter_columns=PARAM_COLUMNS,
        metric_columns={"epoch": "epoch", "test_acc": "test acc", "train_loss": "train loss"},
        max_report_frequency=30,
        max_progress_rows=40,
    )


@dataclass(frozen=True)
class GridProgress:
    """Where a sweep's trials stand, counted in grid points (a trial serves one per epochs value it reports, a pack
    one per member and epochs value) and in student epochs (what the time left is estimated from)."""

    done: int
    running: int
    pending: int
    errored: int
    epochs_done: int
    epochs_total: int

    @property
    def total(self) -> int:
        return self.done + self.running + self.pending

    @classmethod
    def of(cls, trials: Sequence[Any], total_samples: int | None = None) -> GridProgress:
        """From Ray Tune's trials (each one's ``status``, ``config`` and ``last_result``); a search's trials not suggested
        yet (``total_samples`` counts them) are pending, one grid point each, as long as the trials seen so far on average."""
        done = running = pending = errored = epochs_done = epochs_total = 0
        for trial in trials:
            decoded = TrialConfig.decode(trial.config)
            points = sum(len(p.milestones) for p in decoded.points)
            epochs = decoded.epochs
            epochs_total += epochs
            if trial.status == "TERMINATED":
                done, epochs_done = done + points, epochs_done + epochs
            elif trial.status == "ERROR":
                done, errored, epochs_done = done + points, errored + points, epochs_done + epochs
            elif trial.status in ("RUNNING", "PAUSED"):
                epoch = TrialReport.decode(trial.last_result or {}).epoch
                reached = sum(1 for p in decoded.points for m in p.milestones if m <= epoch)
                done, running, epochs_done = done + reached, running + points - reached, epochs_done + min(epoch, epochs)
            else:
                pending += points
        unsuggested = max(0, (total_samples or 0) - len(trials))
        if unsuggested:
            pending += unsuggested
            epochs_total += unsuggested * (round(epochs_total / len(trials)) if trials else 1)
        return cls(done, running, pending, errored, epochs_done, epochs_total)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s} s"


class ProgressLine:
    """One line per report: grid points done / running / pending (and errored), the time since the trials started and
    the time left, estimated from the student epochs trained so far in this run. In a Jupyter notebook the line is one
    output, updated in place; elsewhere each report prints a line, at most one per ``every_s`` seconds."""

    def __init__(self, every_s: float = LINE_EVERY_S) -> None:
        self.every_s = every_s
        self.setup(time.time())

    def setup(self, start_time: float | None, total_samples: int | None = None) -> None:
        self._start = time.time() if start_time is None else start_time
        self._total_samples = total_samples
        self._last = -float("inf")
        self._epochs_at_start: int | None = None
        self._handle: Any = None

    def should_report(self, done: bool, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if done or now - self._last >= self.every_s:
            self._last = now
            return True
        return False

    def text(self, trials: Sequence[Any], name: str = "", now: float | None = None) -> str:
        now = time.time() if now is None else now
        p = GridProgress.of(trials, self._total_samples)
        if self._epochs_at_start is None:
            self._epochs_at_start = p.epochs_done  # a resumed sweep's epochs trained before do not count in its pace
        elapsed = max(now - self._start, 0.0)
        trained = p.epochs_done - self._epochs_at_start
        left = p.epochs_total - p.epochs_done
        eta = "done" if left <= 0 else f"about {_duration(left * elapsed / trained)} left" if trained > 0 and elapsed > 0 else "time left: not known yet"
        errored = f", {p.errored} errored" if p.errored else ""
        who = f"sweep {name!r}: " if name else ""
        return (f"{who}{p.done}/{p.total} grid points done, {p.running} running, {p.pending} pending{errored}; "
                f"{_duration(elapsed)} elapsed, {eta}")

    def show(self, text: str) -> None:
        if self._handle is None and _in_notebook():
            from IPython.display import Pretty, display

            self._handle = display(Pretty(text), display_id=True)
        elif self._handle is not None:
            from IPython.display import Pretty

            self._handle.update(Pretty(text))
        else:
            print(text, flush=True)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}  # a notebook's display is this driver's alone


def _in_notebook() -> bool:
    """A Jupyter kernel runs this driver (what Ray Tune itself asks before showing its notebook reporter)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


class SweepProgress(tune.ProgressReporter):
    """The sweep's progress reporter: the style the current driver asks for (:func:`progress_style`): one compact line
    (:class:`ProgressLine`) or Ray's classic table (every 30 s), or nothing."""

    def __init__(self, line_every_s: float = LINE_EVERY_S) -> None:
        self.table = _table_reporter()
        self.line = ProgressLine(line_every_s)

    def setup(self, start_time: float | None = None, total_samples: int | None = None, metric: str | None = None,
              mode: str | None = None, **kwargs: Any) -> None:
        self.table.setup(start_time=start_time, total_samples=total_samples, metric=metric, mode=mode, **kwargs)
        self.line.setup(start_time, total_samples)

    def should_report(self, trials: list[Any], done: bool = False) -> bool:
        style, _ = _PROGRESS.get()
        if style == "table":
            return bool(self.table.should_report(trials, done))
        return style == "line" and self.line.should_report(done)

    def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
        style, name = _PROGRESS.get()
        if style == "table":
            self.table.report(trials, done, *sys_info)
        elif style == "line":
            self.line.show(self.line.text(trials, name))


def progress_reporter() -> tune.ProgressReporter:
    """The sweep's progress reporter (:class:`SweepProgress`: the style :func:`progress_style` sets, the table by default)."""
    return SweepProgress()
