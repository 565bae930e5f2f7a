"""Training a pack: K students of one packed model (:mod:`kd_tune.distill.packed`) as ``kd_tune.distill.train.train``
trains one, each with its own seed, alpha, temperature, labels, teacher, distillation method and knobs; a member that
diverges is masked out alone. The pack's step and evaluation, run by the one epoch loop
(:func:`kd_tune.distill.epochs.run_epochs`) that also trains one student. Plain PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_tune.distill.augment import NO_AUGMENT, Augment, epoch_generator
from kd_tune.distill.epochs import EpochMetrics, TrainResult, check_augment, run_epochs
from kd_tune.distill.losses import KDLossTerms, TermsFn, get_loss
from kd_tune.distill.metrics import Evaluation, evaluations, validations
from kd_tune.distill.online import OnlineTeacher
from kd_tune.distill.optim import Optimizer
from kd_tune.distill.packed import member_model, pack_size
from kd_tune.distill.train import TensorData, epoch_order, eval_batch, predict_logits, step_precision
from kd_tune.errors import DivergedError
from kd_tune.space.methods import METHODS, canonical_knobs
from kd_tune.space.schedules import Value, value_at

EVAL_STUDENT_IMAGES = 32768
"""Images times members per evaluation forward of a pack: bounds its activations (the 16/32 student's first
convolution alone gives 12.5 KB per image, 0.4 GB per chunk)."""


@dataclass(frozen=True)
class Member:
    """One student of a pack: what ``kd_tune.distill.train.train`` takes as arguments, plus which data rows it trains on."""

    seed: int
    """Fixes the member's epoch orders (``epoch_order``); its initial weights come from the pack given to ``train_pack``."""
    epochs: int
    alpha: Value = 1.0
    """A number, or a schedule read at each epoch (``kd_tune.space.schedules``), as ``train``'s."""
    temperature: Value = 1.0
    labels: int = 0
    """Row of ``PackData.train_labels`` (e.g. one row per label-noise level)."""
    teacher: int | None = None
    """Row of ``PackData.teacher_train`` to distill from; None trains on hard labels alone (scratch)."""
    teacher_test: int | None = None
    """Row of ``PackData.teacher_test`` for the teacher-agreement metric; None reports no agreement."""
    method: str = "kd"
    """The registered loss it trains with (:mod:`kd_tune.distill.losses`; one of ``kd_tune.space.methods.METHODS``)."""
    knobs: tuple[tuple[str, Any], ...] = ()
    """Its method's knobs (``kd_tune.space.methods.Knobs``); those it does not give take the method's defaults."""

    def full_knobs(self) -> tuple[tuple[str, Any], ...]:
        """Every knob of its method that applies, defaults filled in (``canonical_knobs``; a loss registered outside
        ``METHODS``: the knobs as given). Raises ValueError for a knob its method does not have."""
        if self.method not in METHODS:
            return self.knobs
        names = METHODS[self.method].knob_names
        if unknown := sorted(set(dict(self.knobs)) - set(names)):
            raise ValueError(f"method {self.method} has no knob {', '.join(unknown)}; its knobs: {', '.join(names)}")
        return canonical_knobs(self.method, self.knobs)


@dataclass(frozen=True)
class PackData:
    """The pack's data, resident on its device: ``TensorData`` with stacks where members may differ."""

    train_x: torch.Tensor
    """Normalized images [N, C, H, W], as ``TensorData.train_x``."""
    train_labels: torch.Tensor
    """[L, N] int64: L label sets (label-noise levels)."""
    test_x: torch.Tensor
    test_y: torch.Tensor
    teacher_train: torch.Tensor | None = None
    """[L', N, classes]: teachers' logits on train_x."""
    teacher_test: torch.Tensor | None = None
    """[L'', N_test, classes]: teachers' logits on test_x."""
    val_x: torch.Tensor | None = None
    """Validation images (None: no validation split), shared by every member, as ``TensorData.val_x``."""
    val_y: torch.Tensor | None = None
    online_teachers: Sequence[OnlineTeacher] | None = None
    """Live teachers instead of ``teacher_train`` (a member's ``teacher`` is a row of this list): each scores the
    (augmented) batch of each data order its members use, once per step (:mod:`kd_tune.distill.online`)."""

    def member_data(self, member: Member) -> TensorData:
        """What ``kd_tune.distill.train.train`` would get for this member alone."""
        online = None if member.teacher is None or self.online_teachers is None else self.online_teachers[member.teacher]
        return TensorData(
            train_x=self.train_x,
            train_y=self.train_labels[member.labels],
            test_x=self.test_x,
            test_y=self.test_y,
            teacher_train=None if member.teacher is None or self.teacher_train is None else self.teacher_train[member.teacher],
            teacher_test=None if member.teacher_test is None or self.teacher_test is None else self.teacher_test[member.teacher_test],
            val_x=self.val_x,
            val_y=self.val_y,
            online_teacher=online,
        )


