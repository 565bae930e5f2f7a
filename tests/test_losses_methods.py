"""The distillation methods' losses (kd_tune.distill.losses: kd with its divergences and logit standardization, dkd,
dist) against their papers' formulas written out independently here (float64, row by row, plain numpy), against
hand-worked tiny cases, and the pack form against the one-student form; kd's default is Hinton's loss bit for bit;
a pack that mixes methods trains each member as ``train`` trains it alone. (That the registry names the methods and
knobs of kd_tune.space.methods: tests/test_losses.py.)"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_tune.distill.epochs import EpochMetrics
from kd_tune.distill.losses import LOSSES, KDLossTerms, get_loss, kd_loss_terms, pack_loss_terms, register_loss
from kd_tune.distill.models import build, model_args
from kd_tune.distill.pack_train import Member, PackData, loss_groups, pack_epoch, train_pack
from kd_tune.distill.packed import pack_from_state_dicts
from kd_tune.distill.train import TensorData, make_optimizer, train
from kd_tune.space.methods import DIVERGENCES

from .helpers import LOSS_REL

LN3 = math.log(3.0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # polite on a shared 2-core machine, and what a 1-CPU trial gets
    yield
    torch.set_num_threads(threads)


# --- the papers' formulas, row by row in float64 (nothing shared with the code under test) ------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))


def zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean()) / (1e-7 + z.std(ddof=1))


def cross_entropy(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([-math.log(softmax(s[b])[y[b]]) for b in range(len(y))]))


def kd_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, temp: float, divergence: str, skew: float,
                 standardize: bool) -> tuple[float, float, float]:
    rows = []
    for zs, zt in zip(s, t, strict=True):
        if standardize:
            zs, zt = zscore(zs), zscore(zt)
        ps, pt = softmax(zs / temp), softmax(zt / temp)
        if divergence == "forward_kl":
            rows.append(kl(pt, ps))
        elif divergence == "reverse_kl":
            rows.append(kl(ps, pt))
        elif divergence == "js":
            m = (pt + ps) / 2
            rows.append(0.5 * kl(pt, m) + 0.5 * kl(ps, m))
        elif divergence == "skew_kl":
            rows.append(kl(pt, skew * pt + (1 - skew) * ps))
        else:
            rows.append(kl(ps, skew * ps + (1 - skew) * pt))
    hard, distill = cross_entropy(s, y), temp**2 * float(np.mean(rows))
    return hard, distill, hard if alpha == 1 else alpha * hard + (1 - alpha) * distill


def dkd_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, temp: float, epoch: int, tckd_weight: float,
                  nckd_weight: float, warmup: int, standardize: bool) -> tuple[float, float, float]:
    tckd, nckd = [], []
    for zs, zt, label in zip(s, t, y, strict=True):
        if standardize:
            zs, zt = zscore(zs), zscore(zt)
        ps, pt = softmax(zs / temp), softmax(zt / temp)
        tckd.append(kl(np.array([pt[label], 1 - pt[label]]), np.array([ps[label], 1 - ps[label]])))
        others = [c for c in range(len(zs)) if c != label]
        nckd.append(kl(softmax(zt[others] / temp), softmax(zs[others] / temp)))
    ramp = min(epoch / warmup, 1.0) if warmup else 1.0
    hard = cross_entropy(s, y)
    distill = ramp * temp**2 * (tckd_weight * float(np.mean(tckd)) + nckd_weight * float(np.mean(nckd)))
    return hard, distill, alpha * hard + distill


def pearson_reference(u: np.ndarray, v: np.ndarray) -> float:
    u, v = u - u.mean(), v - v.mean()
    return float((u * v).sum() / (math.sqrt((u * u).sum()) * math.sqrt((v * v).sum()) + 1e-8))


def dist_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, temp: float, inter_weight: float,
                   intra_weight: float) -> tuple[float, float, float]:
    ys = np.stack([softmax(z / temp) for z in s])
    yt = np.stack([softmax(z / temp) for z in t])
    inter = 1 - float(np.mean([pearson_reference(ys[b], yt[b]) for b in range(ys.shape[0])]))
    intra = 1 - float(np.mean([pearson_reference(ys[:, c], yt[:, c]) for c in range(ys.shape[1])]))
    hard = cross_entropy(s, y)
    distill = temp**2 * (inter_weight * inter + intra_weight * intra)
    return hard, distill, alpha * hard + distill


def _batch(seed: int, b: int = 5, c: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * 2, torch.randn(b, c, generator=g, dtype=torch.float64) * 3, torch.randint(0, c, (b,), generator=g)


def _check(terms: KDLossTerms, want: tuple[float, float, float]) -> None:
    for got, w in zip(terms, want, strict=True):
        assert got.dim() == 0 and got.item() == pytest.approx(w, rel=1e-9, abs=1e-12)


KD_CASES = [(d, sk) for d in DIVERGENCES for sk in ((0.1, 0.6) if d.startswith("skew") else (0.1,))]


@pytest.mark.parametrize("divergence,skew", KD_CASES)
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("seed,classes", [(0, 4), (1, 7), (2, 5)])
def test_kd_matches_its_formula(divergence: str, skew: float, standardize: bool, seed: int, classes: int) -> None:
    s, t, y = _batch(seed, c=classes)
    for alpha, temp in [(0.0, 1.0), (0.5, 4.0), (1.0, 2.0)]:
        terms = kd_loss_terms(s, t, y, alpha, temp, divergence=divergence, skew=skew, standardize=standardize)
        _check(terms, kd_reference(s.numpy(), t.numpy(), y.numpy(), alpha, temp, divergence, skew, standardize))


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("seed,classes", [(0, 4), (1, 7), (2, 5)])
def test_dkd_matches_its_formula(standardize: bool, seed: int, classes: int) -> None:
    s, t, y = _batch(seed, c=classes)
    for alpha, temp, epoch, tw, nw, warmup in [(1.0, 4.0, 1, 1.0, 8.0, 20), (0.5, 1.0, 5, 2.0, 0.5, 10), (1.0, 2.0, 30, 1.0, 8.0, 20),
                                               (0.0, 3.0, 1, 0.5, 2.0, 0), (1.0, 4.0, 4, 1.0, 1.0, 4)]:
        terms = get_loss("dkd").terms(s, t, y, alpha, temp, epoch=epoch, tckd_weight=tw, nckd_weight=nw, warmup=warmup, standardize=standardize)
        _check(terms, dkd_reference(s.numpy(), t.numpy(), y.numpy(), alpha, temp, epoch, tw, nw, warmup, standardize))


@pytest.mark.parametrize("seed,classes", [(0, 4), (1, 7), (2, 5)])
def test_dist_matches_its_formula(seed: int, classes: int) -> None:
    s, t, y = _batch(seed, c=classes)
    for alpha, temp, inter, intra in [(1.0, 1.0, 1.0, 1.0), (0.5, 4.0, 2.0, 2.0), (1.0, 2.0, 0.0, 1.0), (0.3, 1.0, 1.5, 0.0)]:
        terms = get_loss("dist").terms(s, t, y, alpha, temp, epoch=3, inter_weight=inter, intra_weight=intra)
        _check(terms, dist_reference(s.numpy(), t.numpy(), y.numpy(), alpha, temp, inter, intra))


# --- tiny cases by hand ----------------------------------------------------------------------------------------------

# Two classes, one image: the student's logits [0, 0] give p_s = [1/2, 1/2], the teacher's [ln 3, 0] give p_t = [3/4, 1/4].
# Their mixture m = (p_t + p_s) / 2 = [5/8, 3/8]; 0.1 p_t + 0.9 p_s = [0.525, 0.475].
FORWARD = 3 / 4 * math.log(3 / 2) + 1 / 4 * math.log(1 / 2)
TO_M_FROM_T, TO_M_FROM_S = 3 / 4 * math.log(6 / 5) + 1 / 4 * math.log(2 / 3), 1 / 2 * math.log(4 / 5) + 1 / 2 * math.log(4 / 3)
KD_BY_HAND = [
    ("forward_kl", 0.1, FORWARD),
    ("reverse_kl", 0.1, 1 / 2 * math.log(4 / 3)),  # 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4)
    ("js", 0.1, 0.5 * TO_M_FROM_T + 0.5 * TO_M_FROM_S),
    ("skew_kl", 0.5, TO_M_FROM_T),  # skew 1/2: the mixture is m
    ("skew_reverse_kl", 0.5, TO_M_FROM_S),
    ("skew_kl", 0.1, 3 / 4 * math.log(0.75 / 0.525) + 1 / 4 * math.log(0.25 / 0.475)),
    ("skew_reverse_kl", 0.1, 1 / 2 * math.log(0.5 / 0.725) + 1 / 2 * math.log(0.5 / 0.275)),  # 0.1 p_s + 0.9 p_t = [0.725, 0.275]
]


@pytest.mark.parametrize("divergence,skew,value", KD_BY_HAND)
def test_kd_divergences_by_hand(divergence: str, skew: float, value: float) -> None:
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), torch.tensor([1])
    terms = kd_loss_terms(s, t, y, 0.0, 1.0, divergence=divergence, skew=skew)
    assert terms.distill.item() == pytest.approx(value, abs=1e-6) and terms.total.item() == pytest.approx(value, abs=1e-6)
    # T = 2 on twice the teacher's logits: the same distributions, and the term times T^2 = 4
    wide = kd_loss_terms(s, 2 * t, y, 0.0, 2.0, divergence=divergence, skew=skew)
    assert wide.distill.item() == pytest.approx(4 * value, abs=1e-6)


def test_standardized_kd_by_hand() -> None:
    # Two classes [a, b]: the z-score is [1/sqrt 2, -1/sqrt 2] when a > b (mean (a+b)/2, unbiased std |a-b|/sqrt 2),
    # whatever the scale: a student [2, 0] and a teacher [5, 1] agree exactly once standardized.
    y = torch.tensor([0])
    same = kd_loss_terms(torch.tensor([[2.0, 0.0]]), torch.tensor([[5.0, 1.0]]), y, 0.0, 1.0, standardize=True)
    assert same.distill.item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss_terms(torch.tensor([[2.0, 0.0]]), torch.tensor([[5.0, 1.0]]), y, 0.0, 1.0).distill.item() > 0.05
    # Opposite: p_t = [sigma(sqrt 2), sigma(-sqrt 2)], p_s the reverse; KL = (2 p - 1) ln(p / (1 - p)) = sqrt 2 tanh(sqrt 2 / 2).
    opposite = kd_loss_terms(torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 0.0]]), y, 0.0, 1.0, standardize=True)
    assert opposite.distill.item() == pytest.approx(math.sqrt(2) * math.tanh(math.sqrt(2) / 2), abs=1e-6)


def test_dkd_by_hand() -> None:
    dkd = get_loss("dkd").terms
    # Three classes, label 0: the student [0, 0, 0] gives p_s = [1/3, 1/3, 1/3], the teacher [0, ln 3, 0] p_t = [1/5, 3/5, 1/5].
    # TCKD = KL([1/5, 4/5] || [1/3, 2/3]); the non-target classes: teacher [3/4, 1/4], student [1/2, 1/2].
    tckd = 1 / 5 * math.log(3 / 5) + 4 / 5 * math.log(6 / 5)
    nckd = 3 / 4 * math.log(3 / 2) + 1 / 4 * math.log(1 / 2)
    terms = dkd(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, LN3, 0.0]]), torch.tensor([0]), 1.0, 1.0,
                epoch=2, tckd_weight=1.0, nckd_weight=8.0, warmup=4)
    assert terms.hard.item() == pytest.approx(LN3, abs=1e-6)
    assert terms.distill.item() == pytest.approx(2 / 4 * (tckd + 8 * nckd), abs=1e-6)  # epoch 2 of a 4-epoch warm-up: half
    assert terms.total.item() == pytest.approx(LN3 + 2 / 4 * (tckd + 8 * nckd), abs=1e-6)  # CE weight 1, no 1 - alpha
    # Two classes: one non-target class, so NCKD = 0, and [p_y, 1 - p_y] is the whole distribution: DKD is
    # tckd_weight times KD's forward KL (label 1: [1/4, 3/4] against [1/2, 1/2]); warm-up 0: no ramp.
    two = dkd(torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), torch.tensor([1]), 0.0, 1.0, epoch=1, tckd_weight=2.0, warmup=0)
    assert two.distill.item() == pytest.approx(2 * FORWARD, abs=1e-6) and two.total.item() == pytest.approx(2 * FORWARD, abs=1e-6)


def test_dist_by_hand() -> None:
    # Two images of two classes: every centred pair of vectors is +-[d, -d], so every Pearson correlation is the sign
    # of the product: +1 when the student ranks as the teacher does (inter = intra = 0), -1 when it ranks the other way
    # (inter = intra = 2, distill = T^2 (2 beta + 2 gamma)).
    dist, s, y = get_loss("dist").terms, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    agree = dist(s, torch.tensor([[2.0, 0.0], [0.0, 3.0]]), y, 1.0, 2.0, inter_weight=1.0, intra_weight=0.5)
    assert agree.distill.item() == pytest.approx(0.0, abs=1e-6)
    disagree = dist(s, torch.tensor([[0.0, 2.0], [3.0, 0.0]]), y, 0.5, 2.0, inter_weight=1.0, intra_weight=0.5)
    assert disagree.distill.item() == pytest.approx(4 * (2 * 1.0 + 2 * 0.5), rel=1e-6)
    ce = math.log(1 + math.exp(-1))  # each image: its label's logit 1, the other's 0
    assert disagree.hard.item() == pytest.approx(ce, abs=1e-6) and disagree.total.item() == pytest.approx(0.5 * ce + 12, rel=1e-6)


# --- kd's default is Hinton's loss, bit for bit ------------------------------------------------------------------


def old_kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float,
                      temperature: float) -> KDLossTerms:
    """kd_tune/distill/losses.py's kd_loss_terms before methods were an axis (commit 2f1f9f4), verbatim."""
    hard = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        distill = torch.zeros((), dtype=hard.dtype, device=hard.device)
    else:
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        distill = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        total = hard
    else:
        total = alpha * hard + (1.0 - alpha) * distill
    return KDLossTerms(hard, distill, total)


