"""Hinton's knowledge distillation (``kd``), with the divergence between the softened distributions and logit
standardization as its knobs. Its defaults (forward KL, no standardization) are Hinton's loss, computed by the very
code it always was (bit for bit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_tune.distill.losses.common import Knob, distilled_logits, hard_loss, per_member
from kd_tune.distill.losses.divergences import divergence_rows
from kd_tune.distill.losses.registry import KDLossTerms, register_loss


def kd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    *,
    epoch: int = 1,
    divergence: str = "forward_kl",
    skew: float = 0.1,
    standardize: bool = False,
    has_teacher: bool | None = None,
) -> KDLossTerms:
    r"""Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531:

    .. math::
        L = \alpha \, CE(z_s, y) + (1 - \alpha) \, T^2 \, KL(softmax(z_t / T) \,\|\, softmax(z_s / T))

    alpha weights the hard labels, as in the study (alpha = 1 is training from scratch). The T^2
    factor keeps the soft term's gradients on the same scale as the hard term's whatever T is
    (the soft gradients shrink as 1/T^2). Both terms are means over the batch; KL uses log-space
    targets so that a confident teacher (probabilities that underflow) gives no NaN.
    With ``teacher_logits=None`` (or ``has_teacher`` False) the distillation term is zero (the scratch baseline).

    Knobs (``kd_tune.space.methods.METHODS["kd"]``): ``divergence`` replaces the KL (:func:`~kd_tune.distill.losses.divergences.divergence_rows`: forward_kl,
    Hinton's and the default; reverse_kl, MiniLLM's (Gu et al., ICLR 2024); js; skew_kl and skew_reverse_kl with skew
    ``skew``, DistiLLM's (Ko et al., ICML 2024; default 0.1)), always times T^2; ``standardize`` z-scores both logits
    before the temperature (Sun et al., CVPR 2024; default off). ``epoch``: unused (every loss takes it).
    """
    hard = hard_loss(student_logits, labels)
    if teacher_logits is None or has_teacher is False:
        distill = torch.zeros((), dtype=hard.dtype, device=hard.device)
    elif divergence == "forward_kl" and not standardize:  # Hinton's loss, exactly as it always was computed
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        distill = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    else:
        distill = divergence_rows(student_logits, teacher_logits, temperature, divergence, skew, standardize).mean() * temperature**2
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
    *,
    epoch: int = 1,
    divergence: str = "forward_kl",
    skew: Knob = 0.1,
    standardize: bool = False,
) -> KDLossTerms:
    r"""``kd_loss_terms`` for each member of a pack: terms of shape [K], each its member's batch mean.

    For member k with logits z_k [B, classes], labels y_k, teacher logits t_k, alpha_k and T_k (Hinton et al. 2015):

    .. math::
        hard_k = \frac{1}{B} \sum_b CE(z_{kb}, y_{kb}), \quad
        distill_k = \frac{T_k^2}{B} \sum_b KL(softmax(t_{kb} / T_k) \,\|\, softmax(z_{kb} / T_k)) \\
        total_k = hard_k \text{ if } \alpha_k = 1, \text{ else } \alpha_k \, hard_k + (1 - \alpha_k) \, distill_k

    with KL on log-space targets (or the divergence ``divergence``, skew ``skew`` [K], ``standardize``: as in
    :func:`kd_loss_terms`). A member without a teacher (``has_teacher`` False; all of them when
    ``teacher_logits`` is None) has distill_k = 0 exactly, whatever its row of ``teacher_logits`` holds.
    Shapes: logits [K, B, classes], labels [K, B], alpha / temperature / has_teacher / skew [K].
    Train on ``total.sum()``: members share no parameter, so each one's gradient is its own.
    """
    hard = hard_loss(student_logits, labels)
    if teacher_logits is None:
        distill = torch.zeros_like(hard)
    else:
        has = torch.ones(hard.shape[0], dtype=torch.bool, device=hard.device) if has_teacher is None else has_teacher
        # A member whose total ignores the distillation term (alpha 1) gets no gradient through it either.
        z, t = distilled_logits(student_logits, teacher_logits, has, used=has & (alpha != 1))
        temp = temperature[:, None, None]
        if divergence == "forward_kl" and not standardize:  # Hinton's loss, exactly as it always was computed
            kl = F.kl_div(F.log_softmax(z / temp, dim=-1), F.log_softmax(t / temp, dim=-1), reduction="none", log_target=True)
            rows = kl.sum(-1)
        else:
            rows = divergence_rows(z, t, temp, divergence, per_member(skew, 2), standardize)
        distill = torch.where(has, rows.mean(1) * temperature**2, 0.0)
    total = torch.where(alpha == 1, hard, alpha * hard + (1 - alpha) * distill)
    return KDLossTerms(hard, distill, total)


register_loss("kd", kd_loss_terms, pack_loss_terms)  # Hinton et al. (2015)
