"""The Ray Tune function trainable: a thin adapter around the training layer (:mod:`kd_tune.distill`).

It reads like Ray's function-trainable checkpointing example: restore from the newest checkpoint, then train,
reporting every epoch with ``tune.report`` and a checkpoint. The data and the teacher's logits arrive through
Ray's object store (``tune.with_parameters``), put there once by the driver: no trial loads files or runs the
teacher. A restarted trial continues from the newest complete checkpoint, which after a SIGKILLed driver can be
newer than the one Ray's experiment state remembers (:func:`~kd_tune.sweep.state.trial_state.restore_state`).

A trial trains one student (config ``{"point": ...}``) or a pack of them as one model (``{"pack": [...]}``):
see :mod:`kd_tune.space.trials` for the config's codec and :mod:`kd_tune.space.trial_report` for the reports'. Both
kinds restore, replay and report through one path (:class:`_Trial`); only the model, its step and its checkpoint
format differ.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from kd_tune.data.split import DataSplit
from kd_tune.distill.augment import Augment
from kd_tune.distill.checkpoint import save_checkpoint, save_pack_checkpoint, trial_results
from kd_tune.distill.epochs import EpochMetrics
from kd_tune.distill.metrics import Evaluation
from kd_tune.distill.models import build, model_args
from kd_tune.distill.online import TeacherNet, online_teacher
from kd_tune.distill.pack_train import Member, PackData, train_pack
from kd_tune.distill.packed import channels_last_on, member_state_dict, pack_from_state_dicts
from kd_tune.distill.train import TensorData, make_optimizer, train
from kd_tune.errors import DivergedError
from kd_tune.space.lineage import Exploit, Lineage
from kd_tune.space.schedules import Value, value_at
from kd_tune.space.sections import StudentSpec
from kd_tune.space.trial_report import REPLAYED, StudentEpoch, TrialReport
from kd_tune.space.trials import TrialConfig, TrialPoint, mutable_values, trial_folder_name
from kd_tune.sweep.cluster.connect import assigned_device, assigned_threads
from kd_tune.sweep.hooks import NO_HOOKS, TrialHooks
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.trial_state import own_state_at, restore_state


@dataclass(frozen=True)
class TrialBundle:
    """What every trial of a sweep shares, read-only, from the object store."""

    split: DataSplit
    """Images and clean labels (the test labels are never perturbed)."""
    students: dict[str, StudentSpec]
    """The sweep's students by ``grid.student`` entry ("": the ``student`` section)."""
    labels: dict[float, torch.Tensor]
    """Training labels per label-noise level of the sweep."""
    teacher_train_logits: dict[tuple[str, float], torch.Tensor]
    """The teachers' logits on the training images, per (``grid.teacher`` entry, label-noise level) (the teacher saw that noise)."""
    teacher_test_logits: dict[tuple[str, float], torch.Tensor]
    storage: Storage
    """Where the sweep lives; each trial's checkpoints are persisted in its folder there."""
    sweep: str
    """The sweep's name: its folder in the storage."""
    default_teacher: str = ""
    """The teacher a scratch student is compared with (its teacher agreement): the first of the sweep's."""
    hooks: TrialHooks = field(default=NO_HOOKS)
    """Moments a test can act at (:mod:`kd_tune.sweep.hooks`); nothing in a real sweep."""
    teacher_nets: dict[tuple[str, float], list[TeacherNet]] = field(default_factory=dict)
    """The teachers' networks, per (``grid.teacher`` entry, label-noise level), for students that augment their batches:
    their teacher runs live, on each augmented batch."""
    teacher_weights: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """The members' weights of each weighted ensemble, per ``grid.teacher`` entry (absent: equal weights)."""

    def student(self, point: TrialPoint) -> StudentSpec:
        return self.students[point.student]

    def model_args(self, point: TrialPoint) -> dict[str, Any]:
        """What rebuilds the point's student (:func:`kd_tune.distill.models.model_args`)."""
        s = self.student(point)
        return model_args(s.arch, s.arch_args, self.split.info.shape, self.split.info.num_classes)

    def teacher(self, point: TrialPoint) -> tuple[str, float]:
        """Which teacher logits the point learns from, or (scratch) is compared with."""
        return (point.teacher or self.default_teacher, point.label_noise)


