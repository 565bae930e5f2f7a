"""Divergences between two distributions given by their log-probabilities, row by row: the KL (every method's building
block) and the five of kd's ``divergence`` knob. All in log space, so that a confident teacher (probabilities that
underflow) gives no NaN in value or gradient. For one student ([B, C]) and a pack ([K, B, C], knobs [K, 1, 1]) alike."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_tune.distill.losses.common import Knob, standardized

LOG_HALF = math.log(0.5)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    r""":math:`KL(p \| q) = \sum_c p_c (\log p_c - \log q_c)` of each row, from log-probabilities (so an underflowing
    probability gives no NaN): [..., B, C] -> [..., B]."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def log_of(value: Knob) -> Knob:
    """log of a number or a tensor (a knob used as a log-space weight)."""
    return torch.log(value) if isinstance(value, torch.Tensor) else math.log(value)


def log1m(value: Knob) -> Knob:
    """log(1 - value) of a number or a tensor."""
    return torch.log1p(-value) if isinstance(value, torch.Tensor) else math.log1p(-value)


def divergence_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Knob, divergence: str, skew: Knob, standardize: bool,
) -> torch.Tensor:
    r"""Each row's divergence D(p_t, p_s) between p_t = softmax(t / T) and p_s = softmax(z / T), [..., B, C] -> [..., B]
    (``temperature`` and ``skew`` numbers or [K, 1, 1]), all in log space so that a confident teacher gives no NaN:

    .. math::
        forward\_kl: KL(p_t \| p_s) \qquad reverse\_kl: KL(p_s \| p_t) \\
        js: \tfrac12 KL(p_t \| m) + \tfrac12 KL(p_s \| m), \quad m = \tfrac12 (p_t + p_s) \\
        skew\_kl: KL(p_t \| \lambda p_t + (1 - \lambda) p_s) \qquad skew\_reverse\_kl: KL(p_s \| \lambda p_s + (1 - \lambda) p_t)

    with :math:`\lambda` = ``skew``, the log of a mixture by ``logaddexp``. ``standardize``: both logits z-scored first
    (:func:`~kd_tune.distill.losses.common.standardized`).
    """
    if standardize:
        student_logits, teacher_logits = standardized(student_logits), standardized(teacher_logits)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl":
        return kl_rows(log_t, log_s)
    if divergence == "reverse_kl":
        return kl_rows(log_s, log_t)
    if divergence == "js":
        log_m = torch.logaddexp(log_t, log_s) + LOG_HALF
        return 0.5 * (kl_rows(log_t, log_m) + kl_rows(log_s, log_m))
    if divergence == "skew_kl":
        return kl_rows(log_t, torch.logaddexp(log_t + log_of(skew), log_s + log1m(skew)))
    if divergence == "skew_reverse_kl":
        return kl_rows(log_s, torch.logaddexp(log_s + log_of(skew), log_t + log1m(skew)))
    raise ValueError(f"divergence {divergence!r}: allowed forward_kl, reverse_kl, js, skew_kl, skew_reverse_kl")
