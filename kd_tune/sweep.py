"""A sweep: validate, load data, get the teacher, fan the grid out with Ray Tune, track in MLflow.

Order matters: everything the user can get wrong is checked before Ray starts or a file is
written; the MLflow store and experiment are created by the driver before any trial runs (a fresh
sqlite store raced on first concurrent use); the teacher's logits are put in Ray's object store
once, and every trial reads them from there.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from kd_tune.config import NAME_ALLOWED, ResourcesSpec, SweepSpec, TrialPoint, is_valid_name, load_space, load_space_text, space_to_yaml
from kd_tune.data import DataSplit, flip_labels, prepare
from kd_tune.errors import KdTuneError, UsageError, first_line
from kd_tune.storage import STORAGE_ENV, Storage, check_shared, check_writable, resolve_storage
from kd_tune.teacher import Teacher, TeacherCache, teacher_key, train_teacher
from kd_tune.tracking import (
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP,
    MlflowTrackingCallback,
    close_running_runs,
    find_run,
    get_or_create_experiment,
    log_metrics,
    params_batch,
)
from kd_tune.trainable import TrialBundle, kd_trainable, trial_device, trial_dirname

SPACE_FILE = "kd_tune_space.yaml"  # the validated spec, kept beside Ray's experiment state
SWEEP_FILE = "kd_tune_sweep.json"  # where the sweep is tracked (MLflow URI, experiment, parent run)
DRIVER_FILE = "kd_tune_driver.json"  # pid and host of the driver while a sweep runs
RESULT_COLUMNS = ["role", "alpha", "temperature", "epochs", "seed", "label_noise", "status", "how", "test_acc", "test_loss", "teacher_agreement"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SweepOptions:
    """Command-line settings of a sweep; each field's help is the flag's ``--help``."""

    name: str | None = field(default=None, metadata=_help("sweep name (default: the search space's 'name')"))
    storage: str | None = field(default=None, metadata=_help(
        f"where sweeps and the teacher cache live: a folder (NFS on a cluster) or a URI such as s3://bucket/prefix "
        f"(default: ${STORAGE_ENV} or ./kd_tune_results)"))
    data_dir: str | None = field(default=None, metadata=_help("dataset folder, torchvision layout (default: $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)"))
    address: str | None = field(default=None, metadata=_help("Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS, else a local Ray started for this sweep)"))
    tracking_uri: str | None = field(default=None, metadata=_help("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db here)"))
    cpus_per_trial: float | None = field(default=None, metadata=_help("CPUs per trial, overrides resources.cpu"))
    gpus_per_trial: float | None = field(default=None, metadata=_help("GPUs per trial, may be a fraction, overrides resources.gpu"))
    max_failures: int | None = field(default=None, metadata=_help("retries of a crashed trial from its checkpoint, overrides max_failures"))
    quiet: bool = field(default=False, metadata=_help("print only the final table"))
    resume: bool = field(default=False, metadata=_help("continue the sweep if one of this name exists (same as kd-tune resume)"))
    no_share_epochs: bool = field(default=False, metadata=_help("one trial per epochs value instead of one trial reporting each (share_epochs: false)"))


@dataclass(frozen=True)
class ResumeOptions:
    """The settings a resume may give (the sweep's name, space, MLflow store and retries are fixed)."""

    storage: str | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["storage"].metadata)
    data_dir: str | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["data_dir"].metadata)
    address: str | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["address"].metadata)
    tracking_uri: str | None = field(default=None, metadata=_help("must be the sweep's own store if given (it is read from the sweep)"))
    cpus_per_trial: float | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["cpus_per_trial"].metadata)
    gpus_per_trial: float | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["gpus_per_trial"].metadata)
    quiet: bool = field(default=False, metadata=SweepOptions.__dataclass_fields__["quiet"].metadata)


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    path: str
    """The sweep's folder (a local path, or scheme://bucket/prefix/name)."""
    table: pd.DataFrame
    total: int
    finished: int
    errored: int
    diverged: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teacher_acc: float
    wall_seconds: float
    resume_command: str

    @property
    def ok(self) -> bool:
        return self.finished == self.total