@dataclass(frozen=True)
class _Trial:
    """A trial's attempt: where it runs, what it restored and what it reports beside its metrics. The one restore
    path and the one way to report, for one student and for a pack alike."""

    label: str
    folder: str
    """The trial's folder, relative to the storage root."""
    device: torch.device
    bundle: TrialBundle
    state: dict[str, Any] | None = None
    """The newest complete checkpoint's state (None: a fresh start)."""
    known_epoch: int = 0
    """The epoch Ray's experiment state knows the trial reached."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Where this attempt runs (the tracking tags the MLflow run with it; node_ip and hostname come from Ray) and what
    it trains and selects on: a check that held-out images never reach training."""

    @property
    def start(self) -> int:
        return 0 if self.state is None else int(self.state["epoch"])

    def replay(self) -> None:
        """Epochs trained before a kill but unknown to Ray may never have reached the driver (and MLflow): report them
        again from the checkpoint's history; the tracking callback skips those it has."""
        for report in trial_results(self.state, after=self.known_epoch):
            # Marked: a population's scheduler must not act on epochs trained before (kd_tune.sweep.population).
            self.report(report, replayed=True)
        self.bundle.hooks.before_training(self.label, self.folder)

    def where(self, report: TrialReport) -> TrialReport:
        return replace(report, where={**report.where, **self.extra})

    def report(self, report: TrialReport, save: Callable[[Path], None] | None = None, replayed: bool = False) -> None:
        """One report to Tune, with the checkpoint ``save`` writes into a fresh folder (none: a report without one).
        ``replayed``: an epoch trained before (:data:`~kd_tune.space.trial_report.REPLAYED`)."""
        wire = {**self.where(report).encode(), **({REPLAYED: 1} if replayed else {})}
        if save is None:
            tune.report(wire)
            return
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            tune.report(wire, checkpoint=tune.Checkpoint.from_directory(folder))
        self.bundle.hooks.after_epoch(self.label, self.folder, report.epoch)


def _start(config: Mapping[str, Any], trial: TrialConfig, bundle: TrialBundle, data: TensorData | PackData) -> _Trial:
    """The attempt's device and threads, and its restore: the newest complete checkpoint, which after a SIGKILLed
    driver can be newer than the one Ray's experiment state remembers (:func:`~kd_tune.sweep.state.trial_state.restore_state`)."""
    # Ray logs a line per persisted checkpoint, i.e. per epoch per trial: too much to read.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    folder = f"{bundle.sweep}/{trial_folder_name(config, tune.get_context().get_trial_id())}"
    state, known_epoch = restore_state(bundle.storage, folder)
    device = data.train_x.device
    extra = {"device": str(device), "node_id": ray.get_runtime_context().get_node_id(), "resumed_from": 0 if state is None else int(state["epoch"]),
             "train_images": int(data.train_x.shape[0]), "val_images": 0 if data.val_x is None else int(data.val_x.shape[0])}
    return _Trial(trial.label, folder, device, bundle, state, known_epoch, extra)