def old_pack_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: torch.Tensor,
                        temperature: torch.Tensor, has_teacher: torch.Tensor | None = None) -> KDLossTerms:
    """The same file's pack_loss_terms, verbatim."""
    k, b, classes = student_logits.shape
    hard = F.cross_entropy(student_logits.reshape(k * b, classes), labels.reshape(k * b), reduction="none").view(k, b).mean(1)
    if teacher_logits is None:
        distill = torch.zeros_like(hard)
    else:
        has = torch.ones(k, dtype=torch.bool, device=hard.device) if has_teacher is None else has_teacher
        used = (has & (alpha != 1))[:, None, None]
        z = torch.where(used, student_logits, student_logits.detach())
        t = torch.where(has[:, None, None], teacher_logits, 0.0)
        temp = temperature[:, None, None]
        kl = F.kl_div(F.log_softmax(z / temp, dim=-1), F.log_softmax(t / temp, dim=-1), reduction="none", log_target=True)
        distill = torch.where(has, kl.sum(-1).mean(1) * temperature**2, 0.0)
    total = torch.where(alpha == 1, hard, alpha * hard + (1 - alpha) * distill)
    return KDLossTerms(hard, distill, total)


def _values_and_grad(fn: Callable[[torch.Tensor], KDLossTerms], z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    z = z.clone().requires_grad_(True)
    terms = fn(z)
    terms.total.sum().backward()
    assert z.grad is not None
    return [t.detach() for t in terms], z.grad


def test_kd_default_is_the_old_loss_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    z, t, y = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 4, torch.randint(0, 10, (32,), generator=g)
    kd = get_loss("kd").terms
    for alpha, temp in [(0.0, 1.0), (0.5, 3.0), (0.3, 10.0), (1.0, 4.0)]:
        for teacher in (t, None):
            want = _values_and_grad(lambda zz: old_kd_loss_terms(zz, teacher, y, alpha, temp), z)  # noqa: B023
            # as train_epoch calls it: the method's full default knobs, the epoch
            for got in (_values_and_grad(lambda zz: kd(zz, teacher, y, alpha, temp, epoch=7, divergence="forward_kl", standardize=False), z),  # noqa: B023
                        _values_and_grad(lambda zz: kd_loss_terms(zz, teacher, y, alpha, temp), z)):  # noqa: B023
                assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True)) and torch.equal(got[1], want[1])


