"""What more than one method's loss uses: the hard-label term, logit standardization, a knob's per-member view and the
student / teacher logits a distillation term sees (the divergences: :mod:`~kd_tune.distill.losses.divergences`). Each
function works for one student ([B, C] logits, Python number knobs) and a pack ([K, B, C] logits, [K] tensor knobs)
alike."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Knob = float | torch.Tensor
"""A numeric knob (alpha, temperature, a method's weight): a Python number for one student, a [K] tensor for a pack."""


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch mean of the cross-entropy on the labels: a scalar for [B, C] logits, [K] for a pack's [K, B, C]."""
    if student_logits.dim() == 2:
        return F.cross_entropy(student_logits, labels)
    k, b, classes = student_logits.shape
    return F.cross_entropy(student_logits.reshape(k * b, classes), labels.reshape(k * b), reduction="none").view(k, b).mean(1)


def standardized(logits: torch.Tensor) -> torch.Tensor:
    r"""Logit standardization (Sun, Ren, Li, Wang & Cao (2024), "Logit Standardization in Knowledge Distillation",
    CVPR 2024): each row z-scored over the classes, :math:`(z - \bar z) / (10^{-7} + \sigma(z))`, with torch.std's
    unbiased standard deviation, as their code does. The temperature then divides the standardized logits."""
    return (logits - logits.mean(-1, keepdim=True)) / (1e-7 + logits.std(-1, keepdim=True))


def per_member(value: Knob, dims: int) -> Knob:
    """A knob as it broadcasts against a pack's per-row tensors: a [K] tensor viewed as [K, 1, ...] (``dims`` ones);
    a number (one student) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.view(-1, *([1] * dims))
    return value


def distilled_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, has_teacher: torch.Tensor | None, used: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's logits as a pack's distillation term sees them. A member without a teacher
    (``has_teacher`` False) has a zero teacher row, whatever its row holds (a live pack fills it with zeros, a test with
    NaN), and a member whose total does not use the term (not ``used``; default: without a teacher) gets no gradient
    through it: its backward would multiply a zero by whatever the teacher holds, and 0 * NaN is NaN. The caller zeroes
    such a member's term. ``has_teacher`` None (every member has one, or one student): the logits as they are."""
    if has_teacher is None:
        return student_logits, teacher_logits
    used = has_teacher if used is None else used
    z = torch.where(used[:, None, None], student_logits, student_logits.detach())
    return z, torch.where(has_teacher[:, None, None], teacher_logits, 0.0)


def distill_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, has_teacher: torch.Tensor | bool | None, like: torch.Tensor,
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A method's distillation term, ``term(z, t)`` of the logits as :func:`distilled_logits` gives them, for one
    student or each member of a pack; zero (shaped as ``like``, the hard-label term) without a teacher, and exactly zero
    for a pack's members without one (``has_teacher`` False), whatever their teacher rows hold."""
    if teacher_logits is None or has_teacher is False:
        return torch.zeros_like(like)
    has = has_teacher if isinstance(has_teacher, torch.Tensor) else None
    distill = term(*distilled_logits(student_logits, teacher_logits, has))
    return distill if has is None else torch.where(has, distill, 0.0)