def _device() -> torch.device:
    device = assigned_device()
    torch.set_num_threads(assigned_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    return device


def kd_trainable(config: dict[str, Any], bundle: TrialBundle) -> None:
    """One trial: one student (its own model and step, :func:`~kd_tune.distill.train.train`) or a pack of them as one
    model (:func:`~kd_tune.distill.pack_train.train_pack`); both restore, replay and report through :class:`_Trial`."""
    trial = TrialConfig.decode(config)
    if trial.packed:
        _train_pack(config, trial, bundle)
    else:
        _train_one(config, trial, bundle)


def _train_one(config: dict[str, Any], trial: TrialConfig, bundle: TrialBundle) -> None:
    point, device = trial.point, _device()
    student, teacher = bundle.student(point), bundle.teacher(point)
    split = replace(bundle.split, train_y=bundle.labels[point.label_noise])
    distills = point.role == "student"
    teacher_train = bundle.teacher_train_logits[teacher] if distills and not student.online else None
    data = TensorData.from_split(split, device, teacher_train, bundle.teacher_test_logits[teacher])
    if distills and student.online:  # augmented batches: the teacher scores each of them
        data = replace(data, online_teacher=online_teacher(bundle.teacher_nets[teacher], device, bundle.teacher_weights.get(teacher[0], ())))
    run = _start(config, trial, bundle, data)
    margs = bundle.model_args(point)
    model = build(margs, point.seed).to(device)
    optimizer = make_optimizer(model, student.lr)
    history: list[dict[str, float]] = []
    hyper = mutable_values(config)  # PBT's values in force, or None
    lineage = Lineage()
    gap: list[dict[str, float]] = []
    if (state := run.state) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        lineage = Lineage.from_config(state.get("lineage"))
        donor = state.get("label")
        if donor is not None and donor != point.label:
            # PBT's exploit: another member's weights (and their lineage) from here on; this run keeps what it reported.
            own = own_state_at(bundle.storage, run.folder, run.start)
            history = [] if own is None else [h for h in own["history"] if int(h["epoch"]) <= run.start]
            # A donor ahead of this member: the epochs between are the donor's training of the weights this run now has,
            # so the run's record of them is the donor's (reported below; the lineage says whose they were).
            gap = [h for h in state["history"] if int(history[-1]["epoch"] if history else 0) < int(h["epoch"]) <= run.start]
            history += gap
            exploit = Exploit(run.start, str(donor), str(state.get("trial_id", "")), point.label)
            lineage = lineage.exploited(exploit)
        elif hyper is not None and run.start > run.known_epoch and state.get("hyper") is not None:
            hyper = dict(state["hyper"])  # newer than Ray's state (a killed driver): the values that checkpoint trained with
    else:
        bundle.hooks.initial_weights([point.label], [model.state_dict()])
    run.replay()

    alpha, temperature, knobs = point.alpha_value, point.temperature_value, point.knobs
    if hyper is not None:  # what the population mutates (scheduler.mutate); the rest stays the point's
        alpha = float(hyper["alpha"]) if "alpha" in hyper else alpha
        temperature = float(hyper["temperature"]) if "temperature" in hyper else temperature
        knobs = tuple((k, hyper.get(k, v)) for k, v in point.knobs)
    varies = point.scheduled or hyper is not None  # alpha and T of each epoch are then metrics of their own

    def checkpoint(confusion: list[list[int]]) -> Callable[[Path], None]:
        extra: dict[str, Any] = {"label": point.label, "trial_id": tune.get_context().get_trial_id(), "hyper": hyper}
        if varies:
            extra["lineage"] = lineage.as_config()
        return lambda folder: save_checkpoint(folder, margs, model, optimizer, history, confusion, extra)

    for i, h in enumerate(gap):
        # The last of them with this member's own checkpoint of the weights it took (its label, the exploit in its lineage).
        run.report(TrialReport.one(StudentEpoch.of(h)), checkpoint(state["confusion"]) if i == len(gap) - 1 and state else None, replayed=True)

    def on_epoch(m: EpochMetrics, ev: Evaluation) -> None:
        nonlocal lineage
        values = m.as_dict()
        if varies:
            values |= epoch_values(alpha, temperature, m.epoch, point.epochs)
            lineage = lineage.trained(m.epoch, values["epoch_alpha"], values["epoch_T"], knobs if hyper is not None and knobs != point.knobs else ())
        history.append(values)
        run.report(TrialReport.one(StudentEpoch.of(history[-1])), checkpoint(ev.confusion))

    try:
        train(model, optimizer, data, epochs=point.epochs, batch_size=student.batch_size, seed=point.seed, alpha=alpha,
              temperature=temperature, start_epoch=run.start, on_epoch=on_epoch, precision=student.precision,
              method=point.method, knobs=knobs, augment=Augment(student.augment, student.augment_pad))
    except DivergedError as e:
        # Deterministic: a retry would diverge again. Record it and end the trial (no retries).
        run.report(TrialReport.one(StudentEpoch(e.epoch, diverged_loss=e.loss)))


def _train_pack(config: dict[str, Any], trial: TrialConfig, bundle: TrialBundle) -> None:
    """A pack trial: its members trained as one packed model. Each epoch is ONE report (the members' parts,
    :meth:`~kd_tune.space.trial_report.TrialReport.pack`) with ONE checkpoint
    (:func:`~kd_tune.distill.checkpoint.save_pack_checkpoint`). A member whose loss goes NaN or infinite is reported
    once as diverged and dropped; the others go on."""
    points = list(trial.points)
    labels = [p.label for p in points]
    data, members = pack_inputs(bundle, points, TensorData.from_split(bundle.split, _device()))
    run = _start(config, trial, bundle, data)
    student, margs = bundle.student(points[0]), bundle.model_args(points[0])  # a pack's members are students of one grid.student entry
    entries: dict[str, dict[str, Any]] = {label: {"model_args": margs, "epoch": 0, "history": [], "confusion": []} for label in labels}
    if run.state is not None:
        entries = {label: dict(run.state["members"][label]) for label in labels}
        initial = [entries[label]["model"] for label in labels]
    else:
        # Each member starts exactly as the unpacked trial of its point would (build, seeded).
        initial = [build(margs, p.seed).state_dict() for p in points]
        bundle.hooks.initial_weights(labels, initial)
    model = pack_from_state_dicts(margs, initial, channels_last_on(run.device)).to(run.device)
    optimizer = make_optimizer(model, student.lr)
    if run.state is not None:
        optimizer.load_state_dict(run.state["optimizer"])
    exclude = {k for k, label in enumerate(labels) if entries[label].get("diverged")}
    run.replay()

    now: dict[str, StudentEpoch] = {}

    def on_epoch(k: int, m: EpochMetrics, ev: Evaluation) -> None:
        entry, p = entries[labels[k]], points[k]
        values = m.as_dict()
        if p.scheduled:  # as a member alone reports them
            values |= epoch_values(p.alpha_value, p.temperature_value, m.epoch, p.epochs)
        entry["history"] = [*entry["history"], values]
        entry["epoch"], entry["confusion"] = m.epoch, ev.confusion
        now[labels[k]] = StudentEpoch.of(values)

    def on_diverged(k: int, e: DivergedError) -> None:
        entries[labels[k]]["diverged"] = {"epoch": e.epoch, "loss": e.loss}
        now[labels[k]] = StudentEpoch(e.epoch, diverged_loss=e.loss)

    def on_epoch_end(epoch: int) -> None:
        for k, label in enumerate(labels):
            entries[label]["model"] = member_state_dict(model, k)
        report = TrialReport.pack(epoch, now, [label for label, entry in entries.items() if entry.get("diverged")])
        now.clear()
        run.report(report, lambda folder: save_pack_checkpoint(folder, epoch, entries, optimizer))

    train_pack(model, optimizer, data, members, batch_size=student.batch_size, start_epoch=run.start, exclude=exclude,
               on_epoch=on_epoch, on_diverged=on_diverged, on_epoch_end=on_epoch_end, precision=student.precision, margs=margs,
               augment=Augment(student.augment, student.augment_pad))


def epoch_values(alpha: Value, temperature: Value, epoch: int, epochs: int) -> dict[str, float]:
    """The alpha and T epoch ``epoch`` trained with (a schedule's value, or the number), as the metrics
    :data:`~kd_tune.space.trial_report.SCHEDULE_METRICS` report them."""
    return {"epoch_alpha": value_at(alpha, epoch, epochs), "epoch_T": value_at(temperature, epoch, epochs)}


def pack_inputs(bundle: TrialBundle, points: list[TrialPoint], base: TensorData) -> tuple[PackData, list[Member]]:
    """A pack's data on ``base``'s device (one row of labels per label-noise level among the members, one row of teacher
    logits per (teacher, level)) and its members, as :func:`kd_trainable` would train each point alone."""
    device = base.train_x.device
    levels = sorted({p.label_noise for p in points})
    row = {n: i for i, n in enumerate(levels)}
    teachers = sorted({bundle.teacher(p) for p in points})
    trow = {t: i for i, t in enumerate(teachers)}
    online = bundle.student(points[0]).online and any(p.role == "student" for p in points)  # a pack's members share their student
    data = PackData(train_x=base.train_x, train_labels=torch.stack([bundle.labels[n] for n in levels]).to(device), test_x=base.test_x,
                    test_y=base.test_y,
                    teacher_train=None if online else torch.stack([bundle.teacher_train_logits[t] for t in teachers]).to(device),
                    teacher_test=torch.stack([bundle.teacher_test_logits[t] for t in teachers]).to(device), val_x=base.val_x, val_y=base.val_y,
                    online_teachers=[online_teacher(bundle.teacher_nets[t], device, bundle.teacher_weights.get(t[0], ())) for t in teachers]
                    if online else None)
    members = [Member(seed=p.seed, epochs=p.epochs, alpha=p.alpha_value, temperature=p.temperature_value, labels=row[p.label_noise],
                      teacher=trow[bundle.teacher(p)] if p.role == "student" else None, teacher_test=trow[bundle.teacher(p)],
                      method=p.method, knobs=p.knobs) for p in points]
    return data, members
