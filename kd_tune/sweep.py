"""A sweep: validate, load data, get the teacher, fan the grid out with Ray Tune, track in MLflow.

Order matters: everything the user can get wrong is checked before Ray starts or a file is
written; the MLflow store and experiment are created by the driver before any trial runs (a fresh
sqlite store raced on first concurrent use); the teacher's logits are put in Ray's object store
once, and every trial reads them from there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from kd_tune.config import NAME_ALLOWED, NAME_PATTERN, ResourcesSpec, SweepSpec, TrialPoint, load_space, space_to_yaml
from kd_tune.data import DataSplit, prepare
from kd_tune.errors import KdTuneError, UsageError
from kd_tune.teacher import CACHE_FOLDER, Teacher, TeacherCache, teacher_key, train_teacher
from kd_tune.tracking import (
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP,
    MlflowTrackingCallback,
    find_run,
    get_or_create_experiment,
    log_metrics,
    params_batch,
)
from kd_tune.trainable import TrialBundle, kd_trainable, trial_device

STORAGE_ENV = "KD_TUNE_STORAGE"
SPACE_FILE = "kd_tune_space.yaml"  # the validated spec, kept beside Ray's experiment state
RESULT_COLUMNS = ["role", "alpha", "temperature", "epochs", "seed", "status", "test_acc", "test_loss", "teacher_agreement"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SweepOptions:
    """Command-line settings of a sweep; each field's help is the flag's ``--help``."""

    name: str | None = field(default=None, metadata=_help("sweep name (default: the search space's 'name')"))
    storage: str | None = field(default=None, metadata=_help(f"folder holding sweeps and the teacher cache (default: ${STORAGE_ENV} or ./kd_tune_results)"))
    data_dir: str | None = field(default=None, metadata=_help("dataset folder, torchvision layout (default: $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)"))
    address: str | None = field(default=None, metadata=_help("Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS, else a local Ray started for this sweep)"))
    tracking_uri: str | None = field(default=None, metadata=_help("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db here)"))
    cpus_per_trial: float | None = field(default=None, metadata=_help("CPUs per trial, overrides resources.cpu"))
    gpus_per_trial: float | None = field(default=None, metadata=_help("GPUs per trial, may be a fraction, overrides resources.gpu"))
    max_failures: int | None = field(default=None, metadata=_help("retries of a crashed trial from its checkpoint, overrides max_failures"))
    quiet: bool = field(default=False, metadata=_help("print only the final table"))


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    path: Path
    table: pd.DataFrame
    total: int
    finished: int
    errored: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teacher_acc: float
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.finished == self.total


# --- the pieces -------------------------------------------------------------------------------


def resolve_storage(storage: str | None) -> Path:
    raw = storage or os.environ.get(STORAGE_ENV) or "kd_tune_results"
    if "://" in raw:
        raise UsageError(f"--storage {raw!r}: URIs are not supported yet; allowed: a local or shared (NFS) folder path")
    return Path(raw).expanduser().resolve()


def sweep_path(storage: Path, name: str) -> Path:
    """The sweep's folder; a name is never a path out of the storage folder."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UsageError(f"sweep name {name!r} is not allowed; allowed: {NAME_ALLOWED}")
    path = (storage / name).resolve()
    if path.parent != storage:
        raise UsageError(f"sweep name {name!r} leaves the storage folder {storage}; allowed: {NAME_ALLOWED}")
    return path


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
        if not NAME_PATTERN.match(opts.name) or ".." in opts.name:
            raise UsageError(f"--name {opts.name!r}: allowed: {NAME_ALLOWED}")
        name = opts.name
    return replace(spec, name=name, resources=res, max_failures=max_failures)