@torch.no_grad()
def pack_logits(model: nn.Module, images: Sequence[torch.Tensor], rows: Sequence[int], packed: bool | None = None,
                margs: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
    """Logits [len(rows), N, classes] of members ``rows`` on each image set [N, C, H, W] of ``images``.

    ``packed``: one packed forward per chunk of images (every member's logits at once), else each member as a
    stand-alone model (copied once for all the image sets: of ``margs``, else a ``PackedCNN``'s own). None: packed except on a CPU, where a packed
    forward was no faster than the members one by one (``benchmarks/pack_bench.py --eval``; benchmarks/RESULTS.md,
    session 9); on a GPU a student's forward is launch-bound, as its step is.
    """
    if packed is None:
        packed = images[0].device.type != "cpu"
    if not packed:
        students = [member_model(model, margs, i) if margs is not None else model.member(i) for i in rows]  # type: ignore[operator]
        return [torch.stack([predict_logits(student, x) for student in students]) for x in images]
    # Chunks of eval_batch() images for one student, fewer for a wide pack: K * chunk activations stay bounded.
    chunk = max(1, min(eval_batch(images[0].device), EVAL_STUDENT_IMAGES // pack_size(model)))
    was_training = model.training
    model.eval()
    out = [torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)], dim=1)[list(rows)] for x in images]
    model.train(was_training)
    return out


def evaluate_pack(
    model: nn.Module, data: PackData, members: Sequence[Member], which: Sequence[int], packed: bool | None = None,
    margs: Mapping[str, Any] | None = None,
) -> dict[int, tuple[Evaluation, tuple[float | None, float | None]]]:
    """What ``evaluate`` and ``validate`` of ``kd_tune.distill.train`` give member k alone, for each k in ``which``: the
    members' logits (``pack_logits``, ``packed`` as there) scored all at once, so that a GPU syncs a few times
    per epoch instead of a few times per member."""
    if not which:
        return {}
    rows = list(which)
    teachers = [None if members[i].teacher_test is None or data.teacher_test is None else data.teacher_test[members[i].teacher_test]
                for i in rows]
    vals: list[tuple[float | None, float | None]]
    if data.val_x is None or data.val_y is None:
        (test,) = pack_logits(model, [data.test_x], rows, packed, margs)
        vals = [(None, None)] * len(rows)
    else:
        test, val = pack_logits(model, [data.test_x, data.val_x], rows, packed, margs)
        vals = validations(val, data.val_y)
    tests = evaluations(test, data.test_y, teachers)
    return {i: (ev, val) for i, ev, val in zip(rows, tests, vals, strict=True)}


def _check(model: nn.Module, data: PackData, members: Sequence[Member]) -> int:
    if len(members) != pack_size(model):
        raise ValueError(f"{len(members)} members for a pack of {pack_size(model)}")
    epochs = {m.epochs for m in members}
    if len(epochs) != 1:
        raise ValueError(f"all members of a pack train the same number of epochs, got {sorted(epochs)}")
    for i, m in enumerate(members):
        if not 0 <= m.labels < data.train_labels.shape[0]:
            raise ValueError(f"member {i}: labels row {m.labels} of {data.train_labels.shape[0]}")
        rows = len(data.online_teachers) if data.online_teachers is not None else None if data.teacher_train is None else data.teacher_train.shape[0]
        if m.teacher is not None and (rows is None or not 0 <= m.teacher < rows):
            raise ValueError(f"member {i}: teacher row {m.teacher} but teacher_train is {None if data.teacher_train is None else tuple(data.teacher_train.shape)}")
        if m.teacher_test is not None and (data.teacher_test is None or not 0 <= m.teacher_test < data.teacher_test.shape[0]):
            raise ValueError(f"member {i}: teacher_test row {m.teacher_test} but teacher_test is {None if data.teacher_test is None else tuple(data.teacher_test.shape)}")
    return epochs.pop()