def test_kd_pack_default_is_the_old_loss_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(4)
    z, t, y = torch.randn(5, 24, 10, generator=g) * 3, torch.randn(5, 24, 10, generator=g) * 4, torch.randint(0, 10, (5, 24), generator=g)
    t[4] = float("nan")  # a scratch member's row: never read
    alpha, temp = torch.tensor([0.0, 0.5, 1.0, 0.3, 1.0]), torch.tensor([1.0, 3.0, 4.0, 10.0, 3.0])
    has = torch.tensor([True, True, True, True, False])
    want = _values_and_grad(lambda zz: old_pack_loss_terms(zz, t, y, alpha, temp, has), z)
    got = _values_and_grad(lambda zz: pack_loss_terms(zz, t, y, alpha, temp, has), z)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True)) and torch.equal(got[1], want[1])
    # what pack_epoch calls for a pack of kd members with default knobs: one group, the whole tensors, the same bits
    members = [Member(seed=0, epochs=1, alpha=float(a), temperature=float(tt), teacher=0 if h else None) for a, tt, h in zip(alpha, temp, has, strict=True)]
    groups, order = loss_groups(members, torch.device("cpu"))
    assert len(groups) == 1 and groups[0].rows is None and order is None
    grouped = _values_and_grad(lambda zz: groups[0].terms(zz, t, y, epoch=2), z)
    assert all(torch.equal(a, b) for a, b in zip(grouped[0], want[0], strict=True)) and torch.equal(grouped[1], want[1])


