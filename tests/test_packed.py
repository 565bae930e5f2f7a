"""Packed students (kd_tune.packed) against the one-student code they stand in for: models.build_cnn,
losses.kd_loss_terms and train.train."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from kd_tune.data import split as data_split
from kd_tune.distill.epochs import EpochMetrics
from kd_tune.distill.losses import kd_loss_terms, pack_loss_terms
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.pack_train import Member, PackData, evaluate_pack, train_pack
from kd_tune.distill.packed import PackedCNN, build_pack
from kd_tune.distill.train import evaluate, make_optimizer, train, validate

from .conftest import FIXTURE_DATA
from .helpers import LOSS_REL, ONE_TEST_IMAGE

WIDTHS = (4, 8)
LR = 3e-3
BATCH = 64
EPOCHS = 2



@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # What a 1-CPU trial gets; also keeps this file polite on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack_data() -> PackData:
    """600 real digits, two label sets (clean, 20 % flipped) and two "teachers": fixed random linear maps
    of the images (what the loop needs from a teacher is just logits per image)."""
    split = data_split.prepare("mnist", 600, 0.0, 0, FIXTURE_DATA, log=lambda s: None, val_size=100)
    train_x = data_split.normalize(split.train_x, split.info)
    test_x = data_split.normalize(split.test_x, split.info)
    val_x = data_split.normalize(split.val_x, split.info)
    labels = torch.stack([split.train_y, data_split.flip_labels(split.train_y, 0.2, 0, 10)])
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(2, 784, 10, generator=g) / 4
    teacher_train = torch.einsum("nf,lfc->lnc", train_x.reshape(600, -1), maps)
    teacher_test = torch.einsum("nf,lfc->lnc", test_x.reshape(len(test_x), -1), maps)
    return PackData(train_x, labels, test_x, split.test_y, teacher_train, teacher_test, val_x, split.val_y)


def _losses(h: list[EpochMetrics]) -> list[tuple[float, float, float, float]]:
    return [(m.train_loss, m.train_hard_loss, m.train_distill_loss, m.test_loss) for m in h]


def _max_rel(a: list[EpochMetrics], b: list[EpochMetrics]) -> float:
    """Largest relative difference of the four losses over all epochs (distill 0 == 0 counts as equal)."""
    pairs = [(x, y) for ea, eb in zip(_losses(a), _losses(b), strict=True) for x, y in zip(ea, eb, strict=True)]
    return max(abs(x - y) / max(abs(y), 1e-12) if (x, y) != (0.0, 0.0) else 0.0 for x, y in pairs)


def _assert_close(a: list[EpochMetrics], b: list[EpochMetrics]) -> None:
    assert [m.epoch for m in a] == [m.epoch for m in b]
    assert _max_rel(a, b) <= LOSS_REL
    for ma, mb in zip(a, b, strict=True):
        assert abs(ma.test_acc - mb.test_acc) <= ONE_TEST_IMAGE
        assert (ma.teacher_agreement is None) == (mb.teacher_agreement is None)
        if ma.teacher_agreement is not None and mb.teacher_agreement is not None:
            assert abs(ma.teacher_agreement - mb.teacher_agreement) <= ONE_TEST_IMAGE
        assert ma.test_macro_f1 == pytest.approx(mb.test_macro_f1, abs=0.01)  # one image moves F1 by < 0.01
        assert ma.test_ece == pytest.approx(mb.test_ece, abs=0.01)
        assert ma.val_acc is not None and mb.val_acc is not None and abs(ma.val_acc - mb.val_acc) <= 1 / 100  # one of 100 validation images


def _one_by_one(d: PackData, members: list[Member]) -> list[list[EpochMetrics]]:
    out = []
    for m in members:
        model = build_cnn(WIDTHS, (1, 28, 28), 10, m.seed)
        out.append(train(model, make_optimizer(model, LR), d.member_data(m), epochs=m.epochs, batch_size=BATCH,
                         seed=m.seed, alpha=m.alpha, temperature=m.temperature))
    return out


# A scratch member, distillation with alpha 0, 0.5 and 1 (teacher only reported), T 1, 3, 10,
# both label sets and both teachers, three seeds (so per-member data orders).
MIXED = [
    Member(seed=0, epochs=EPOCHS, alpha=1.0, teacher_test=0),
    Member(seed=1, epochs=EPOCHS, alpha=0.5, temperature=3.0, labels=0, teacher=0, teacher_test=0),
    Member(seed=2, epochs=EPOCHS, alpha=0.0, temperature=10.0, labels=1, teacher=1, teacher_test=1),
    Member(seed=0, epochs=EPOCHS, alpha=0.3, temperature=1.0, labels=1, teacher=1),
    Member(seed=1, epochs=EPOCHS, alpha=1.0, temperature=3.0, labels=1, teacher=0, teacher_test=1),
]


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 17, 10)])
def test_pack_is_its_members(shape: tuple[int, int, int]) -> None:
    seeds = [3, 0, 7]
    models = [build_cnn(WIDTHS, shape, 6, s) for s in seeds]
    pack = PackedCNN.from_state_dicts([m.state_dict() for m in models], WIDTHS, shape, 6)
    for sd, m in zip(pack.state_dicts(), models, strict=True):
        assert sd.keys() == m.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    x = torch.randn(len(seeds), 9, *shape, generator=torch.Generator().manual_seed(0))
    ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert pack(x).shape == (3, 9, 6)
    torch.testing.assert_close(pack(x), ref, rtol=0, atol=1e-5)
    shared = torch.stack([m(x[0]) for m in models])
    torch.testing.assert_close(pack(x[0]), shared, rtol=0, atol=1e-5)
    assert not torch.allclose(ref[0], ref[1])  # the members really differ, so a mix-up would show


def test_build_pack_starts_as_build_model_and_leaves_the_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [5, 9])
    member = pack.member(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    for seed, sd in zip([5, 9], pack.state_dicts(), strict=True):
        expected = build_cnn(WIDTHS, (1, 28, 28), 10, seed).state_dict()
        assert all(torch.equal(sd[k], v) for k, v in expected.items())
    loaded = build_cnn(WIDTHS, (1, 28, 28), 10, 0)
    loaded.load_state_dict(pack.state_dicts()[1])
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(member(x), loaded(x))


def test_state_dicts_are_copies() -> None:
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [0, 1])
    sd = pack.state_dicts()[1]
    # torch.save writes a view's whole storage: a member's checkpoint must not carry the pack along.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in sd.values())
    before = {k: v.clone() for k, v in sd.items()}
    with torch.no_grad():
        for p in pack.parameters():
            p.add_(1.0)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_wrong_state_dicts_are_refused() -> None:
    sd = build_cnn(WIDTHS, (1, 28, 28), 10, 0).state_dict()
    with pytest.raises(ValueError, match="keys"):
        PackedCNN.from_state_dicts([{**sd, "extra": torch.zeros(1)}], WIDTHS, (1, 28, 28), 10)
    with pytest.raises(ValueError, match="fc_weight"):
        PackedCNN.from_state_dicts([sd], WIDTHS, (1, 32, 32), 10)


# --- the loss ----------------------------------------------------------------------------------


def test_pack_loss_is_kd_loss_terms_per_member() -> None:
    g = torch.Generator().manual_seed(0)
    alphas, temps = [0.0, 0.5, 1.0, 0.5, 0.2, 1.0], [1.0, 3.0, 10.0, 3.0, 10.0, 1.0]
    has = [True, True, True, True, True, False]  # the last one is scratch
    z, t = torch.randn(6, 32, 10, generator=g) * 3, torch.randn(6, 32, 10, generator=g) * 3
    y = torch.randint(0, 10, (6, 32), generator=g)
    t[5] = float("nan")  # a scratch member's teacher row is never read
    z.requires_grad_(True)
    terms = pack_loss_terms(z, t, y, torch.tensor(alphas), torch.tensor(temps), torch.tensor(has))
    terms.total.sum().backward()
    assert z.grad is not None
    for k in range(6):
        zk = z.detach()[k].clone().requires_grad_(True)
        ref = kd_loss_terms(zk, t[k] if has[k] else None, y[k], alphas[k], temps[k])
        ref.total.backward()
        for got, want in zip(terms, ref, strict=True):
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=0)
        torch.testing.assert_close(z.grad[k], zk.grad, rtol=1e-5, atol=1e-8)
    assert terms.distill[5] == 0 and terms.total[5] == terms.hard[5]
    assert terms.distill[0] > 0


def test_a_nan_teacher_reaches_only_its_member_and_not_at_alpha_1() -> None:
    z = torch.randn(3, 8, 10, requires_grad=True)
    t = torch.randn(3, 8, 10)
    t[1] = t[2] = float("nan")  # member 1 distills from it, member 2 (alpha 1) only reports it
    terms = pack_loss_terms(z, t, torch.zeros(3, 8, dtype=torch.long), torch.tensor([0.5, 0.5, 1.0]), torch.tensor([3.0, 3.0, 3.0]))
    terms.total.sum().backward()
    assert z.grad is not None
    assert torch.isnan(terms.total[1]) and torch.isnan(terms.distill[2]) and torch.isfinite(terms.total[2])
    assert torch.isfinite(z.grad[0]).all() and torch.isfinite(z.grad[2]).all() and torch.isnan(z.grad[1]).all()


@pytest.mark.parametrize("packed", [True, False])
def test_a_packs_evaluation_is_its_members_evaluations(pack_data: PackData, packed: bool) -> None:
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [0, 1, 2, 3, 4])
    with torch.no_grad():
        pack.fc_bias[3].fill_(float("nan"))  # a diverged member: left out, and harmless to the others
    got = evaluate_pack(pack, pack_data, MIXED, [0, 1, 2, 4], packed)
    assert sorted(got) == [0, 1, 2, 4]
    for k, (ev, (val_acc, val_loss)) in got.items():
        student, alone = pack.member(k), pack_data.member_data(MIXED[k])
        want, (want_acc, want_loss) = evaluate(student, alone), validate(student, alone)
        # the same predictions, but for an image whose prediction flips at a near tie (see LOSS_REL)
        flips = sum(abs(a - b) for ra, rb in zip(ev.confusion, want.confusion, strict=True) for a, b in zip(ra, rb, strict=True))
        assert flips <= 2 and abs(ev.acc - want.acc) <= ONE_TEST_IMAGE
        assert (ev.teacher_agreement is None) == (MIXED[k].teacher_test is None) == (want.teacher_agreement is None)
        if ev.teacher_agreement is not None and want.teacher_agreement is not None:
            assert abs(ev.teacher_agreement - want.teacher_agreement) <= ONE_TEST_IMAGE
        assert (ev.macro_precision, ev.macro_recall, ev.macro_f1) == pytest.approx((want.macro_precision, want.macro_recall, want.macro_f1), abs=0.01)
        assert ev.loss == pytest.approx(want.loss, rel=LOSS_REL) and ev.ece == pytest.approx(want.ece, abs=0.01)
        assert val_acc is not None and want_acc is not None and abs(val_acc - want_acc) <= 1 / 100
        assert val_loss == pytest.approx(want_loss, rel=LOSS_REL)
    assert len({ev.loss for ev, _ in got.values()}) == 4  # the members really differ
    assert evaluate_pack(pack, pack_data, MIXED, []) == {}


# --- training ----------------------------------------------------------------------------------


def test_packed_training_equals_one_by_one(pack_data: PackData) -> None:
    """The key property: a pack is K ordinary trials, up to float reassociation (see LOSS_REL)."""
    seen: list[tuple[int, int]] = []
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [m.seed for m in MIXED])
    result = train_pack(pack, make_optimizer(pack, LR), pack_data, MIXED, batch_size=BATCH,
                        on_epoch=lambda k, m, ev: seen.append((k, m.epoch)))
    expected = _one_by_one(pack_data, MIXED)
    assert result.diverged == {}
    assert sorted(seen) == [(k, e) for k in range(len(MIXED)) for e in (1, 2)]
    for got, want in zip(result.history, expected, strict=True):
        _assert_close(got, want)
    assert result.history[0][0].train_distill_loss == 0 and result.history[0][0].teacher_agreement is not None
    assert result.history[3][0].teacher_agreement is None
    # Mixed-up members would differ far beyond the tolerance: the members' own results differ.
    assert _max_rel(result.history[1], expected[2]) > 100 * LOSS_REL


def test_shared_order_and_resume(pack_data: PackData) -> None:
    """One seed for all (the shared-input fast path), trained 1 + 1 epochs through a state_dict round trip."""
    members = [Member(seed=4, epochs=EPOCHS, alpha=a, temperature=3.0, labels=n, teacher=n, teacher_test=n)
               for a, n in [(0.0, 0), (0.5, 1), (1.0, 0)]]
    expected = _one_by_one(pack_data, members)
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [4, 4, 4])
    opt = make_optimizer(pack, LR)
    short = [dataclasses.replace(m, epochs=1) for m in members]
    first = train_pack(pack, opt, pack_data, short, batch_size=BATCH)
    saved = (pack.state_dict(), opt.state_dict())
    pack2 = PackedCNN(3, WIDTHS, (1, 28, 28), 10)
    opt2 = make_optimizer(pack2, LR)
    pack2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    rest = train_pack(pack2, opt2, pack_data, members, batch_size=BATCH, start_epoch=1)
    for k in range(3):
        _assert_close(first.history[k] + rest.history[k], expected[k])


def test_a_diverging_member_is_dropped_and_the_others_go_on(pack_data: PackData) -> None:
    nan_teacher = pack_data.teacher_train.clone() if pack_data.teacher_train is not None else None
    assert nan_teacher is not None
    nan_teacher[1] = float("nan")
    poisoned = replace(pack_data, teacher_train=nan_teacher)
    members = [MIXED[0], MIXED[2], MIXED[1]]  # MIXED[2] distills from teacher 1: NaN
    events: list[tuple[int, int]] = []
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [m.seed for m in members])
    result = train_pack(pack, make_optimizer(pack, LR), poisoned, members, batch_size=BATCH,
                        on_epoch=lambda k, m, ev: events.append((k, m.epoch)))
    assert set(result.diverged) == {1}
    assert result.diverged[1].epoch == 1 and math.isnan(result.diverged[1].loss)
    assert result.history[1] == [] and sorted(events) == [(0, 1), (0, 2), (2, 1), (2, 2)]
    clean = [members[0], members[2]]
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [m.seed for m in clean])
    without = train_pack(pack, make_optimizer(pack, LR), pack_data, clean, batch_size=BATCH)
    _assert_close(result.history[0], without.history[0])
    _assert_close(result.history[2], without.history[1])


def test_members_must_agree_on_epochs(pack_data: PackData) -> None:
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [0, 1])
    with pytest.raises(ValueError, match="same number of epochs"):
        train_pack(pack, make_optimizer(pack, LR), pack_data, [Member(0, 1), Member(1, 2)], batch_size=BATCH)
    with pytest.raises(ValueError, match="teacher row 5"):
        train_pack(pack, make_optimizer(pack, LR), pack_data, [Member(0, 1), Member(1, 1, teacher=5)], batch_size=BATCH)


def test_bfloat16_pack_trains_its_members_as_bfloat16_students(pack_data: PackData) -> None:
    """student.precision bfloat16 reaches the pack's forward as it reaches train.train's: each member stays within
    bfloat16's rounding of the same student trained alone in bfloat16 (measured: 2e-4 relative over 2 epochs; bound
    2e-3), and moves away from float32 by far more than float32's reassociation does (measured 1.2e-4 to 8e-4 against
    LOSS_REL = 1e-5), while the weights stay float32."""
    members = MIXED[:2]
    results = {}
    for precision in ("bfloat16", "float32"):
        model = build_pack(WIDTHS, (1, 28, 28), 10, [m.seed for m in members])
        results[precision] = train_pack(model, make_optimizer(model, LR), pack_data, members, batch_size=BATCH, precision=precision).history
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for i, m in enumerate(members):
        model = build_cnn(WIDTHS, (1, 28, 28), 10, m.seed)
        alone = train(model, make_optimizer(model, LR), pack_data.member_data(m), epochs=m.epochs, batch_size=BATCH, seed=m.seed,
                      alpha=m.alpha, temperature=m.temperature, precision="bfloat16")
        assert _max_rel(results["bfloat16"][i], alone) <= 2e-3
        assert _max_rel(results["bfloat16"][i], results["float32"][i]) > LOSS_REL
    with pytest.raises(ValueError, match="precision 'float16': allowed float32 or bfloat16"):
        train(model, make_optimizer(model, LR), pack_data.member_data(members[0]), epochs=1, batch_size=BATCH, seed=0, precision="float16")


def test_scheduled_members_train_as_they_would_alone(pack_data: PackData) -> None:
    """alpha and T schedules in a pack: each member reads its own values each epoch (loss_groups per epoch), as alone."""
    from kd_tune.space.schedules import Schedule

    members = [replace(MIXED[1], alpha=Schedule("linear", 0.0, 0.8, over=EPOCHS)),
               replace(MIXED[2], temperature=Schedule("cosine", 10.0, 2.0)), MIXED[3]]
    pack = build_pack(WIDTHS, (1, 28, 28), 10, [m.seed for m in members])
    result = train_pack(pack, make_optimizer(pack, LR), pack_data, members, batch_size=BATCH)
    for got, want in zip(result.history, _one_by_one(pack_data, members), strict=True):
        _assert_close(got, want)
    # and the schedule changed something: the same members with their start values as constants train otherwise
    constant = _one_by_one(pack_data, [replace(MIXED[1], alpha=0.0)])[0]
    assert _max_rel(result.history[0], constant) > LOSS_REL
