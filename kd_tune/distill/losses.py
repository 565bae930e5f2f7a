"""Distillation losses by name: small pure functions, each with its formula and citation, in a registry.

A loss gives the batch means of its hard-label term, its distillation term and their weighted total
(:class:`KDLossTerms`) for one student (``terms``) and, where it can, for each member of a pack at once
(``pack_terms``, shapes [K]). The training loops look a loss up by name (:func:`get_loss`); a new loss is one
function (or two) and a :func:`register_loss` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class KDLossTerms(NamedTuple):
    """The batch means of the hard-label loss, the distillation loss and their weighted total."""

    hard: torch.Tensor
    distill: torch.Tensor
    total: torch.Tensor


def kd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> KDLossTerms:
    r"""Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531:

    .. math::
        L = \alpha \, CE(z_s, y) + (1 - \alpha) \, T^2 \, KL(softmax(z_t / T) \,\|\, softmax(z_s / T))

    alpha weights the hard labels, as in the study (alpha = 1 is training from scratch). The T^2
    factor keeps the soft term's gradients on the same scale as the hard term's whatever T is
    (the soft gradients shrink as 1/T^2). Both terms are means over the batch; KL uses log-space
    targets so that a confident teacher (probabilities that underflow) gives no NaN.
    With ``teacher_logits=None`` the distillation term is zero (the scratch baseline).
    """
    hard = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        distill = torch.zeros((), dtype=hard.dtype, device=hard.device)
    else:
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        distill = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        total = hard  # exactly scratch training: no 0 * distill term that could carry a NaN
    else:
        total = alpha * hard + (1.0 - alpha) * distill
    return KDLossTerms(hard, distill, total)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """The total of :func:`kd_loss_terms` (batch mean); see there for the formula and citation."""
    return kd_loss_terms(student_logits, teacher_logits, labels, alpha, temperature).total


def pack_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    has_teacher: torch.Tensor | None = None,
) -> KDLossTerms:
    r"""``kd_loss_terms`` for each member of a pack: terms of shape [K], each its member's batch mean.

    For member k with logits z_k [B, classes], labels y_k, teacher logits t_k, alpha_k and T_k (Hinton et al. 2015):

    .. math::
        hard_k = \frac{1}{B} \sum_b CE(z_{kb}, y_{kb}), \quad
        distill_k = \frac{T_k^2}{B} \sum_b KL(softmax(t_{kb} / T_k) \,\|\, softmax(z_{kb} / T_k)) \\
        total_k = hard_k \text{ if } \alpha_k = 1, \text{ else } \alpha_k \, hard_k + (1 - \alpha_k) \, distill_k

    with KL on log-space targets. A member without a teacher (``has_teacher`` False; all of them when
    ``teacher_logits`` is None) has distill_k = 0 exactly, whatever its row of ``teacher_logits`` holds.
    Shapes: logits [K, B, classes], labels [K, B], alpha / temperature / has_teacher [K].
    Train on ``total.sum()``: members share no parameter, so each one's gradient is its own.
    """
    k, b, classes = student_logits.shape
    hard = F.cross_entropy(student_logits.reshape(k * b, classes), labels.reshape(k * b), reduction="none").view(k, b).mean(1)
    if teacher_logits is None:
        distill = torch.zeros_like(hard)
    else:
        has = torch.ones(k, dtype=torch.bool, device=hard.device) if has_teacher is None else has_teacher
        # A member whose total ignores the distillation term must get no gradient through it: the term's
        # backward would multiply a zero by whatever the teacher holds, and 0 * NaN is NaN.
        used = (has & (alpha != 1))[:, None, None]
        z = torch.where(used, student_logits, student_logits.detach())
        t = torch.where(has[:, None, None], teacher_logits, 0.0)
        temp = temperature[:, None, None]
        kl = F.kl_div(F.log_softmax(z / temp, dim=-1), F.log_softmax(t / temp, dim=-1), reduction="none", log_target=True)
        distill = torch.where(has, kl.sum(-1).mean(1) * temperature**2, 0.0)
    total = torch.where(alpha == 1, hard, alpha * hard + (1 - alpha) * distill)
    return KDLossTerms(hard, distill, total)


TermsFn = Callable[..., KDLossTerms]
"""``(student_logits, teacher_logits or None, labels, alpha, temperature) -> KDLossTerms``."""


@dataclass(frozen=True)
class Loss:
    """A registered loss: its one-student form and, if it has one, its pack form (every member at once)."""

    name: str
    terms: TermsFn
    pack_terms: TermsFn | None = None
    """``(logits [K, B, C], teacher [K, B, C] or None, labels [K, B], alpha [K], temperature [K], has_teacher [K] or None)``;
    None: students trained with this loss do not pack."""


LOSSES: dict[str, Loss] = {}
DEFAULT_LOSS = "kd"


def register_loss(name: str, terms: TermsFn, pack_terms: TermsFn | None = None) -> Loss:
    """Add a loss to the registry under ``name``."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is registered twice")
    LOSSES[name] = Loss(name, terms, pack_terms)
    return LOSSES[name]


def get_loss(name: str = DEFAULT_LOSS) -> Loss:
    """The registered loss ``name``; raises ValueError naming the registered ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss {name!r} is not registered; allowed: {', '.join(sorted(LOSSES))}") from None


register_loss("kd", kd_loss_terms, pack_loss_terms)  # Hinton et al. (2015)