@dataclass(frozen=True)
class LossGroup:
    """Members of a pack that one call of a loss's pack form serves: one method, the same categorical knobs (those are
    plain values of the call), each member's alpha, temperature, teacher flag and numeric knobs a [K_g] tensor."""

    pack_terms: TermsFn
    rows: torch.Tensor | None
    """The members' indices [K_g]; None: every member of the pack, in order (the logits go in as they are, no gather)."""
    alpha: torch.Tensor
    temperature: torch.Tensor
    has_teacher: torch.Tensor
    knobs: dict[str, Any]

    def terms(self, logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, epoch: int) -> KDLossTerms:
        """The group's terms [K_g] from the whole pack's logits [K, B, C], teacher logits and labels."""
        if self.rows is not None:
            logits, labels = logits[self.rows], labels[self.rows]
            teacher = None if teacher is None else teacher[self.rows]
        return self.pack_terms(logits, teacher, labels, self.alpha, self.temperature, has_teacher=self.has_teacher, epoch=epoch, **self.knobs)


def loss_groups(members: Sequence[Member], device: torch.device, epoch: int = 1) -> tuple[list[LossGroup], torch.Tensor | None]:
    """The pack's members grouped by method and categorical knobs (str or bool values), in order of first appearance,
    and the permutation that puts the groups' concatenated [K] terms back in member order (None for one group: they
    are in order already). Built once per epoch (each member's alpha and T at ``epoch``): a step only indexes."""
    full = [dict(m.full_knobs()) for m in members]
    keyed: dict[tuple[str, tuple[tuple[str, Any], ...], tuple[str, ...]], list[int]] = {}
    for i, (m, knobs) in enumerate(zip(members, full, strict=True)):
        categorical = tuple((n, v) for n, v in knobs.items() if isinstance(v, (str, bool)))
        numeric = tuple(n for n, v in knobs.items() if not isinstance(v, (str, bool)))
        keyed.setdefault((m.method, categorical, numeric), []).append(i)
    groups = []
    for (method, categorical, numeric), rows in keyed.items():
        pack_terms = get_loss(method).pack_terms  # ValueError naming the registered ones
        if pack_terms is None:
            raise ValueError(f"loss {method!r} has no pack form: its students train one per trial")
        group = [members[i] for i in rows]
        groups.append(LossGroup(
            pack_terms, None if len(keyed) == 1 else torch.tensor(rows, device=device),
            alpha=torch.tensor([value_at(m.alpha, epoch, m.epochs) for m in group], device=device),
            temperature=torch.tensor([value_at(m.temperature, epoch, m.epochs) for m in group], device=device),
            has_teacher=torch.tensor([m.teacher is not None for m in group], device=device),
            knobs=dict(categorical) | {n: torch.tensor([float(full[i][n]) for i in rows], device=device) for n in numeric},
        ))
    if len(groups) == 1:
        return groups, None
    return groups, torch.argsort(torch.tensor([i for rows in keyed.values() for i in rows], device=device))


def pack_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    data: PackData,
    members: Sequence[Member],
    epoch: int,
    batch_size: int,
    active: torch.Tensor | None = None,
    precision: str = "float32",
    augment: Augment = NO_AUGMENT,
) -> torch.Tensor:
    """Train the pack for epoch ``epoch`` (1-based); returns each member's summed (total, hard, distill) losses [K, 3], on the device.

    ``active`` [K] bool masks members out of the objective (a diverged member's NaN then reaches nothing).
    ``precision``: the forward's arithmetic, as in ``kd_tune.distill.train.train``. Each member's loss is its ``method``
    with its ``knobs`` (a loss with a pack form), one call per group of members that share a method and its categorical
    knobs (:func:`loss_groups`).
    ``augment``: each data order's batch augmented with its own draws (those of (seed, epoch), as a member alone would
    draw them), then scored by each live teacher its members learn from: once per (data order, teacher) and step, however
    many members share them.
    """
    check_augment(augment, data.teacher_train)
    device = data.train_x.device
    k, n = len(members), data.train_x.shape[0]
    groups, order = loss_groups(members, device, epoch)
    label_rows = torch.tensor([m.labels for m in members], device=device)[:, None]
    teacher_rows = torch.tensor([m.teacher or 0 for m in members], device=device)[:, None]
    use_teacher = data.teacher_train is not None and any(m.teacher is not None for m in members)
    active = torch.ones(k, dtype=torch.bool, device=device) if active is None else active
    seeds = sorted({m.seed for m in members})
    shared = len(seeds) == 1  # one data order for all: a plain first conv on one shared batch
    by_seed = {s: epoch_order(n, s, epoch) for s in seeds}
    orders = torch.stack([by_seed[m.seed] for m in members]).to(device)  # [K, N]
    live = data.online_teachers is not None and any(m.teacher is not None for m in members)
    draws = {s: epoch_generator(s, epoch) for s in seeds} if augment.active else None
    slot = {s: j for j, s in enumerate(seeds)}
    sums = torch.zeros(k, 3, device=device)  # on the device: a .item() per step would stall a GPU
    for i in range(0, n, batch_size):
        idx = orders[:, i : i + batch_size]  # [K, B]
        if draws is None and not live:
            # Gathered [B, K, ...] and viewed as [K, B, ...], the forward's transpose back is free.
            x = data.train_x[idx[0]] if shared else data.train_x[idx.t()].transpose(0, 1)
            teacher = data.teacher_train[teacher_rows, idx] if use_teacher and data.teacher_train is not None else None
        else:
            # One batch per data order (augmented with that order's draws), each scored once by each live teacher it needs.
            batches = [data.train_x[by_seed[s][i : i + batch_size].to(device)] for s in seeds]
            if draws is not None:
                batches = [augment(b, draws[s]) for b, s in zip(batches, seeds, strict=True)]
            x = batches[0] if shared else torch.stack([batches[slot[m.seed]] for m in members])
            teacher = _live_logits(data, members, batches, slot) if live else None
        with step_precision(device, precision):
            logits = model(x)
        terms = _member_terms(groups, order, logits.float(), teacher, data.train_labels[label_rows, idx], epoch)
        optimizer.zero_grad(set_to_none=True)
        torch.where(active, terms.total, 0.0).sum().backward()
        optimizer.step()
        sums += torch.stack([terms.total, terms.hard, terms.distill], dim=1).detach() * idx.shape[1]
    return sums


