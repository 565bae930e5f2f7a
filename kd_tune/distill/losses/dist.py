"""DIST (``dist``): distillation by the correlation of the student's and the teacher's predictions, between the classes
of each image and between the images of each class (Huang et al., NeurIPS 2022). One function for one student and a
pack alike."""

from __future__ import annotations

import torch

from kd_tune.distill.losses.common import Knob, distill_term, hard_loss, per_member
from kd_tune.distill.losses.registry import KDLossTerms, register_loss

EPS = 1e-8
"""The authors' eps in the cosine similarity's denominator."""


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Pearson's correlation of ``a`` and ``b`` along ``dim``, as the authors compute it: the cosine similarity of the
    mean-centred vectors, :math:`\sum a' b' / (\|a'\| \|b'\| + 10^{-8})`."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + EPS)


def dist_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: Knob,
    temperature: Knob,
    *,
    epoch: int = 1,
    inter_weight: Knob = 1.0,
    intra_weight: Knob = 1.0,
    has_teacher: torch.Tensor | bool | None = None,
) -> KDLossTerms:
    r"""Huang, You, Wang, Qian & Xu (2022), "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022 (reference
    code: hunto/DIST_KD, ``classification/losses/dist_kd.py``):

    .. math::
        L = \alpha \, CE(z_s, y) + T^2 \, (\beta \, (1 - \tfrac1B \textstyle\sum_b \rho(Y_{s,b:}, Y_{t,b:}))
            + \gamma \, (1 - \tfrac1C \textstyle\sum_c \rho(Y_{s,:c}, Y_{t,:c})))

    with Y = softmax(z / T) [B, C], \rho Pearson's correlation (:func:`pearson`): the inter-class relation
    compares each image's predictions over the classes, the intra-class relation each class's predictions over the
    batch. DIST weights its own terms: alpha weights the cross-entropy only (no 1 - alpha). The paper's defaults:
    ``inter_weight`` (its beta) and ``intra_weight`` (its gamma) 1 on ImageNet (2 on CIFAR-100), T 1 on ImageNet (4 on
    CIFAR-100), CE weight 1. ``epoch``: unused (every loss takes it).

    One student ([B, C] logits, number knobs: scalar terms) or a pack ([K, B, C], [K] knobs and ``has_teacher``: [K]
    terms). Without a teacher (``teacher_logits`` None, ``has_teacher`` False) the distillation term is zero.
    """
    def term(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temp = per_member(temperature, 2)
        y_s, y_t = (z / temp).softmax(-1), (t / temp).softmax(-1)
        inter = 1 - pearson(y_s, y_t, dim=-1).mean(-1)  # per image, over the classes
        intra = 1 - pearson(y_s, y_t, dim=-2).mean(-1)  # per class, over the batch
        return temperature**2 * (inter_weight * inter + intra_weight * intra)

    hard = hard_loss(student_logits, labels)
    distill = distill_term(student_logits, teacher_logits, has_teacher, hard, term)
    return KDLossTerms(hard, distill, alpha * hard + distill)


register_loss("dist", dist_loss_terms, dist_loss_terms)  # Huang et al. (2022)