# --- the pack form is the one-student form, member by member ----------------------------------------------------

# Each call's members differ in alpha, T and the numeric knobs; the categorical knobs are the call's.
PACK_CASES: list[tuple[str, dict[str, Any], dict[str, list[float]]]] = [
    *[("kd", {"divergence": d, "standardize": ls}, {"skew": [0.1, 0.5, 0.9, 0.3, 0.2, 0.7]}) for d in DIVERGENCES for ls in (False, True)],
    *[("dkd", {"standardize": ls}, {"tckd_weight": [1.0, 0.5, 2.0, 1.0, 1.0, 0.0], "nckd_weight": [8.0, 2.0, 1.0, 0.5, 4.0, 8.0],
                                    "warmup": [20, 0, 2, 5, 1, 20]}) for ls in (False, True)],
    ("dist", {}, {"inter_weight": [1.0, 2.0, 0.0, 0.5, 1.0, 1.0], "intra_weight": [1.0, 2.0, 1.0, 0.0, 3.0, 1.0]}),
]


@pytest.mark.parametrize("method,categorical,numeric", PACK_CASES)
def test_pack_form_is_the_one_student_form_per_member(method: str, categorical: dict[str, Any], numeric: dict[str, list[float]]) -> None:
    loss = get_loss(method)
    assert loss.pack_terms is not None
    # float64: the two forms' sums run in different orders, and in float32 a KL of two close distributions (a skewed
    # mixture is close to its own end) keeps only a few digits of its terms' rounding (2.8e-6 relative, measured).
    g = torch.Generator().manual_seed(len(method) + len(categorical))
    z, t = (torch.randn(6, 16, 7, generator=g, dtype=torch.float64) * scale for scale in (3, 4))
    y = torch.randint(0, 7, (6, 16), generator=g)
    alphas, temps = [0.0, 0.5, 1.0, 0.3, 0.9, 0.5], [1.0, 3.0, 4.0, 10.0, 2.0, 3.0]
    has = [True, True, True, True, True, False]
    t[5] = float("nan")  # a member without a teacher: its row is never read
    knobs = {n: torch.tensor(v, dtype=torch.float64) for n, v in numeric.items()}
    z.requires_grad_(True)
    terms = loss.pack_terms(z, t, y, torch.tensor(alphas, dtype=torch.float64), torch.tensor(temps, dtype=torch.float64), has_teacher=torch.tensor(has), epoch=3, **categorical, **knobs)
    terms.total.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    for k in range(6):
        zk = z.detach()[k].clone().requires_grad_(True)
        ref = loss.terms(zk, t[k] if has[k] else None, y[k], alphas[k], temps[k], epoch=3, **categorical, **{n: v[k] for n, v in numeric.items()})
        ref.total.backward()
        for got, want in zip(terms, ref, strict=True):
            torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-14)
        assert zk.grad is not None
        torch.testing.assert_close(z.grad[k], zk.grad, rtol=1e-9, atol=1e-14)
    assert terms.distill[5] == 0 and terms.distill[0] > 0