def connect_ray(address: str | None) -> bool:
    """Join the given cluster, else start an embedded one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "configure_logging": True}
    if address:
        ray.init(address=address, **quiet)  # type: ignore[arg-type]
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


def largest_node_cpus(res: ResourcesSpec, log: Callable[[str], None]) -> int:
    """CPUs of the biggest live node (the teacher gets a whole one); warns when no node fits a trial yet."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    max_gpu = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    if res.cpu > max_cpu or res.gpu > max_gpu:
        log(f"warning: no Ray node has {res.cpu:g} CPUs and {res.gpu:g} GPUs yet; trials wait until the autoscaler adds one")
    return max(1, int(max_cpu))


@ray.remote
def _teacher_task(split: DataSplit, spec: SweepSpec, key: str) -> Teacher:
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))))
    return train_teacher(split, spec.teacher, key, trial_device(), log=lambda s: print(s, flush=True))


def get_teacher(spec: SweepSpec, split: DataSplit, storage: Path, node_cpus: int, log: Callable[[str], None]) -> Teacher:
    """From the cache, or trained now as a Ray task on a whole node (it runs before any trial)."""
    key = teacher_key(spec.dataset, spec.teacher, split)
    cache = TeacherCache(storage / CACHE_FOLDER)
    teacher = cache.load(key, log)
    if teacher is not None:
        log(f"teacher {key}: from the cache ({cache.path(key)}), test acc {teacher.test_acc:.4f}")
        return teacher
    w = spec.teacher.widths
    log(f"teacher {key}: training {w[0]}/{w[1]} for {spec.teacher.epochs} epochs on {len(split.train_y)} images")
    gpus = 1 if spec.resources.gpu > 0 else 0
    teacher = ray.get(_teacher_task.options(num_cpus=node_cpus, num_gpus=gpus).remote(split, spec, key))
    cache.save(teacher, {"dataset": spec.dataset.__dict__, "teacher": spec.teacher.__dict__})
    log(f"teacher {key}: test acc {teacher.test_acc:.4f}, cached in {cache.path(key)}")
    return teacher


def log_teacher_run(client: MlflowClient, experiment_id: str, parent_run_id: str, spec: SweepSpec, teacher: Teacher) -> str:
    """The teacher's own run under the sweep's parent (once per sweep, also when it came from the cache)."""
    tags = {TAG_SWEEP: spec.name, TAG_ROLE: "teacher"}
    run_id = find_run(client, experiment_id, tags)
    if run_id is not None:
        return run_id
    run = client.create_run(experiment_id, tags={**tags, TAG_PARENT: parent_run_id, "kd_tune.teacher_key": teacher.key, "kd_tune.cached": str(teacher.cached).lower()}, run_name="teacher")
    run_id = run.info.run_id
    params = {f"teacher.{k}": v for k, v in spec.teacher.__dict__.items()} | {f"dataset.{k}": v for k, v in spec.dataset.__dict__.items()}
    client.log_batch(run_id, params=params_batch(params))
    for m in teacher.history:
        log_metrics(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.pt"
        torch.save(teacher.state_dict, path)
        client.log_artifact(run_id, str(path), artifact_path="model")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def progress_reporter() -> tune.ProgressReporter:
    """Ray's classic table, every 30 s: trials done / running / pending, with their grid point and epoch."""
    # The newer output engine shows the whole grid point as one truncated dict; the classic one can
    # name the columns. RAY_AIR_NEW_OUTPUT=1 in the environment still selects the newer one.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return tune.CLIReporter(
        parameter_columns={"point/role": "role", "point/alpha": "alpha", "point/temperature": "T", "point/epochs": "epochs", "point/seed": "seed"},
        metric_columns={"epoch": "epoch", "test_acc": "test acc", "train_loss": "train loss"},
        max_report_frequency=30,
        max_progress_rows=40,
    )


def trial_dirname(trial: Any) -> str:
    return f"{TrialPoint.from_config(trial.config).label}_{trial.trial_id}"


def trial_name(trial: Any) -> str:
    return TrialPoint.from_config(trial.config).label


