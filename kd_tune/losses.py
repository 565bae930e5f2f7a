"""The knowledge-distillation loss: a small pure function."""

from __future__ import annotations

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
