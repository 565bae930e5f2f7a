"""Decoupled knowledge distillation (``dkd``): the KL split into a target-class and a non-target-class term, each with
its own weight (Zhao et al., CVPR 2022). One function for one student and a pack alike."""

from __future__ import annotations

import torch

from kd_tune.distill.losses.common import Knob, distill_term, hard_loss, per_member, standardized
from kd_tune.distill.losses.divergences import kl_rows
from kd_tune.distill.losses.registry import KDLossTerms, register_loss


def warmup_factor(epoch: int, warmup: Knob) -> Knob:
    """min(epoch / warmup, 1), and 1 for warmup 0 (no warm-up); ``warmup`` a number or a [K] tensor."""
    if isinstance(warmup, torch.Tensor):
        return torch.where(warmup > 0, (epoch / warmup).clamp(max=1.0), 1.0)
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0


def decoupled_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: Knob) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each row's (TCKD, NCKD), [..., B, C] -> two [..., B] (``temperature`` a number or [K, 1, 1]).

    With p = softmax(z / T) and y the label: TCKD = KL(b_t || b_s) of the binary b = [p_y, 1 - p_y]; NCKD = KL of the
    softmax over the classes other than y (of z / T). In log space, stably (mdistiller takes the log of b's
    probabilities): log p_y = z_y / T - lse(z / T) and log(1 - p_y) = lse_{c != y}(z_c / T) - lse(z / T).
    """
    classes = student_logits.shape[-1]
    y = labels.unsqueeze(-1)  # [..., B, 1]
    others = torch.arange(classes - 1, device=labels.device)
    others = others + (others >= y)  # [..., B, C - 1]: each row's non-target classes, in order

    def parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = logits / temperature
        lse = z.logsumexp(-1)
        rest = z.gather(-1, others)
        lse_rest = rest.logsumexp(-1)
        binary = torch.stack([z.gather(-1, y).squeeze(-1) - lse, lse_rest - lse], dim=-1)  # log [p_y, 1 - p_y]
        return binary, rest - lse_rest.unsqueeze(-1)  # and the log-softmax over the non-target classes

    binary_s, rest_s = parts(student_logits)
    binary_t, rest_t = parts(teacher_logits)
    return kl_rows(binary_t, binary_s), kl_rows(rest_t, rest_s)


def dkd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: Knob,
    temperature: Knob,
    *,
    epoch: int = 1,
    tckd_weight: Knob = 1.0,
    nckd_weight: Knob = 8.0,
    warmup: Knob = 20,
    standardize: bool = False,
    has_teacher: torch.Tensor | bool | None = None,
) -> KDLossTerms:
    r"""Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled Knowledge Distillation", CVPR 2022 (reference code:
    megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``):

    .. math::
        L = \alpha \, CE(z_s, y) + \min(e / w, 1) \, T^2 \, (\alpha_{TC} \, KL(b_t \| b_s) + \beta_{NC} \, KL(\hat p_t \| \hat p_s))

    with p = softmax(z / T), b = [p_y, 1 - p_y] the target-versus-rest binary distribution (TCKD), \hat p the softmax
    over the non-target classes alone (NCKD; :func:`decoupled_rows`), e the epoch (1-based) and w = ``warmup``
    (0: factor 1); each KL a batch mean. DKD weights its own terms: alpha weights the cross-entropy only (no 1 - alpha).
    The paper's defaults: ``tckd_weight`` (its alpha) 1.0, ``nckd_weight`` (its beta) 8.0 (CIFAR-100, resnet32x4 ->
    resnet8x4), ``warmup`` 20 epochs (of 240), T 4, CE weight 1. ``standardize``: logit standardization first
    (:func:`~kd_tune.distill.losses.common.standardized`, Sun et al., CVPR 2024).

    One student ([B, C] logits, number knobs: scalar terms) or a pack ([K, B, C], [K] knobs and ``has_teacher``: [K]
    terms). Without a teacher (``teacher_logits`` None, ``has_teacher`` False) the distillation term is zero.
    """
    def term(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if standardize:
            z, t = standardized(z), standardized(t)
        tckd, nckd = decoupled_rows(z, t, labels, per_member(temperature, 2))
        return warmup_factor(epoch, warmup) * temperature**2 * (tckd_weight * tckd.mean(-1) + nckd_weight * nckd.mean(-1))

    hard = hard_loss(student_logits, labels)
    distill = distill_term(student_logits, teacher_logits, has_teacher, hard, term)
    return KDLossTerms(hard, distill, alpha * hard + distill)


register_loss("dkd", dkd_loss_terms, dkd_loss_terms)  # Zhao et al. (2022)