# --- a confident teacher ------------------------------------------------------------------------------------------

ALL_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    *[("kd", {"divergence": d, "standardize": ls, **({"skew": 0.1} if d.startswith("skew") else {})}) for d in DIVERGENCES for ls in (False, True)],
    ("dkd", {"standardize": False, "warmup": 0}), ("dkd", {"standardize": True, "warmup": 0}), ("dist", {}),
]


@pytest.mark.parametrize("method,knobs", ALL_VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_confident_teacher_gives_finite_values_and_gradients(method: str, knobs: dict[str, Any], temperature: float) -> None:
    # One-hot logits of +-50: at T = 1 the teacher's other classes have probability e^-100 (underflow in a softmax's
    # float32 sums), and the student learns to be as confident (a second, confident student that disagrees).
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (16,), generator=g)
    teacher = torch.where(F.one_hot(y, 10).bool(), 50.0, -50.0)
    loss = get_loss(method)
    assert loss.pack_terms is not None
    for student in (torch.randn(16, 10, generator=g) * 3, torch.where(F.one_hot((y + 1) % 10, 10).bool(), 50.0, -50.0)):
        z = student.clone().requires_grad_(True)
        terms = loss.terms(z, teacher, y, 0.5, temperature, epoch=1, **knobs)
        terms.total.backward()
        assert all(torch.isfinite(v) for v in terms) and z.grad is not None and torch.isfinite(z.grad).all()
        zp = student.expand(2, 16, 10).clone().requires_grad_(True)
        numeric = {n: torch.tensor([v, v]) for n, v in knobs.items() if not isinstance(v, (bool, str))}
        categorical = {n: v for n, v in knobs.items() if isinstance(v, (bool, str))}
        pack = loss.pack_terms(zp, teacher.expand(2, 16, 10), y.expand(2, 16), torch.tensor([0.5, 0.0]), torch.tensor([temperature] * 2),
                               has_teacher=torch.tensor([True, True]), epoch=1, **categorical, **numeric)
        pack.total.sum().backward()
        assert all(torch.isfinite(v).all() for v in pack) and zp.grad is not None and torch.isfinite(zp.grad).all()


