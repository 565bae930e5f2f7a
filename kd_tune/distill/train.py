"""Training one student: its step (one pass over the data) and :func:`train`, the one epoch loop
(:func:`kd_tune.distill.epochs.run_epochs`) run for a pack of one with that plain step. Plain PyTorch. It knows
nothing of Ray or MLflow; adapters call it.

Everything a trial needs is a tensor already on its device: normalized images, labels and the teacher's cached
logits. A batch is a gather by index, so a distilled student costs what the student costs: the teacher never runs
here.

Determinism: the weights come from the seed (``kd_tune.distill.models.build``) and the order of epoch e is a
function of (seed, e) alone. So resuming at epoch k from a checkpoint, or stopping a longer run at epoch k, gives
the same numbers as an uninterrupted k-epoch run (on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_tune.data.split import DataSplit, normalize
from kd_tune.distill.augment import NO_AUGMENT, Augment, epoch_generator
from kd_tune.distill.epochs import EpochMetrics, check_augment, run_epochs
from kd_tune.distill.losses import DEFAULT_LOSS, get_loss
from kd_tune.distill.metrics import Evaluation, evaluations, validations
from kd_tune.distill.online import OnlineTeacher
from kd_tune.distill.optim import Adam, Optimizer
from kd_tune.errors import DivergedError
from kd_tune.space.schedules import Value, value_at

EVAL_BATCH = 2048
"""Images per evaluation forward on a GPU, where a small model's forward is launch-bound: big chunks pay."""
CPU_EVAL_BATCH = 128
"""Images per evaluation forward on a CPU. Activations of big chunks leave the caches, and a student's evaluation
in chunks of 2,048 took about twice as long as in chunks of 128 (``benchmarks/eval_bench.py``; the numbers:
benchmarks/RESULTS.md, session 9, "evaluation chunks on the CPU")."""


@dataclass(frozen=True)
class TensorData:
    """A trial's data, resident on its device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    teacher_train: torch.Tensor | None = None
    """The teacher's logits on train_x (row i for image i); None trains on hard labels alone."""
    teacher_test: torch.Tensor | None = None
    """The teacher's logits on test_x, for the student-teacher agreement metric."""
    val_x: torch.Tensor | None = None
    """Validation images held out of training (None: no validation split): what selection looks at."""
    val_y: torch.Tensor | None = None
    online_teacher: OnlineTeacher | None = None
    """A live teacher instead of ``teacher_train``: run on each (augmented) training batch (:mod:`kd_tune.distill.online`)."""

    @property
    def distills(self) -> bool:
        """Whether there is a teacher to learn from (cached logits or a live network)."""
        return self.teacher_train is not None or self.online_teacher is not None

    @classmethod
    def from_split(
        cls,
        split: DataSplit,
        device: torch.device | str = "cpu",
        teacher_train: torch.Tensor | None = None,
        teacher_test: torch.Tensor | None = None,
    ) -> TensorData:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        def images(x: torch.Tensor) -> torch.Tensor:
            return normalize(x, split.info, device, standardize=split.normalize)

        has_val = split.val_y.numel() > 0
        return cls(
            train_x=images(split.train_x),
            train_y=split.train_y.to(device),
            test_x=images(split.test_x),
            test_y=split.test_y.to(device),
            teacher_train=move(teacher_train),
            teacher_test=move(teacher_test),
            val_x=images(split.val_x) if has_val else None,
            val_y=split.val_y.to(device) if has_val else None,
        )


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch ``epoch`` (1-based): a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def eval_batch(device: torch.device) -> int:
    """Images per evaluation forward on ``device`` (:data:`CPU_EVAL_BATCH` or :data:`EVAL_BATCH`)."""
    return CPU_EVAL_BATCH if device.type == "cpu" else EVAL_BATCH


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """The model's logits on images ``x``, in eval mode, ``batch_size`` images at a time (default: :func:`eval_batch`)."""
    batch_size = batch_size or eval_batch(x.device)
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, data: TensorData) -> Evaluation:
    """Test accuracy and loss (cross-entropy on the true labels), agreement with the teacher, macro
    precision / recall / F1, calibration error and the confusion matrix."""
    return evaluations(predict_logits(model, data.test_x)[None], data.test_y, [data.teacher_test])[0]


def validate(model: nn.Module, data: TensorData) -> tuple[float | None, float | None]:
    """Accuracy and cross-entropy on the validation split: (None, None) without one."""
    if data.val_x is None or data.val_y is None:
        return None, None
    return validations(predict_logits(model, data.val_x)[None], data.val_y)[0]