def _member_terms(groups: list[LossGroup], order: torch.Tensor | None, logits: torch.Tensor, teacher: torch.Tensor | None,
                  labels: torch.Tensor, epoch: int) -> KDLossTerms:
    """Each member's terms [K]: one loss call per group, the groups' terms put back in member order by indexing (so
    autograd takes each member's gradient back to its own logits). One group (every pack of a single method and
    categorical knobs) is one call on the whole tensors, no gather: the same arithmetic as before methods were mixed."""
    if order is None:
        return groups[0].terms(logits, teacher, labels, epoch)
    parts = [g.terms(logits, teacher, labels, epoch) for g in groups]
    return KDLossTerms(*(torch.cat(column)[order] for column in zip(*parts, strict=True)))


def _live_logits(data: PackData, members: Sequence[Member], batches: list[torch.Tensor], slot: dict[int, int]) -> torch.Tensor:
    """[K, B, classes]: each member's live teacher's logits on its data order's batch; zeros for a member without one
    (every loss's pack form ignores its row). Each (data order, teacher) pair is scored once."""
    assert data.online_teachers is not None
    scored: dict[tuple[int, int], torch.Tensor] = {}
    for m in members:
        if m.teacher is not None and (slot[m.seed], m.teacher) not in scored:
            scored[slot[m.seed], m.teacher] = data.online_teachers[m.teacher](batches[slot[m.seed]])
    classes = next(iter(scored.values())).shape[-1]
    zeros = torch.zeros(batches[0].shape[0], classes, device=batches[0].device)
    return torch.stack([scored[slot[m.seed], m.teacher] if m.teacher is not None else zeros for m in members])


def train_pack(
    model: nn.Module,
    optimizer: Optimizer,
    data: PackData,
    members: Sequence[Member],
    *,
    batch_size: int,
    start_epoch: int = 0,
    exclude: Collection[int] = (),
    on_epoch: Callable[[int, EpochMetrics, Evaluation], None] | None = None,
    on_diverged: Callable[[int, DivergedError], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    precision: str = "float32",
    margs: Mapping[str, Any] | None = None,
    augment: Augment = NO_AUGMENT,
) -> TrainResult:
    """``kd_tune.distill.train.train`` for K members at once, from the end of epoch ``start_epoch`` to the members' ``epochs``.

    Member k trains with seed, alpha, temperature, method, knobs and data rows ``members[k]``, from the weights it
    has in ``model``; ``optimizer`` is e.g. ``kd_tune.distill.train.make_optimizer(model, lr)``. The callbacks,
    ``exclude`` and ``epoch_seconds`` are :func:`kd_tune.distill.epochs.run_epochs`'s; a member that diverges is
    masked out and the others go on.
    """
    epochs = _check(model, data, members)

    def step(epoch: int, active: torch.Tensor) -> torch.Tensor:
        return pack_epoch(model, optimizer, data, members, epoch, batch_size, active, precision, augment)

    def evaluated(which: Sequence[int]) -> dict[int, tuple[Evaluation, tuple[float | None, float | None]]]:
        return evaluate_pack(model, data, members, which, margs=margs)

    model.train()
    return run_epochs(step, evaluated, members=len(members), images=data.train_x.shape[0], device=data.train_x.device,
                      start_epoch=start_epoch, epochs=epochs, exclude=exclude, on_epoch=on_epoch, on_diverged=on_diverged,
                      on_epoch_end=on_epoch_end)
