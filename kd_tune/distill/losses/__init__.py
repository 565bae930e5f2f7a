"""Distillation losses by name: small pure functions, each with its formula and citation, in a registry.

One module per method (as mdistiller's ``distillers/``): :mod:`~kd_tune.distill.losses.kd` (Hinton's, with its
divergence and logit standardization as knobs), :mod:`~kd_tune.distill.losses.dkd` (decoupled KD) and
:mod:`~kd_tune.distill.losses.dist` (DIST), registered under the names of ``kd_tune.space.methods.METHODS`` with
exactly its knobs as keyword arguments; what they share: :mod:`~kd_tune.distill.losses.divergences` (KL and kd's
divergences, in log space) and :mod:`~kd_tune.distill.losses.common`; the registry: :mod:`~kd_tune.distill.losses.registry`. A loss gives the batch means of its hard-label term, its distillation term
and their weighted total (:class:`KDLossTerms`) for one student (``terms``) and, where it can, for each member of a
pack at once (``pack_terms``, shapes [K]); both take ``(student_logits, teacher_logits or None, labels, alpha,
temperature, *, epoch, has_teacher, **knobs)`` (:data:`~kd_tune.distill.losses.registry.TermsFn`). The training
loops look a loss up by name (:func:`get_loss`); a new loss is a module whose function(s) it registers with
:func:`register_loss`, imported here.
"""

from __future__ import annotations

# The methods: each module registers itself on import (they import the registry, never this package).
from kd_tune.distill.losses import dist, dkd, kd
from kd_tune.distill.losses.dist import dist_loss_terms
from kd_tune.distill.losses.dkd import dkd_loss_terms
from kd_tune.distill.losses.kd import kd_loss, kd_loss_terms, pack_loss_terms
from kd_tune.distill.losses.registry import DEFAULT_LOSS, LOSSES, KDLossTerms, Loss, TermsFn, get_loss, register_loss

__all__ = [
    "DEFAULT_LOSS", "LOSSES", "KDLossTerms", "Loss", "TermsFn", "dist", "dist_loss_terms", "dkd", "dkd_loss_terms", "get_loss", "kd",
    "kd_loss", "kd_loss_terms", "pack_loss_terms", "register_loss",
]