# --- the pieces -------------------------------------------------------------------------------


def sweep_path(storage: Storage, name: str) -> str:
    """The sweep's folder in the storage's filesystem; a name is never a path out of the storage folder."""
    if not is_valid_name(name):
        raise UsageError(f"sweep name {name!r} is not allowed; allowed: {NAME_ALLOWED}")
    path = storage.path(name)
    if storage.is_local and Path(path).resolve().parent != Path(storage.root):
        raise UsageError(f"sweep name {name!r} leaves the storage folder {storage.root}; allowed: {NAME_ALLOWED}")
    return path


def can_restore(storage: Storage, name: str) -> bool:
    """Ray has saved this sweep's experiment state (it can be restored)."""
    return bool(tune.Tuner.can_restore(sweep_path(storage, name), storage_filesystem=storage.ray_filesystem))


def resolve_tracking_uri(uri: str | None) -> str:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    return str(mlflow.get_tracking_uri())


def apply_overrides(spec: SweepSpec, opts: SweepOptions) -> SweepSpec:
    res = spec.resources
    if opts.cpus_per_trial is not None:
        if not opts.cpus_per_trial > 0:
            raise UsageError(f"--cpus-per-trial {opts.cpus_per_trial}: allowed: a number > 0")
        res = replace(res, cpu=float(opts.cpus_per_trial))
    if opts.gpus_per_trial is not None:
        if not opts.gpus_per_trial >= 0:
            raise UsageError(f"--gpus-per-trial {opts.gpus_per_trial}: allowed: a number >= 0 (fractions share a GPU)")
        res = replace(res, gpu=float(opts.gpus_per_trial))
    max_failures = spec.max_failures
    if opts.max_failures is not None:
        if opts.max_failures < 0:
            raise UsageError(f"--max-failures {opts.max_failures}: allowed: an integer >= 0")
        max_failures = opts.max_failures
    name = spec.name
    if opts.name is not None:
        if not is_valid_name(opts.name):
            raise UsageError(f"--name {opts.name!r}: allowed: {NAME_ALLOWED}")
        name = opts.name
    share = spec.share_epochs and not opts.no_share_epochs
    return replace(spec, name=name, resources=res, max_failures=max_failures, share_epochs=share)


ADDRESS_ALLOWED = "allowed: 'auto' on a node of a running cluster (ray up / ray start), or the head's HOST:PORT (GCS port, 6379 by default)"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at (ray.init would retry for minutes)."""
    if address.startswith("ray://"):
        return  # Ray Client: its own connection error is quick and clear
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)  # "auto": $RAY_ADDRESS or the cluster started on this machine
    except (ConnectionError, ValueError) as e:
        raise UsageError(f"--address {address!r}: {first_line(e)}; {ADDRESS_ALLOWED}") from None
    if resolved is None:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise UsageError(f"--address {address!r}: nothing answers at {resolved}; {ADDRESS_ALLOWED}") from None


def connect_ray(address: str | None) -> bool:
    """Join the given cluster, else start an embedded one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "configure_logging": True}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)  # type: ignore[arg-type]
        except ConnectionError as e:
            raise UsageError(f"--address {address!r}: no Ray cluster answers there ({first_line(e)}); {ADDRESS_ALLOWED}") from None
    else:
        # "local" always starts a fresh embedded Ray, whatever a stale /tmp/ray says.
        ray.init(address="local", include_dashboard=False, **quiet)  # type: ignore[arg-type]
    return True


