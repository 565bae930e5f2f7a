from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_tune.distill.losses import LOSSES, get_loss, kd_loss, kd_loss_terms
from kd_tune.space.methods import METHODS

STUDENT = [[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]]
TEACHER = [[3.0, 0.5, -0.5], [0.0, 4.0, 1.0]]
LABELS = [0, 2]


def reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, temp: float) -> tuple[float, float, float]:
    """The formula written out in float64 numpy, independently of torch."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    p_t = np.exp(log_softmax(t / temp))
    kl = (p_t * (log_softmax(t / temp) - log_softmax(s / temp))).sum(axis=1).mean() * temp**2
    return ce, kl, alpha * ce + (1 - alpha) * kl


# Values computed by hand-checked numpy (the CE of the two rows is 0.4170 and 3.6532 by hand).
PRECOMPUTED = [
    (0.5, 3.0, 2.0351041117, 0.3362027526, 1.1856534322),
    (0.0, 1.0, 2.0351041117, 0.1163921887, 0.1163921887),
    (0.3, 5.0, 2.0351041117, 0.3803728240, 0.8767922103),
    (1.0, 2.0, 2.0351041117, 0.2734791533, 2.0351041117),
]


@pytest.mark.parametrize("alpha,temp,hard,distill,total", PRECOMPUTED)
def test_precomputed_values(alpha: float, temp: float, hard: float, distill: float, total: float) -> None:
    terms = kd_loss_terms(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), alpha, temp)
    assert terms.hard.item() == pytest.approx(hard, abs=1e-6)
    assert terms.distill.item() == pytest.approx(distill, abs=1e-6)
    assert terms.total.item() == pytest.approx(total, abs=1e-6)
    assert kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), alpha, temp).item() == pytest.approx(total, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temp", [1.0, 3.0, 10.0])
def test_random_batches_match_numpy(alpha: float, temp: float) -> None:
    g = torch.Generator().manual_seed(int(alpha * 10 + temp))
    s, t = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 5
    y = torch.randint(0, 10, (64,), generator=g)
    hard, distill, total = reference(s.double().numpy(), t.double().numpy(), y.numpy(), alpha, temp)
    terms = kd_loss_terms(s.double(), t.double(), y, alpha, temp)
    assert terms.hard.item() == pytest.approx(hard, rel=1e-9)
    assert terms.distill.item() == pytest.approx(distill, rel=1e-9)
    assert terms.total.item() == pytest.approx(total, rel=1e-9)


def test_alpha_one_is_cross_entropy_and_ignores_teacher() -> None:
    s, y = torch.tensor(STUDENT), torch.tensor(LABELS)
    nan_teacher = torch.full_like(s, float("nan"))
    assert torch.equal(kd_loss(s, nan_teacher, y, 1.0, 3.0), F.cross_entropy(s, y))
    assert torch.equal(kd_loss(s, None, y, 1.0, 3.0), F.cross_entropy(s, y))


def test_identical_logits_have_zero_distillation_loss() -> None:
    s = torch.randn(8, 10)
    terms = kd_loss_terms(s, s.clone(), torch.zeros(8, dtype=torch.long), 0.0, 4.0)
    assert terms.distill.item() == pytest.approx(0.0, abs=1e-6)


def test_confident_teacher_gives_finite_loss() -> None:
    # Softmax probabilities of exp(-1000) underflow to 0; log-space KL must stay finite.
    teacher = torch.tensor([[1000.0, 0.0, -1000.0]])
    terms = kd_loss_terms(torch.zeros(1, 3), teacher, torch.tensor([0]), 0.0, 1.0)
    assert torch.isfinite(terms.total)


def test_gradient_flows_to_student_only() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kd_loss(s, t.detach(), torch.zeros(4, dtype=torch.long), 0.5, 3.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_the_registry_names_the_methods_and_their_knobs() -> None:
    """kd_tune.space.methods (what a search space may say) and the loss registry (what trains) name the same methods,
    and each registered function takes every knob of its method as a keyword, defaulting to the method's default (so a
    knob a trial leaves out means the same in both). The methods' losses themselves: tests/test_losses_methods.py."""
    assert set(LOSSES) == set(METHODS)
    for name, method in METHODS.items():
        loss = get_loss(name)
        for fn in (loss.terms, loss.pack_terms):
            assert fn is not None
            params = inspect.signature(fn).parameters
            for knob in method.knobs:
                assert knob.name in params, f"{name}: {fn.__name__} has no knob {knob.name}"
                assert params[knob.name].default == knob.default, f"{name}: {fn.__name__}'s {knob.name} defaults to {params[knob.name].default}"
            assert {"epoch", "has_teacher"} <= set(params)