# --- train and pack_epoch hand the loss its epoch and knobs ------------------------------------------------------


def test_train_passes_the_epoch_and_the_knobs() -> None:
    seen: list[tuple[int, Any]] = []

    def recording(z: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor, alpha: Any, temp: Any, *, epoch: int, weight: Any = 0.0,
                  has_teacher: Any = None) -> KDLossTerms:
        seen.append((epoch, weight.tolist() if isinstance(weight, torch.Tensor) else weight))
        return kd_loss_terms(z, t, y, 0.5, 2.0) if z.dim() == 2 else pack_loss_terms(z, t, y, alpha, temp, has_teacher)

    register_loss("test_epochs", recording, recording)
    try:
        x, y = torch.randn(32, *SHAPE), torch.randint(0, 10, (32,))
        margs = model_args("mlp", {"hidden": [8]}, SHAPE, 10)
        model = build(margs, 0)
        data = TensorData(x, y, x[:8], y[:8], teacher_train=torch.randn(32, 10))
        train(model, make_optimizer(model, 1e-3), data, epochs=2, batch_size=16, seed=0, method="test_epochs", knobs=(("weight", 3.0),))
        assert seen == [(1, 3.0), (1, 3.0), (2, 3.0), (2, 3.0)]
        seen.clear()
        pack = pack_from_state_dicts(margs, [build(margs, s).state_dict() for s in (0, 1)])
        members = [Member(seed=s, epochs=1, alpha=0.5, teacher=0, method="test_epochs", knobs=(("weight", w),)) for s, w in ((0, 2.0), (1, 5.0))]
        pack_epoch(pack, make_optimizer(pack, 1e-3), PackData(x, y[None], x[:8], y[:8], teacher_train=torch.randn(1, 32, 10)), members, 3, 16)
        assert seen == [(3, [2.0, 5.0])] * 2
    finally:
        del LOSSES["test_epochs"]


def test_a_pack_refuses_unknown_knobs_and_methods() -> None:
    with pytest.raises(ValueError, match="method dkd has no knob skew"):
        loss_groups([Member(0, 1, method="dkd", knobs=(("skew", 0.1),))], torch.device("cpu"))
    with pytest.raises(ValueError, match="loss 'crd' is not registered"):
        loss_groups([Member(0, 1, method="crd")], torch.device("cpu"))


# --- a pack of mixed methods trains each member as train trains it alone --------------------------------------------