def check_local_fits(res: ResourcesSpec) -> None:
    """Refuse per-trial resources this machine can never grant (Tune would wait forever)."""
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if res.cpu > cpus:
        raise UsageError(f"resources.cpu = {res.cpu:g} per trial, but this machine has {cpus} CPUs; allowed: at most {cpus}")
    if res.gpu > gpus:
        raise UsageError(f"resources.gpu = {res.gpu:g} per trial, but this machine has {gpus} GPUs; allowed: at most {gpus}")


def teacher_cpus(res: ResourcesSpec, log: Callable[[str], None]) -> int:
    """CPUs for the teacher task: a whole node of the kind that runs the trials (the biggest GPU node
    when trials use GPUs, else the biggest node). Warns when no live node fits a trial yet."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0.0) >= res.cpu and r.get("GPU", 0.0) >= res.gpu for r in nodes):
        log(f"warning: no Ray node has {res.cpu:g} CPUs and {res.gpu:g} GPUs yet; trials wait until the autoscaler adds one")
    if res.gpu > 0:
        nodes = [r for r in nodes if r.get("GPU", 0.0) >= 1]
        if not nodes:  # GPU workers not up yet: ask for what one trial needs, the autoscaler can grant that
            return max(1, int(res.cpu))
    return max(1, int(max((r.get("CPU", 0.0) for r in nodes), default=1.0)))


@ray.remote
def _teacher_task(split: DataSplit, spec: SweepSpec, key: str, verbose: bool) -> Teacher:
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))))
    return train_teacher(split, spec.teacher, key, trial_device(), log=(lambda s: print(s, flush=True)) if verbose else (lambda s: None))


def get_teachers(spec: SweepSpec, split: DataSplit, storage: Storage, node_cpus: int, log: Callable[[str], None],
                 verbose: bool = True) -> list[Teacher]:
    """Every member of the teacher (one, or an ensemble): from the cache, or trained now as a Ray task
    on a whole node (teachers train before any trial starts)."""
    cache = TeacherCache(storage)
    teachers = []
    for member in spec.teacher.members():
        key = teacher_key(spec.dataset, member, split)
        teacher = cache.load(key, log)
        if teacher is not None:
            log(f"teacher {key}: from the cache ({cache.path(key)}), test acc {teacher.test_acc:.4f}")
        else:
            w = member.widths
            log(f"teacher {key}: training {w[0]}/{w[1]} (seed {member.seed}) for {member.epochs} epochs on {len(split.train_y)} images")
            gpus = 1 if spec.resources.gpu > 0 else 0
            teacher = ray.get(_teacher_task.options(num_cpus=node_cpus, num_gpus=gpus).remote(split, replace(spec, teacher=member), key, verbose))
            cache.save(teacher, {"dataset": asdict(spec.dataset), "teacher": asdict(member)})
            log(f"teacher {key}: test acc {teacher.test_acc:.4f}, cached in {cache.path(key)}")
        teachers.append(teacher)
    return teachers


def ensemble_logits(teachers: list[Teacher], test_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train and test logits averaged over the members, and the test accuracy of that average."""
    train = torch.stack([t.train_logits for t in teachers]).mean(dim=0)
    test = torch.stack([t.test_logits for t in teachers]).mean(dim=0)
    return train, test, (test.argmax(dim=1) == test_y).float().mean().item()


def log_teacher_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, spec: SweepSpec, teachers: list[Teacher]) -> None:
    """Each teacher's own run under the sweep's parent (once per sweep, also when it came from the cache)."""
    noise = spec.dataset.label_noise
    for i, (member, teacher) in enumerate(zip(spec.teacher.members(), teachers, strict=True)):
        tags = {TAG_SWEEP: spec.name, TAG_ROLE: "teacher", "kd_tune.member": str(i), "kd_tune.label_noise": f"{noise:g}"}
        found = find_run(client, experiment_id, tags)
        if found is not None:
            if client.get_run(found).info.status == "FINISHED":
                continue
            client.delete_run(found)  # cut short by a kill while being written: write it again, whole
        
        name = "teacher" if len(teachers) == 1 else f"teacher-{i}"
        run = client.create_run(experiment_id, run_name=name + (f"-n{noise:g}" if noise else ""),
                                tags={**tags, TAG_PARENT: parent_run_id, "kd_tune.teacher_key": teacher.key, "kd_tune.cached": str(teacher.cached).lower()})
        run_id = run.info.run_id
        params = {f"teacher.{k}": v for k, v in asdict(member).items()} | {f"dataset.{k}": v for k, v in asdict(spec.dataset).items()}
        client.log_batch(run_id, params=params_batch(params))
        for m in teacher.history:
            log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "teacher.pt"
            torch.save(teacher.state_dict, path)
            client.log_artifact(run_id, str(path), artifact_path="model")
        client.set_terminated(run_id, "FINISHED")