def step_precision(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The training forward's arithmetic (``student.precision``): float32 as is (no autocast at all: the default's
    results stay bit for bit), or bfloat16 autocast. Only the forward runs inside it (the backward follows the
    forward's dtypes); the losses are taken on float32 logits."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "float32":
        raise ValueError(f"precision {precision!r}: allowed float32 or bfloat16")
    return nullcontext()


def make_optimizer(model: nn.Module, lr: float) -> Adam:
    # Constant-lr Adam, as in the study: no schedule depends on the total number of epochs,
    # which is what lets a long run stand in for the shorter ones. (torch.optim.Adam's updates; why not it: optim.py)
    return Adam(model.parameters(), lr=lr)


def train_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    data: TensorData,
    epoch: int,
    batch_size: int,
    seed: int,
    alpha: float = 1.0,
    temperature: float = 1.0,
    precision: str = "float32",
    method: str = DEFAULT_LOSS,
    knobs: Mapping[str, Any] | tuple[tuple[str, Any], ...] = (),
    augment: Augment = NO_AUGMENT,
) -> torch.Tensor:
    """Train for epoch ``epoch`` (1-based, its order :func:`epoch_order`); returns the summed (total, hard, distill)
    losses [3], on the device (``kd_tune.distill.pack_train.pack_epoch`` is its twin for a pack). ``augment``: what each
    batch goes through first (its draws a function of (seed, epoch) alone); then the teacher, if any, must be live
    (``data.online_teacher``, which scores the augmented batch): cached logits are of the plain images. ``method`` and
    ``knobs``: the registered loss and its keyword arguments (as :func:`train`)."""
    check_augment(augment, data.teacher_train)
    loss_terms = get_loss(method).terms
    kwargs = dict(knobs)
    n = data.train_x.shape[0]
    order = epoch_order(n, seed, epoch).to(data.train_x.device)
    draws = epoch_generator(seed, epoch) if augment.active else None
    # Sums stay on the device: a .item() per batch would stall a GPU every step.
    sums = torch.zeros(3, device=data.train_x.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = data.train_x[idx] if draws is None else augment(data.train_x[idx], draws)
        with step_precision(data.train_x.device, precision):
            logits = model(x)
        teacher = data.online_teacher(x) if data.online_teacher is not None else None if data.teacher_train is None else data.teacher_train[idx]
        terms = loss_terms(logits.float(), teacher, data.train_y[idx], alpha, temperature, epoch=epoch, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        sums += torch.stack([terms.total.detach(), terms.hard.detach(), terms.distill.detach()]) * idx.numel()
    return sums


def train(
    model: nn.Module,
    optimizer: Optimizer,
    data: TensorData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    alpha: Value = 1.0,
    temperature: Value = 1.0,
    start_epoch: int = 0,
    on_epoch: Callable[[EpochMetrics, Evaluation], None] | None = None,
    precision: str = "float32",
    method: str = DEFAULT_LOSS,
    knobs: Mapping[str, Any] | tuple[tuple[str, Any], ...] = (),
    augment: Augment = NO_AUGMENT,
) -> list[EpochMetrics]:
    """Train from the end of epoch ``start_epoch`` to the end of epoch ``epochs``.

    With ``data.teacher_train`` the loss is the registered ``method`` (:mod:`kd_tune.distill.losses`; by default
    Hinton's, :func:`~kd_tune.distill.losses.kd_loss_terms`) with ``knobs`` as its keyword arguments (a method's knobs,
    ``kd_tune.space.methods.Knobs`` or a mapping; those not given take the loss's defaults, which are the method's);
    without it, the loss with a zero distillation term (kd's: cross-entropy on the labels). ``on_epoch`` sees each epoch's metrics (and may checkpoint).
    ``precision``: the forward's arithmetic (:func:`step_precision`); evaluation is always float32.
    ``alpha`` and ``temperature``: a number, or a :class:`~kd_tune.space.schedules.Schedule` read at each epoch (over
    ``epochs`` where the schedule spans the trial's epochs).
    Raises :class:`DivergedError` naming the epoch when the loss is NaN or infinite.
    """

    def step(epoch: int, active: torch.Tensor) -> torch.Tensor:
        return train_epoch(model, optimizer, data, epoch, batch_size, seed, value_at(alpha, epoch, epochs), value_at(temperature, epoch, epochs),
                           precision, method, knobs, augment)[None]

    def evaluated(which: Sequence[int]) -> dict[int, tuple[Evaluation, tuple[float | None, float | None]]]:
        return {0: (evaluate(model, data), validate(model, data))} if which else {}

    def diverged(_: int, e: DivergedError) -> None:
        raise e  # one student: nothing else goes on

    model.train()
    result = run_epochs(step, evaluated, members=1, images=data.train_x.shape[0], device=data.train_x.device, start_epoch=start_epoch,
                        epochs=epochs, on_epoch=None if on_epoch is None else (lambda _, m, ev: on_epoch(m, ev)), on_diverged=diverged)
    return result.history[0]