SHAPE = (1, 8, 8)
MLP = model_args("mlp", {"hidden": [32]}, SHAPE, 10)
LR, BATCH = 3e-3, 50

# Interleaved, so that no group is a contiguous block: kd (default, with the scratch member), kd+ls, kd reverse_kl,
# dkd (two nckd_weights, a 2-epoch warm-up: its term grows between the epochs) and dist, on two data orders.
MIXED_METHODS = [
    Member(seed=0, epochs=2, alpha=0.5, temperature=3.0, teacher=0, teacher_test=0),
    Member(seed=1, epochs=2, alpha=1.0, temperature=4.0, teacher=0, teacher_test=0, method="dkd", knobs=(("nckd_weight", 8.0), ("warmup", 2))),
    Member(seed=0, epochs=2, alpha=0.3, temperature=2.0, teacher=0, method="kd", knobs=(("standardize", True),)),
    Member(seed=1, epochs=2, alpha=1.0, temperature=1.0, teacher=0, method="dist"),
    Member(seed=0, epochs=2, alpha=1.0, temperature=4.0, teacher=0, method="dkd", knobs=(("nckd_weight", 2.0), ("warmup", 2))),
    Member(seed=1, epochs=2, alpha=1.0, temperature=3.0),  # scratch: no teacher
    Member(seed=1, epochs=2, alpha=0.5, temperature=4.0, teacher=0, method="kd", knobs=(("divergence", "reverse_kl"),)),
]


@pytest.fixture(scope="module")
def tiny_data() -> PackData:
    """500 random 8x8 images (400 to train on, 100 to test, the last 50 of which also validate), their labels and a "teacher": a fixed random linear map of the images."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(500, *SHAPE, generator=g)
    maps = torch.randn(64, 10, generator=g) / 2
    logits = x.reshape(500, -1) @ maps
    y = (logits + torch.randn(500, 10, generator=g)).argmax(1)  # labels the teacher mostly agrees with
    return PackData(x[:400], y[None, :400], x[400:], y[400:], logits[None, :400], logits[None, 400:], x[450:], y[450:])


def _close(a: list[EpochMetrics], b: list[EpochMetrics]) -> float:
    pairs = [(x, y) for ea, eb in zip(a, b, strict=True) for x, y in zip((ea.train_loss, ea.train_hard_loss, ea.train_distill_loss, ea.test_loss),
                                                                           (eb.train_loss, eb.train_hard_loss, eb.train_distill_loss, eb.test_loss), strict=True)]
    return max(abs(x - y) / max(abs(y), 1e-12) if (x, y) != (0.0, 0.0) else 0.0 for x, y in pairs)


def test_a_mixed_pack_trains_each_member_as_train_trains_it_alone(tiny_data: PackData) -> None:
    groups, order = loss_groups(MIXED_METHODS, torch.device("cpu"))
    assert [g.rows.tolist() if g.rows is not None else None for g in groups] == [[0, 5], [1, 4], [2], [3], [6]]
    assert order is not None and torch.cat([g.rows for g in groups if g.rows is not None])[order].tolist() == list(range(7))
    assert groups[1].knobs["nckd_weight"].tolist() == [8.0, 2.0] and groups[1].knobs["standardize"] is False
    pack = pack_from_state_dicts(MLP, [build(MLP, m.seed).state_dict() for m in MIXED_METHODS])
    result = train_pack(pack, make_optimizer(pack, LR), tiny_data, MIXED_METHODS, batch_size=BATCH, margs=MLP)
    assert result.diverged == {}
    for k, m in enumerate(MIXED_METHODS):
        model = build(MLP, m.seed)
        alone = train(model, make_optimizer(model, LR), tiny_data.member_data(m), epochs=2, batch_size=BATCH, seed=m.seed, alpha=m.alpha,
                      temperature=m.temperature, method=m.method, knobs=m.knobs)
        assert _close(result.history[k], alone) <= LOSS_REL, (k, m)
        for got, want in zip(result.history[k], alone, strict=True):
            assert abs(got.test_acc - want.test_acc) <= 1 / 100 + 1e-9  # one of 100 test images, at a near tie
    assert result.history[5][0].train_distill_loss == 0
    # the dkd members differ only in nckd_weight: a mix-up would show
    assert _close(result.history[1], result.history[4]) > 100 * LOSS_REL