def progress_reporter() -> tune.ProgressReporter:
    """Ray's classic table, every 30 s: trials done / running / pending, with their grid point and epoch."""
    # The newer output engine shows the whole grid point as one truncated dict; the classic one can
    # name the columns. RAY_AIR_NEW_OUTPUT=1 in the environment still selects the newer one.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A checkpoint per epoch of short epochs is by design here, not the misuse Tune warns about.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return tune.CLIReporter(
        parameter_columns={"point/role": "role", "point/alpha": "alpha", "point/temperature": "T", "point/epochs": "epochs", "point/seed": "seed"},
        metric_columns={"epoch": "epoch", "test_acc": "test acc", "train_loss": "train loss"},
        max_report_frequency=30,
        max_progress_rows=40,
    )


def trial_name(trial: Any) -> str:
    return TrialPoint.from_config(trial.config).label


def results_table(result_grid: tune.ResultGrid, finished_before: set[str] | None = None) -> pd.DataFrame:
    """One row per grid point: its values, status, metrics at its epochs and how this run got them.

    A trial shared by several epochs values gives a row for each, with the metrics it reported
    when it passed that epoch. ``how`` is ``new`` for a first run; on a resume ``restored``
    (finished before, not rerun), ``resumed`` (continued from a checkpoint) or ``restarted``.
    """
    finished_before = finished_before or set()
    rows = []
    for i in range(len(result_grid)):
        r = result_grid[i]
        if not r.config:
            continue
        point = TrialPoint.from_config(r.config)
        last = r.metrics or {}
        history = r.metrics_dataframe
        trial_id = str(last.get("trial_id", ""))
        if trial_id in finished_before:
            how = "restored"
        elif not finished_before:
            how = "resumed" if last.get("resumed_from") else "new"
        else:
            how = "resumed" if last.get("resumed_from") else "restarted"
        for milestone in point.milestones:
            at: dict[str, Any] = {}
            if history is not None and "epoch" in history and "test_acc" in history:
                match = history[(history["epoch"] == milestone) & history["test_acc"].notna()]
                if len(match):
                    at = match.iloc[-1].to_dict()
            status = "finished" if at else "errored" if r.error else "diverged" if last.get("diverged") else "unfinished"
            rows.append({
                **point.at(milestone).grid_config(), "status": status, "how": how,
                "test_acc": at.get("test_acc"), "test_loss": at.get("test_loss"), "teacher_agreement": at.get("teacher_agreement"),
            })
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return df.sort_values(["role", "label_noise", "temperature", "alpha", "epochs", "seed"], na_position="first", kind="stable").reset_index(drop=True)


