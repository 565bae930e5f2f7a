"""Students that see augmented images, with a live teacher: the teacher scores exactly the augmented batch the student
trains on (the logits of a step are the teacher's own forward on that batch), augmentation is a function of (seed,
epoch) so a resumed run is the uninterrupted one, and a pack's members that share a data order share each teacher
forward (counted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_tune.distill.augment import Augment, epoch_generator
from kd_tune.distill.checkpoint import read_checkpoint, save_checkpoint
from kd_tune.distill.losses import LOSSES, KDLossTerms, kd_loss_terms, register_loss
from kd_tune.distill.models import build, model_args
from kd_tune.distill.online import OnlineTeacher, TeacherNet, online_teacher
from kd_tune.distill.pack_train import Member, PackData, train_pack
from kd_tune.distill.packed import pack_from_state_dicts
from kd_tune.distill.train import TensorData, epoch_order, make_optimizer, train

SHAPE = (1, 12, 12)
SHIFT = Augment("shift", 2)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (n,), generator=g)


def _teacher() -> tuple[TeacherNet, OnlineTeacher]:
    margs = model_args("cnn", {"widths": [4, 8]}, SHAPE, 10)
    net = TeacherNet(margs, build(margs, seed=9).state_dict())
    return net, online_teacher([net], "cpu")


def test_the_teacher_scores_the_very_batch_the_student_trains_on() -> None:
    x, y = _data()
    net, teacher = _teacher()
    seen: list[torch.Tensor] = []
    used: list[torch.Tensor] = []

    def recording(student: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float, t: float, epoch: int) -> KDLossTerms:
        assert teacher_logits is not None
        used.append(teacher_logits.detach().clone())
        return kd_loss_terms(student, teacher_logits, labels, alpha, t)

    register_loss("test_recording", recording)
    try:
        student = build(model_args("mlp", {"hidden": [16]}, SHAPE, 10), seed=0)
        student.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()) if student.training else None)
        data = TensorData(x, y, x[:16], y[:16], teacher_test=teacher(x[:16]), online_teacher=teacher)
        train(student, make_optimizer(student, 1e-3), data, epochs=2, batch_size=16, seed=3, alpha=0.5, temperature=4.0,
              augment=SHIFT, method="test_recording")
    finally:
        del LOSSES["test_recording"]
    assert len(seen) == len(used) == 8  # 2 epochs of 4 batches
    reference = net.network()
    i = 0
    for epoch in (1, 2):  # what the student saw: each epoch's order, each batch augmented with that epoch's draws
        order, draws = epoch_order(64, 3, epoch), epoch_generator(3, epoch)
        for b in range(0, 64, 16):
            expected = SHIFT(x[order[b : b + 16]], draws)
            assert torch.equal(seen[i], expected)
            with torch.no_grad():
                assert torch.equal(used[i], reference(expected))  # the logits of the step: the teacher's own forward on that batch
            i += 1
    assert not torch.equal(seen[0], x[epoch_order(64, 3, 1)[:16]])  # augmented indeed


def test_augmented_training_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    x, y = _data()
    _, teacher = _teacher()
    margs = model_args("mlp", {"hidden": [16]}, SHAPE, 10)

    def run(epochs: int, model: torch.nn.Module, opt: torch.optim.Optimizer, start: int = 0) -> None:
        data = TensorData(x, y, x[:16], y[:16], online_teacher=teacher)
        train(model, opt, data, epochs=epochs, batch_size=16, seed=1, alpha=0.5, temperature=4.0, augment=SHIFT, start_epoch=start)

    whole = build(margs, 0)
    run(3, whole, make_optimizer(whole, 1e-3))
    first = build(margs, 0)
    opt = make_optimizer(first, 1e-3)
    run(2, first, opt)
    save_checkpoint(tmp_path, margs, first, opt, [{"epoch": 2.0}], [[1]])
    state = read_checkpoint(tmp_path)
    assert state is not None
    resumed = build(margs, 5)  # other initial weights: everything must come from the checkpoint
    opt2 = make_optimizer(resumed, 1e-3)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    run(3, resumed, opt2, start=2)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_a_pack_scores_each_data_order_once_and_trains_as_its_members_alone_whatever_their_methods() -> None:
    x, y = _data(96)
    _, teacher = _teacher()
    margs = model_args("mlp", {"hidden": [16]}, SHAPE, 10)
    # Members of different methods (grid.method): each loss takes the live teacher's logits of its own data order.
    methods = (("kd", ()), ("dkd", (("nckd_weight", 2.0), ("warmup", 2))), ("dist", ()), ("kd", (("standardize", True),)))
    members = [Member(seed=s, epochs=1, alpha=a, temperature=4.0, teacher=0, teacher_test=0, method=method, knobs=knobs)
               for (s, a), (method, knobs) in zip(((0, 0.1), (0, 0.5), (1, 0.1), (1, 0.5)), methods, strict=True)]
    members.append(Member(seed=0, epochs=1, teacher_test=0))  # scratch: no teacher
    pack = pack_from_state_dicts(margs, [build(margs, m.seed).state_dict() for m in members])
    test_logits = teacher(x[:32])
    data = PackData(x, y[None], x[:32], y[:32], None, test_logits[None], online_teachers=[teacher])
    before = teacher.forwards
    result = train_pack(pack, make_optimizer(pack, 1e-3), data, members, batch_size=32, margs=margs, augment=SHIFT)
    assert teacher.forwards - before == 2 * 3  # 3 steps, 2 data orders (seeds 0 and 1), whatever the 4 distilled members
    for k, m in enumerate(members):
        alone = build(margs, m.seed)
        history = train(alone, make_optimizer(alone, 1e-3), data.member_data(m), epochs=1, batch_size=32, seed=m.seed, alpha=m.alpha,
                        temperature=m.temperature, augment=SHIFT, method=m.method, knobs=m.knobs)
        assert result.history[k][0].train_loss == pytest.approx(history[0].train_loss, rel=1e-4)
        for name, w in pack.member_state_dict(k).items():
            assert torch.allclose(w, alone.state_dict()[name], atol=1e-5), name


def test_augmentation_with_cached_logits_is_refused() -> None:
    x, y = _data()
    model = build(model_args("mlp", {"hidden": [8]}, SHAPE, 10), 0)
    with pytest.raises(ValueError, match="cached teacher logits: the logits are of the plain images"):
        train(model, make_optimizer(model, 1e-3), TensorData(x, y, x, y, teacher_train=torch.zeros(64, 10)), epochs=1, batch_size=16, seed=0,
              alpha=0.5, augment=SHIFT)
