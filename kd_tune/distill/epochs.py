"""The one epoch loop: K students trained together (a pack, :mod:`kd_tune.distill.pack_train`) or one alone
(:mod:`kd_tune.distill.train`, a "pack" of one that keeps its plain model and plain step). Plain PyTorch.

The loop is what both have in common: each epoch runs the step (one pass over the data, returning every member's
summed losses on the device), syncs with the host once, masks out a member whose loss went NaN or infinite, evaluates
the members still training, and hands each its :class:`EpochMetrics`. What differs, the step and the evaluation, comes
in as two functions, so one student keeps its own model and kernels (its results stay bit for bit those of before
the loop was shared) and a pack keeps its packed forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kd_tune.distill.augment import Augment
from kd_tune.distill.metrics import Evaluation
from kd_tune.errors import DivergedError


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced; the names are those reported to Ray and logged to MLflow."""

    epoch: int
    train_loss: float
    train_hard_loss: float
    train_distill_loss: float
    test_acc: float
    test_loss: float
    teacher_agreement: float | None
    test_macro_precision: float
    test_macro_recall: float
    test_macro_f1: float
    test_ece: float
    epoch_seconds: float
    val_acc: float | None = None
    """Accuracy and loss on the validation split (None without one)."""
    val_loss: float | None = None

    @classmethod
    def measured(cls, epoch: int, losses: Sequence[float], ev: Evaluation, val: tuple[float | None, float | None],
                 seconds: float) -> EpochMetrics:
        """The one constructor: an epoch's mean (total, hard, distill) losses, its test evaluation and its validation
        (accuracy, loss)."""
        total, hard, distill = losses
        return cls(epoch=epoch, train_loss=total, train_hard_loss=hard, train_distill_loss=distill, test_acc=ev.acc, test_loss=ev.loss,
                   teacher_agreement=ev.teacher_agreement, test_macro_precision=ev.macro_precision, test_macro_recall=ev.macro_recall,
                   test_macro_f1=ev.macro_f1, test_ece=ev.ece, epoch_seconds=seconds, val_acc=val[0], val_loss=val[1])

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainResult:
    history: list[list[EpochMetrics]]
    """history[k]: member k's epochs (none after it diverged)."""
    diverged: dict[int, DivergedError] = field(default_factory=dict)
    """Members whose epoch-mean loss was NaN or infinite, with that epoch and loss."""


Step = Callable[[int, torch.Tensor], torch.Tensor]
"""``step(epoch, active)``: one epoch (1-based) over the data; ``active`` [K] bool masks members out of the objective.
Returns each member's summed (total, hard, distill) losses [K, 3], on the device."""
Evaluate = Callable[[Sequence[int]], Mapping[int, tuple[Evaluation, tuple[float | None, float | None]]]]
"""``evaluate(which)``: member k's test evaluation and validation (accuracy, loss), for each k in ``which``."""


def check_augment(augment: Augment, cached_logits: object) -> None:
    """Cached teacher logits are of the plain images: augmented batches need a live teacher."""
    if augment.active and cached_logits is not None:
        raise ValueError("augmented batches with cached teacher logits: the logits are of the plain images")


def run_epochs(
    step: Step,
    evaluate: Evaluate,
    *,
    members: int,
    images: int,
    device: torch.device,
    start_epoch: int,
    epochs: int,
    exclude: Collection[int] = (),
    on_epoch: Callable[[int, EpochMetrics, Evaluation], None] | None = None,
    on_diverged: Callable[[int, DivergedError], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Epochs ``start_epoch + 1`` to ``epochs`` of ``members`` students over ``images`` training images.

    After each epoch ``on_epoch(k, metrics, evaluation)`` sees every member still training. A member whose epoch-mean
    loss is NaN or infinite is reported once (``on_diverged``, which may raise, and ``TrainResult.diverged``) and then
    masked out; the others go on unaffected. ``exclude``: members masked out from the start (e.g. diverged before a
    resume). ``epoch_seconds`` is the epoch's wall time split evenly over the members still training, so summing it
    over trials still gives the time spent. ``on_epoch_end(epoch)`` comes after every member's ``on_epoch`` and
    ``on_diverged`` of that epoch (where a pack checkpoints).
    """
    active = [i not in exclude for i in range(members)]
    result = TrainResult([[] for _ in range(members)])
    for epoch in range(start_epoch + 1, epochs + 1):
        if not any(active):
            break
        t0 = time.perf_counter()
        sums = step(epoch, torch.tensor(active, device=device))
        means = (sums / images).tolist()  # the one host sync of the epoch
        for i, (total, _, _) in enumerate(means):
            if active[i] and not math.isfinite(total):
                active[i] = False
                result.diverged[i] = DivergedError(epoch, total)
                if on_diverged is not None:
                    on_diverged(i, result.diverged[i])
        evaluations = evaluate([i for i in range(members) if active[i]])
        seconds = (time.perf_counter() - t0) / max(1, len(evaluations))
        for i, (ev, val) in evaluations.items():
            metrics = EpochMetrics.measured(epoch, means[i], ev, val, seconds)
            result.history[i].append(metrics)
            if on_epoch is not None:
                on_epoch(i, metrics, ev)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return result