# --- the sweep --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRecord:
    """Where a sweep is tracked, kept beside it (``kd_tune_sweep.json``) so a resume reattaches."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def save(self, storage: Storage) -> None:
        storage.write_text(json.dumps(asdict(self), indent=2), self.name, SWEEP_FILE)

    @classmethod
    def load(cls, storage: Storage, name: str) -> SweepRecord:
        return cls(**json.loads(storage.read_text(name, SWEEP_FILE)))

    @staticmethod
    def exists(storage: Storage, name: str) -> bool:
        return storage.exists(name, SWEEP_FILE)


def known_sweeps(storage: Storage) -> list[str]:
    """Names of the kd-tune sweeps in a storage folder (a record and Ray's state beside it)."""
    return [n for n in storage.list_dirs() if is_valid_name(n) and SweepRecord.exists(storage, n) and can_restore(storage, n)]


def resume_command(name: str, storage: Storage) -> str:
    default = resolve_storage(None)
    return f"kd-tune resume {name}" + ("" if storage.given == default.given else f" --storage {shlex.quote(storage.given)}")


class SweepExistsError(UsageError):
    pass


def run_sweep(space: str | Path, opts: SweepOptions = SweepOptions(), log: Callable[[str], None] = print) -> SweepOutcome:
    """Start a new sweep from a search-space file (or, with ``opts.resume``, continue one of that name)."""
    spec = apply_overrides(load_space(space), opts)
    storage = resolve_storage(opts.storage)
    sweep_path(storage, spec.name)
    if can_restore(storage, spec.name):
        if opts.resume:
            return resume_sweep(spec.name, replace(opts, name=None), log)
        raise SweepExistsError(f"a sweep named {spec.name!r} already exists in {storage.show()}; "
                               f"to continue it: {resume_command(spec.name, storage)} (or add --resume; or choose another --name)")
    # Killed before Ray saved any state: start over, but keep the MLflow parent run made then.
    record = SweepRecord.load(storage, spec.name) if SweepRecord.exists(storage, spec.name) else None
    return _execute(spec, storage, opts, record, log)


def resume_sweep(name: str, opts: SweepOptions = SweepOptions(), log: Callable[[str], None] = print) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials stay, the others go on from their checkpoints."""
    storage = resolve_storage(opts.storage)
    sweep_path(storage, name)
    if not can_restore(storage, name) or not SweepRecord.exists(storage, name):
        raise UsageError(f"no sweep named {name!r} in {storage.show()}; allowed: "
                         f"{', '.join(known_sweeps(storage)) or 'none there yet (start one with kd-tune sweep)'}")
    record = SweepRecord.load(storage, name)
    if opts.tracking_uri and resolve_tracking_uri(opts.tracking_uri) != record.tracking_uri:
        raise UsageError(f"--tracking-uri {opts.tracking_uri!r}: sweep {name!r} is tracked in {record.tracking_uri}; allowed: that URI or none")
    spec = apply_overrides(load_space_text(storage.read_text(name, SPACE_FILE), storage.show(name, SPACE_FILE)),
                           replace(opts, name=None, max_failures=None))
    return _execute(spec, storage, opts, record, log)


def _execute(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None,
             log: Callable[[str], None]) -> SweepOutcome:
    started = time.perf_counter()
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if not address:
        check_local_fits(spec.resources)
    driver = _live_driver(storage, spec.name)
    if driver:
        where = storage.show(spec.name, DRIVER_FILE)
        gone = "" if driver["host"] == socket.gethostname() else f"; if that machine is gone, delete {where} and run this again"
        raise UsageError(f"sweep {spec.name!r} is running now (driver pid {driver['pid']} on {driver['host']}, see {where}){gone}; "
                         "allowed: one driver per sweep")
    check_writable(storage)
    started_ray = connect_ray(address)
    try:
        if address:
            # Every node must reach the storage; on a cluster find that out now, not at the first checkpoint.
            check_shared(storage, log)
        return _run(spec, storage, opts, record, log, started)
    finally:
        if started_ray:
            ray.shutdown()


def _run(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None,
         log: Callable[[str], None], started: float) -> SweepOutcome:
    name, path, fs = spec.name, sweep_path(storage, spec.name), storage.ray_filesystem
    # With a tracking server MLflow prints two "View run at" lines per run it ends: hundreds in a sweep.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    split = prepare(spec.dataset.name, spec.dataset.train_size, 0.0, spec.dataset.seed, Path(opts.data_dir) if opts.data_dir else None, log)
    # The same fixed flips as prepare() would make, once per noise level of the sweep.
    labels = {n: flip_labels(split.train_y, n, spec.dataset.seed, split.info.num_classes) for n in spec.noise_levels()}
    tracking_uri = record.tracking_uri if record else resolve_tracking_uri(opts.tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, name)  # by the driver, before any trial: no sqlite race
    finished_before: set[str] = set()
    if record is None:
        storage.write_text(space_to_yaml(spec), name, SPACE_FILE)
        parent = client.create_run(experiment_id, run_name=name, tags={TAG_SWEEP: name, TAG_ROLE: "sweep", "kd_tune.path": storage.show(name)})
        record = SweepRecord(name, tracking_uri, experiment_id, parent.info.run_id)
        record.save(storage)  # at once: a kill from here on reattaches this parent run instead of making another
    else:
        client.update_run(record.parent_run_id, status="RUNNING")  # reattached, not duplicated
    if not client.get_run(record.parent_run_id).data.params:  # new, or cut short before its params were written
        client.log_batch(record.parent_run_id, params=params_batch(spec.flat_params()))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / SPACE_FILE).write_text(space_to_yaml(spec))
            client.log_artifact(record.parent_run_id, str(Path(tmp) / SPACE_FILE))
    restoring = can_restore(storage, name)
    if restoring:
        finished_before = {t.trial_id for t in tune.ExperimentAnalysis(path, storage_filesystem=fs).trials if t.status == "TERMINATED"}

    storage.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), name, DRIVER_FILE)
    try:
        node_cpus = teacher_cpus(spec.resources, log)
        # One teacher (or ensemble) per label-noise level: it learns from the labels the students see,
        # unless teacher.clean asks for the clean labels (then one teacher serves every level).
        teacher_train, teacher_test, teacher_accs = {}, {}, {}
        for noise in spec.noise_levels():
            seen = 0.0 if spec.teacher.clean else noise
            if seen not in teacher_accs:
                tspec = replace(spec, dataset=replace(spec.dataset, label_noise=seen))
                teachers = get_teachers(tspec, replace(split, train_y=labels.get(seen, split.train_y)), storage, node_cpus, log, not opts.quiet)
                log_teacher_runs(client, record.experiment_id, record.parent_run_id, tspec, teachers)
                teacher_train[seen], teacher_test[seen], teacher_accs[seen] = ensemble_logits(teachers, split.test_y)
                if len(teachers) > 1:
                    log(f"ensemble of {len(teachers)} teachers: test acc {teacher_accs[seen]:.4f} "
                        f"(members: {', '.join(f'{t.test_acc:.4f}' for t in teachers)})")
            teacher_train[noise], teacher_test[noise], teacher_accs[noise] = teacher_train[seen], teacher_test[seen], teacher_accs[seen]
        teacher_acc = teacher_accs[spec.noise_levels()[0]]
        log_metrics(client, record.parent_run_id, {"teacher_test_acc": teacher_acc}
                    | {f"teacher_test_acc_noise_{n:g}": a for n, a in teacher_accs.items() if len(teacher_accs) > 1}, step=0)

        trials, points = spec.trials(), spec.grid_points()
        verb = f"resuming ({len(finished_before)} of {len(trials)} trials finished before)" if finished_before or opts.resume else "starting"
        log(f"sweep {name!r}: {verb}; {len(trials)} trials for {len(points)} grid points ({spec.student_epochs()} student epochs), "
            f"{spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU each; results in {storage.show(name)}")
        # Object refs do not survive a restore: the bundle is put in the object store anew each run.
        bundle = TrialBundle(split, spec.student, labels, teacher_train, teacher_test, storage, name)
        trainable = tune.with_resources(tune.with_parameters(kd_trainable, bundle=bundle), {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        if restoring:
            # The restored run config brings back the MLflow callback (same store, experiment, parent run).
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
        else:
            tracking = MlflowTrackingCallback(tracking_uri, record.experiment_id, record.parent_run_id, name, spec.flat_params())
            tuner = tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search([p.as_config() for p in trials])},
                tune_config=tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage.root,
                    storage_filesystem=fs,
                    callbacks=[tracking],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    # A crashed trial, or one whose node died, restarts from its last checkpoint on any live node.
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    verbose=0 if opts.quiet else 1,
                    progress_reporter=progress_reporter(),
                ),
            )
        try:
            grid = tuner.fit()
        finally:
            # Runs of trials cut short (Ctrl+C, a crash in the driver) are not left RUNNING; a resume reopens them.
            close_running_runs(client, record.experiment_id, record.parent_run_id)
        table = results_table(grid, finished_before)
        finished = int((table["status"] == "finished").sum())
        errored = int((table["status"] == "errored").sum())
        diverged = int((table["status"] == "diverged").sum())
        client.set_terminated(record.parent_run_id, "FINISHED" if finished == len(points) else "FAILED")
        return SweepOutcome(name, storage.show(name), table, len(points), finished, errored, diverged, tracking_uri, record.experiment_id,
                            record.parent_run_id, teacher_acc, time.perf_counter() - started, resume_command(name, storage))
    except BaseException:
        client.set_terminated(record.parent_run_id, "KILLED")
        raise
    finally:
        storage.delete(name, DRIVER_FILE)


@dataclass(frozen=True)
class SweepStatus:
    name: str
    path: str
    counts: dict[str, int]
    table: pd.DataFrame
    driver_alive: bool
    resume_command: str


def _live_driver(storage: Storage, name: str) -> dict[str, Any] | None:
    """The sweep's driver (pid, host) if one runs: this machine's is checked by pid; another
    machine's is assumed to run (its file is removed when it ends)."""
    try:
        info: dict[str, Any] = json.loads(storage.read_text(name, DRIVER_FILE))
    except (OSError, ValueError):
        return None
    if info.get("host") != socket.gethostname():
        return info
    try:
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def sweep_status(name: str, storage: str | None = None) -> SweepStatus:
    """Trials finished / running / pending / errored, read from the sweep's storage (no Ray needed)."""
    root = resolve_storage(storage)
    path = sweep_path(root, name)
    if not can_restore(root, name):
        raise UsageError(f"no sweep named {name!r} in {root.show()}; allowed: {', '.join(known_sweeps(root)) or 'none there yet'}")
    alive = _live_driver(root, name) is not None
    names = {"TERMINATED": "finished", "RUNNING": "running" if alive else "interrupted", "PENDING": "pending",
             "ERROR": "errored", "PAUSED": "paused"}
    rows = []
    for t in tune.ExperimentAnalysis(path, storage_filesystem=root.ray_filesystem).trials:
        point = TrialPoint.from_config(t.config)
        last = t.last_result or {}
        status = "diverged" if last.get("diverged") else names.get(t.status, t.status.lower())
        rows.append({"trial": point.label, "status": status,
                     "epoch": f"{int(last.get('epoch', 0))}/{point.epochs}", "test_acc": last.get("test_acc")})
    table = pd.DataFrame(rows, columns=["trial", "status", "epoch", "test_acc"]).sort_values("trial").reset_index(drop=True)
    counts = {k: int((table["status"] == k).sum()) for k in ("finished", "running", "interrupted", "pending", "paused", "errored", "diverged")}
    return SweepStatus(name, root.show(name), counts, table, alive, resume_command(name, root))


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    if shown["label_noise"].nunique() <= 1:
        shown = shown.drop(columns="label_noise")  # not an axis of this sweep
    for col in ("test_acc", "teacher_agreement"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["test_loss"] = shown["test_loss"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    return str(shown.to_string(index=False))


__all__ = ["KdTuneError", "SweepOptions", "SweepOutcome", "format_table", "run_sweep"]
