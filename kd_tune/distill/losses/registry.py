"""The loss registry itself: :class:`KDLossTerms`, :class:`Loss`, :data:`LOSSES`, :func:`register_loss`,
:func:`get_loss`. A leaf, as ``kd_tune.distill.models.registry`` is: the method modules (``kd.py``, ``dkd.py``,
``dist.py``) import it to register themselves, and :mod:`kd_tune.distill.losses` re-exports it and imports the methods,
so imports run one way only (package -> methods -> registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


class KDLossTerms(NamedTuple):
    """The batch means of the hard-label loss, the distillation loss and their weighted total
    (scalars for one student, [K] for a pack: each member's own)."""

    hard: torch.Tensor
    distill: torch.Tensor
    total: torch.Tensor


TermsFn = Callable[..., KDLossTerms]
"""``terms(student_logits, teacher_logits or None, labels, alpha, temperature, *, epoch=1, has_teacher=None, **knobs)``.

One student: logits [B, C], labels [B], alpha, temperature and the numeric knobs Python numbers; terms are scalars.
A pack: logits [K, B, C], labels [K, B], alpha, temperature and every numeric knob [K] float tensors, ``has_teacher``
[K] bool or None; terms are [K]. Categorical knobs (``divergence``, ``standardize``) are plain values shared by every
member of the call. ``epoch`` is 1-based. The knob names are those of ``kd_tune.space.methods.METHODS``."""


@dataclass(frozen=True)
class Loss:
    """A registered loss: its one-student form and, if it has one, its pack form (every member at once)."""

    name: str
    terms: TermsFn
    pack_terms: TermsFn | None = None
    """The same signature on a pack's [K, ...] tensors (:data:`TermsFn`); None: students trained with this loss do not pack."""


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
