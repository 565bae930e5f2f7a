"""What an epoch measures: accuracy, loss, macro precision / recall / F1, calibration error, teacher agreement and
the confusion matrix, for K models at once from their logits (one host sync per set)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Evaluation:
    """The model on the test set."""

    acc: float
    loss: float
    teacher_agreement: float | None
    macro_precision: float
    macro_recall: float
    macro_f1: float
    ece: float
    """Expected calibration error: 15 equal-width confidence bins, |accuracy - confidence| weighted by bin size."""
    confusion: list[list[int]]
    """confusion[true][predicted] counts."""


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> tuple[float, float, float, float, list[list[int]]]:
    """Macro precision, recall, F1 (classes without predictions or examples count as 0), ECE, confusion matrix."""
    ev = evaluations(logits[None], labels, [None], bins)[0]
    return ev.macro_precision, ev.macro_recall, ev.macro_f1, ev.ece, ev.confusion


def evaluations(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Sequence[torch.Tensor | None], bins: int = 15
) -> list[Evaluation]:
    """:class:`Evaluation` of each of K models from their logits [K, N, classes] on the same N labelled images.

    ``teacher_logits[k]``: the teacher model k is compared with ([N, classes]; None: no agreement). Loss is
    cross-entropy on the labels; macro precision / recall / F1 count a class without predictions or
    examples as 0; ECE bins confidences into ``bins`` equal-width bins, |accuracy - confidence| weighted
    by bin size. All K at once, read back in two transfers: a GPU evaluating a pack waits twice, not per member.
    """
    k, n, c = logits.shape
    dev = logits.device
    logits = logits.float()
    y = labels.expand(k, n)
    conf, pred = logits.softmax(-1).max(-1)  # [K, N]
    correct = pred == y
    loss = F.cross_entropy(logits.reshape(k * n, c), y.reshape(-1), reduction="none").view(k, n).mean(1)
    rows = torch.arange(k, device=dev)[:, None]
    # Counted with scatter_add_, not bincount, which asks the GPU for the largest index (a host sync) to size its output.
    cells = ((rows * c + y) * c + pred).reshape(-1)
    cm = torch.zeros(k * c * c, dtype=torch.long, device=dev).scatter_add_(0, cells, torch.ones_like(cells)).view(k, c, c)  # [k][true][pred]
    tp, predicted, actual = cm.diagonal(dim1=1, dim2=2).double(), cm.sum(1).double(), cm.sum(2).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    # ECE = sum over bins of (n_b / n) |acc_b - conf_b| = sum_b |sum over the bin of (correct - conf)| / n.
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a one-hot sum, not bincount's float atomics, keeps it deterministic on a GPU.
    which = (conf.double() * bins).ceil().clamp(1, bins).long() - 1
    gap = torch.einsum("knb,kn->kb", F.one_hot(which, bins).double(), correct.double() - conf.double())
    ece = gap.abs().sum(1) / n
    agree = torch.full((k,), math.nan, dtype=torch.float64, device=dev)  # NaN: no teacher to agree with
    for i, t in enumerate(teacher_logits):
        if t is not None:
            agree[i] = (pred[i] == t.argmax(dim=1)).double().mean()
    table = torch.stack([correct.double().mean(1), loss.double(), agree, precision.mean(1), recall.mean(1), f1.mean(1), ece], 1).tolist()
    confusion = cm.tolist()
    return [Evaluation(acc, loss_k, None if math.isnan(ag) else ag, p, r, f, e, confusion[i])
            for i, (acc, loss_k, ag, p, r, f, e) in enumerate(table)]


def validations(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float | None, float | None]]:
    """(accuracy, cross-entropy) of each of K models from their logits [K, N, classes] on N validation images; one host sync."""
    k, n, c = logits.shape
    acc = (logits.argmax(-1) == labels).double().mean(1)
    loss = F.cross_entropy(logits.float().reshape(k * n, c), labels.expand(k, n).reshape(-1), reduction="none").view(k, n).mean(1)
    return [(a, lo) for a, lo in torch.stack([acc, loss.double()], 1).tolist()]