def results_table(result_grid: tune.ResultGrid) -> pd.DataFrame:
    rows = []
    for i in range(len(result_grid)):
        r = result_grid[i]
        point = TrialPoint.from_config(r.config) if r.config else None
        if point is None:
            continue
        m = r.metrics or {}
        done = r.error is None and m.get("epoch") == point.epochs
        rows.append({
            **point.as_config(), "status": "finished" if done else ("errored" if r.error else "unfinished"),
            "test_acc": m.get("test_acc"), "test_loss": m.get("test_loss"), "teacher_agreement": m.get("teacher_agreement"),
        })
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return df.sort_values(["role", "temperature", "alpha", "epochs", "seed"], na_position="first", kind="stable").reset_index(drop=True)


# --- the sweep --------------------------------------------------------------------------------


def run_sweep(space: str | Path, opts: SweepOptions = SweepOptions(), log: Callable[[str], None] = print) -> SweepOutcome:
    started = time.perf_counter()
    spec = apply_overrides(load_space(space), opts)
    storage = resolve_storage(opts.storage)
    path = sweep_path(storage, spec.name)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if not address:
        check_local_fits(spec.resources)
    if tune.Tuner.can_restore(str(path)):
        raise UsageError(f"a sweep named {spec.name!r} already exists in {storage}; choose another --name or remove {path}")
    split = prepare(spec.dataset.name, spec.dataset.train_size, spec.dataset.label_noise, spec.dataset.seed,
                    Path(opts.data_dir) if opts.data_dir else None, log)

    tracking_uri = resolve_tracking_uri(opts.tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.name)
    started_ray = connect_ray(address)
    try:
        node_cpus = largest_node_cpus(spec.resources, log)
        path.mkdir(parents=True, exist_ok=True)
        (path / SPACE_FILE).write_text(space_to_yaml(spec))
        parent = client.create_run(experiment_id, run_name=spec.name, tags={TAG_SWEEP: spec.name, TAG_ROLE: "sweep", "kd_tune.path": str(path)})
        parent_id = parent.info.run_id
        client.log_batch(parent_id, params=params_batch(spec.flat_params()))
        client.log_artifact(parent_id, str(path / SPACE_FILE))

        teacher = get_teacher(spec, split, storage, node_cpus, log)
        log_teacher_run(client, experiment_id, parent_id, spec, teacher)
        log_metrics(client, parent_id, {"teacher_test_acc": teacher.test_acc}, step=0)

        trials = spec.trials()
        log(f"sweep {spec.name!r}: {len(trials)} trials, {spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU each; results in {path}")
        bundle = TrialBundle(split, spec.student, teacher.train_logits, teacher.test_logits)
        trainable = tune.with_resources(tune.with_parameters(kd_trainable, bundle=bundle), {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        tracking = MlflowTrackingCallback(tracking_uri, experiment_id, parent_id, spec.name, spec.flat_params())
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search([p.as_config() for p in trials])},
            tune_config=tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_dirname, reuse_actors=False),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage),
                callbacks=[tracking],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=0 if opts.quiet else 1,
                progress_reporter=progress_reporter(),
            ),
        )
        grid = tuner.fit()
        table = results_table(grid)
        finished = int((table["status"] == "finished").sum())
        errored = int((table["status"] == "errored").sum())
        client.set_terminated(parent_id, "FINISHED" if finished == len(trials) else "FAILED")
        return SweepOutcome(spec.name, path, table, len(trials), finished, errored, tracking_uri, experiment_id, parent_id,
                            teacher.test_acc, time.perf_counter() - started)
    finally:
        if started_ray:
            ray.shutdown()


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in ("test_acc", "teacher_agreement"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["test_loss"] = shown["test_loss"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    return str(shown.to_string(index=False))


__all__ = ["KdTuneError", "SweepOptions", "SweepOutcome", "format_table", "run_sweep"]
