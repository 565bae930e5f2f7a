from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_tune.data import split as data_split
from kd_tune.distill.epochs import EpochMetrics
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.train import (
    CPU_EVAL_BATCH,
    EVAL_BATCH,
    TensorData,
    epoch_order,
    eval_batch,
    make_optimizer,
    predict_logits,
    train,
)
from kd_tune.errors import DivergedError


@pytest.fixture(scope="module")
def split() -> data_split.DataSplit:
    from .conftest import FIXTURE_DATA

    return data_split.prepare("mnist", 600, 0.0, 0, FIXTURE_DATA)


def _run(split: data_split.DataSplit, epochs: int, seed: int = 0, teacher: torch.Tensor | None = None, alpha: float = 1.0) -> tuple[torch.nn.Module, list[EpochMetrics]]:
    d = TensorData.from_split(split, "cpu", teacher, None)
    model = build_cnn((4, 8), split.info.shape, 10, seed)
    return model, train(model, make_optimizer(model, 3e-3), d, epochs=epochs, batch_size=64, seed=seed, alpha=alpha, temperature=3.0)


def _strip_time(h: list[EpochMetrics]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.as_dict().items() if k != "epoch_seconds"} for m in h]


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(50, 1, 3), epoch_order(50, 1, 3))
    assert not torch.equal(epoch_order(50, 1, 3), epoch_order(50, 1, 4))
    assert sorted(epoch_order(50, 1, 3).tolist()) == list(range(50))


def test_evaluation_chunks_do_not_change_the_logits(split: data_split.DataSplit) -> None:
    # The chunk size is a speed choice per device (kd_tune.train.eval_batch), never a result: every chunking of the
    # same images gives the same logits, up to the convolution's float reassociation, and leaves the model as it was.
    model = build_cnn((4, 8), split.info.shape, 10, 0)
    x = TensorData.from_split(split, "cpu", None, None).test_x[:300]
    whole = predict_logits(model, x, 300)
    for chunk in (7, CPU_EVAL_BATCH, None):
        assert torch.allclose(predict_logits(model, x, chunk), whole, rtol=1e-5, atol=1e-5), chunk
    assert model.training
    assert (eval_batch(torch.device("cpu")), eval_batch(torch.device("cuda"))) == (CPU_EVAL_BATCH, EVAL_BATCH)


def test_student_learns_and_is_deterministic(split: data_split.DataSplit) -> None:
    torch.set_num_threads(1)
    _, a = _run(split, 2)
    _, b = _run(split, 2)
    assert _strip_time(a) == _strip_time(b)
    assert [m.epoch for m in a] == [1, 2]
    assert a[-1].test_acc > 0.5  # far above chance (0.1) after 2 epochs on 600 digits
    assert a[-1].train_loss < a[0].train_loss


def test_resume_from_checkpoint_equals_uninterrupted_run(split: data_split.DataSplit) -> None:
    torch.set_num_threads(1)
    full_model, full = _run(split, 3)
    d = TensorData.from_split(split)
    model = build_cnn((4, 8), split.info.shape, 10, 0)
    opt = make_optimizer(model, 3e-3)
    train(model, opt, d, epochs=1, batch_size=64, seed=0)
    saved = (model.state_dict(), opt.state_dict())
    model2 = build_cnn((4, 8), split.info.shape, 10, 99)  # different init: all must come from the checkpoint
    opt2 = make_optimizer(model2, 3e-3)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    rest = train(model2, opt2, d, epochs=3, batch_size=64, seed=0, start_epoch=1)
    assert [m.epoch for m in rest] == [2, 3]
    assert _strip_time(rest) == _strip_time(full[1:])
    for p, q in zip(full_model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_distillation_reports_all_three_losses(split: data_split.DataSplit) -> None:
    teacher = torch.randn(len(split.train_y), 10)
    _, h = _run(split, 1, teacher=teacher, alpha=0.5)
    m = h[0]
    assert m.train_loss == pytest.approx(0.5 * m.train_hard_loss + 0.5 * m.train_distill_loss, rel=1e-5)
    assert m.train_distill_loss > 0


def test_alpha_one_trains_exactly_the_scratch_student(split: data_split.DataSplit) -> None:
    # alpha weighs the hard labels: at 1 the distillation term is weighted 0, so a distilled student of alpha 1
    # trains bit for bit the weights of the scratch student of its seed, whatever the teacher and the
    # temperature (what `kd-tune plan` tells of grids that hold both).
    torch.set_num_threads(1)
    teacher = 5 * torch.randn(len(split.train_y), 10)
    distilled, h = _run(split, 2, teacher=teacher, alpha=1.0)
    scratch, s = _run(split, 2)
    assert h[-1].train_distill_loss > 0  # the teacher's term was computed, and weighted 0
    for p, q in zip(distilled.parameters(), scratch.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [m.test_acc for m in h] == [m.test_acc for m in s]


def test_nan_loss_stops_with_the_epoch_and_value(split: data_split.DataSplit) -> None:
    teacher = torch.full((len(split.train_y), 10), float("nan"))
    with pytest.raises(DivergedError, match=r"diverged at epoch 1: loss = nan") as err:
        _run(split, 2, teacher=teacher, alpha=0.5)
    assert err.value.epoch == 1 and math.isnan(err.value.loss)


def test_on_epoch_sees_each_epoch(split: data_split.DataSplit) -> None:
    seen: list[int] = []
    d = TensorData.from_split(split)
    model = build_cnn((4, 8), split.info.shape, 10, 0)
    train(model, make_optimizer(model, 1e-3), d, epochs=2, batch_size=128, seed=0, on_epoch=lambda m, ev: seen.append(m.epoch))
    assert seen == [1, 2]


def test_fixture_path_exists() -> None:
    from .conftest import FIXTURE_DATA

    assert Path(FIXTURE_DATA, "MNIST", "raw", "train-images-idx3-ubyte").exists()


def test_classification_metrics_by_hand() -> None:
    from kd_tune.distill.metrics import classification_metrics

    # 3 classes; true labels 0,0,1,2; predictions 0,1,1,1 with confidences 0.9, 0.6, 0.8, 0.5 (by construction).
    labels = torch.tensor([0, 0, 1, 2])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.25, 0.5, 0.25]])
    p, r, f1, ece, cm = classification_metrics(probs.log(), labels)
    assert cm == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    # precision: class 0 = 1/1, class 1 = 1/3, class 2 = 0 (never predicted); recall: 1/2, 1/1, 0/1
    assert p == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert r == pytest.approx((0.5 + 1 + 0) / 3)
    f1_0, f1_1 = 2 * 1 * 0.5 / 1.5, 2 * (1 / 3) * 1 / (4 / 3)
    assert f1 == pytest.approx((f1_0 + f1_1 + 0) / 3)
    # ECE, 15 bins: 0.9 (correct) | 0.6 (wrong) | 0.8 (correct) | 0.5 (wrong), each alone in its bin
    assert ece == pytest.approx((abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(0 - 0.5)) / 4)
