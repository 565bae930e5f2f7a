"""Architectures by name (the model registry and its spec): every family builds, trains a step, checkpoints and rebuilds
bit for bit; BatchNorm and dropout behave in training and evaluation; sizes match their formulas; a pack of MLP
students trains as the students alone do; augmentation is deterministic; pre-trained teachers load from a file and
from an MLflow model URI with the model's own logits; every bad model key is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_tune.distill.augment import Augment, epoch_generator, translate
from kd_tune.distill.checkpoint import model_from_state, read_checkpoint, save_checkpoint, save_model_file
from kd_tune.distill.models import MODELS, build, count_parameters, model_args
from kd_tune.distill.pretrained import check_outputs, load_model
from kd_tune.distill.train import make_optimizer, predict_logits
from kd_tune.errors import SpaceError
from kd_tune.space.architectures import FAMILIES
from kd_tune.space.parse import parse_space

from .conftest import tiny_space

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
SMALL = {"cnn": {"widths": [4, 8]}, "mlp": {"hidden": [16, 8], "dropout": 0.2}, "convnet": {"channels": [4, 8], "hidden": 16}}


def _images(shape: tuple[int, int, int], n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g).contiguous(memory_format=torch.channels_last)


def test_the_spec_and_the_registry_name_the_same_architectures() -> None:
    assert set(FAMILIES) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_builds_trains_a_step_checkpoints_and_rebuilds_bit_for_bit(arch: str, tmp_path: Path) -> None:
    shape = CIFAR if arch.startswith("resnet") else MNIST
    margs = model_args(arch, SMALL.get(arch, {}), shape, 10)
    model = build(margs, seed=3)
    again = build(margs, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))  # seeded
    x, y = _images(shape), torch.tensor([0, 1, 2, 3, 4, 5])
    optimizer = make_optimizer(model, 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step changed the weights
    save_checkpoint(tmp_path, margs, model, optimizer, [{"epoch": 1.0}], [[1]])
    state = read_checkpoint(tmp_path)
    assert state is not None and state["model_args"]["arch"] == arch
    rebuilt = model_from_state(state)
    assert not rebuilt.training and type(rebuilt) is type(model)
    assert torch.equal(predict_logits(rebuilt, x), predict_logits(model, x))
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k  # BatchNorm's running statistics included


def test_batchnorm_and_dropout_follow_the_mode_and_evaluation_uses_eval_mode() -> None:
    x = _images(CIFAR, 8)
    resnet = build(model_args("resnet8", {}, CIFAR, 10), seed=0)
    resnet.train()
    resnet(x * 5 + 2)  # a training batch moves the running statistics
    bn = next(m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    frozen = bn.running_mean.clone()
    out = predict_logits(resnet, x)  # eval mode: the running statistics, untouched, and the model back in training mode
    assert torch.equal(bn.running_mean, frozen) and resnet.training
    assert torch.equal(out, predict_logits(resnet, x))
    mlp = build(model_args("mlp", {"hidden": [32], "dropout": 0.5}, MNIST, 10), seed=0)
    mlp.train()
    x = _images(MNIST)
    assert not torch.equal(mlp(x), mlp(x))  # dropout draws in training
    assert torch.equal(predict_logits(mlp, x), predict_logits(mlp, x))  # none in evaluation


def test_sizes_match_their_formulas() -> None:
    # MLP: every Linear's weights and biases.
    sizes = [784, 800, 800, 10]
    assert count_parameters(build(model_args("mlp", {"hidden": [800, 800]}, MNIST, 10), 0)) == sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))

    def resnet(depth: int, filters: tuple[int, int, int, int], classes: int) -> int:
        n, total, inplanes = (depth - 2) // 6, filters[0] * 3 * 9 + 2 * filters[0], filters[0]
        for planes in filters[1:]:
            for i in range(n):
                total += inplanes * planes * 9 + planes * planes * 9 + 4 * planes  # two 3x3 convolutions, two BatchNorms
                if inplanes != planes or (i == 0 and planes != filters[1]):
                    total += inplanes * planes + 2 * planes  # the 1x1 shortcut and its BatchNorm
                inplanes = planes
        return total + inplanes * classes + classes

    for name, depth, filters in (("resnet20", 20, (16, 16, 32, 64)), ("resnet56", 56, (16, 16, 32, 64)), ("resnet8x4", 8, (32, 64, 128, 256))):
        assert count_parameters(build(model_args(name, {}, CIFAR, 100), 0)) == resnet(depth, filters, 100), name
    # RepDistiller's published sizes on CIFAR-100 (Tian et al. 2020, table 1): 0.28M, 0.86M, 1.23M
    assert round(count_parameters(build(model_args("resnet20", {}, CIFAR, 100), 0)) / 1e6, 2) == 0.28
    assert round(count_parameters(build(model_args("resnet8x4", {}, CIFAR, 100), 0)) / 1e6, 2) == 1.23


def test_a_pack_of_mlp_students_trains_as_each_student_alone() -> None:
    from kd_tune.distill.pack_train import Member, PackData, train_pack
    from kd_tune.distill.packed import PackedMLP, pack_from_state_dicts
    from kd_tune.distill.train import TensorData, train

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(96, *MNIST, generator=g), torch.randint(0, 10, (96,), generator=g)
    teacher = torch.randn(96, 10, generator=g)
    data = PackData(x, y[None], x[:32], y[:32], teacher[None], teacher[None, :32])
    margs = model_args("mlp", {"hidden": [24, 12]}, MNIST, 10)
    members = [Member(seed=0, epochs=2, alpha=0.5, temperature=4.0, teacher=0, teacher_test=0), Member(seed=1, epochs=2, teacher_test=0)]
    pack = pack_from_state_dicts(margs, [build(margs, m.seed).state_dict() for m in members])
    assert isinstance(pack, PackedMLP)
    result = train_pack(pack, make_optimizer(pack, 1e-3), data, members, batch_size=32, margs=margs)
    for k, m in enumerate(members):
        alone = build(margs, m.seed)
        history = train(alone, make_optimizer(alone, 1e-3), TensorData(x, y, x[:32], y[:32], teacher if m.teacher == 0 else None, teacher[:32]),
                        epochs=2, batch_size=32, seed=m.seed, alpha=m.alpha, temperature=m.temperature)
        for packed_epoch, own in zip(result.history[k], history, strict=True):
            assert packed_epoch.train_loss == pytest.approx(own.train_loss, rel=1e-4) and packed_epoch.test_acc == pytest.approx(own.test_acc, abs=1 / 32)
        for name, w in pack.member_state_dict(k).items():
            assert torch.allclose(w, alone.state_dict()[name], atol=1e-5), name


def test_augmentation_is_a_function_of_seed_and_epoch_and_moves_the_image() -> None:
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3, 3] = 1.0  # one bright pixel per image
    a = translate(x, 2, flip=False, generator=epoch_generator(5, 3))
    assert torch.equal(a, translate(x, 2, flip=False, generator=epoch_generator(5, 3)))  # same (seed, epoch): same draws
    assert not torch.equal(a, translate(x, 2, flip=False, generator=epoch_generator(5, 4)))
    for image in a:  # the pixel moved by at most 2 in each direction, nothing else appeared
        r, c = divmod(int(image.flatten().argmax()), 8)
        assert abs(r - 3) <= 2 and abs(c - 3) <= 2 and float(image.sum()) == 1.0
    flipped = Augment("crop_flip", 0)(x, epoch_generator(0, 1))
    assert {int(i.flatten().argmax()) % 8 for i in flipped} <= {3, 4}  # mirrored left-right or not, never moved with pad 0


def test_a_pretrained_teacher_from_a_file_and_from_an_mlflow_uri_has_the_models_own_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    from kd_tune.tracking.logged_models import using_tracking_uri
    from kd_tune.tracking.model_uri import fetch

    margs = model_args("convnet", SMALL["convnet"], MNIST, 10)
    model = build(margs, seed=2).eval()
    x = _images(MNIST, 16)
    own = predict_logits(model, x)
    save_model_file(tmp_path / "teacher.pt", margs, model.state_dict())
    from_file, args = load_model(tmp_path / "teacher.pt")
    assert args == margs and torch.equal(predict_logits(from_file, x), own)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    with using_tracking_uri(uri), mlflow.start_run():  # MLflow's process-wide setting, put back after: later tests start clean
        info = mlflow.pytorch.log_model(model, name="teacher", input_example=x[:2].contiguous().numpy(), pip_requirements=["torch"])
    for source in (info.model_uri, f"models:/{info.model_id}"):
        program, args = load_model(fetch(source, uri, tmp_path / source.replace(":", "_").replace("/", "_")))
        assert args is None and torch.allclose(predict_logits(program, x), own, atol=1e-5)  # torch.export's program: the same network
    with pytest.raises(ValueError, match="nothing to download at that URI"):
        fetch("models:/m-0000", uri, tmp_path / "none")


def test_bad_teacher_files_say_what_they_are_not(tmp_path: Path) -> None:
    margs = model_args("mlp", {"hidden": [8]}, MNIST, 5)
    save_model_file(tmp_path / "five.pt", margs, build(margs, 0).state_dict())
    five, _ = load_model(tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"it gives \(2, 5\) for 2 images of shape \(1, 28, 28\); the dataset has 10 classes"):
        check_outputs(five, MNIST, 10)
    with pytest.raises(ValueError, match="does not take images of shape"):
        check_outputs(five, CIFAR, 5)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kd-tune model file"):
        load_model(tmp_path / "other.pt")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("this would have run",))

    torch.save({"model_args": margs, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        load_model(tmp_path / "evil.pt")
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch.export archive"):
        load_model(tmp_path / "broken.pt2")


def _student(**section: object) -> dict[str, object]:
    return tiny_space(student={"lr": 0.003, "batch_size": 64, **section})


@pytest.mark.parametrize("space,key,allowed", [
    (_student(arch="resnet7"), "student.arch", "one of cnn, mlp, convnet, resnet8"),
    (_student(arch=3), "student.arch", "'package.module:function'"),
    (_student(arch="mlp", hidden=[800, 0]), "student.hidden[1]", "an integer in [1, 65536]"),
    (_student(arch="mlp", hidden=[]), "student.hidden", "a non-empty list of positive integers"),
    (_student(arch="mlp", dropout=1.0), "student.dropout", "a number in [0, 1)"),
    (_student(arch="mlp", widths=[4, 8]), "student.widths", "known keys of 'student': arch, hidden, dropout, input_dropout"),
    (_student(arch="resnet20", args={"depth": 3}), "student.args", "known keys of 'student': arch, lr"),
    (_student(arch="pkg.mod:make", args={"w": {"a": 1}}), "student.args.w", "a number, string, boolean or a list of them"),
    (_student(arch="pkg.mod:make", args=[1]), "student.args", "a mapping of the factory's keyword arguments"),
    (tiny_space(teacher={"from": "/nonexistent/teacher.pt"}), "teacher.from", "(no such file)"),
    (tiny_space(teacher={"from": "models:/m-1", "epochs": 3}), "teacher.epochs", "no other key with teacher.from"),
    (tiny_space(teacher={"widths": [8, 16], "epochs": 1, "augment": "rotate"}), "teacher.augment", "one of none, shift, crop_flip"),
    (tiny_space(grid={"alpha": [0.5], "student": {"a b": {}}}), "grid.student.a b", "1-40 letters, digits"),
    (tiny_space(grid={"alpha": [0.5], "student": {"big": {"hidden": [64]}}}), "grid.student.big.hidden", "known keys of 'grid.student.big'"),
    (tiny_space(grid={"alpha": [0.5], "teacher": []}), "grid.teacher", "a mapping of names to overrides"),
])
def test_bad_model_keys_are_refused_naming_the_key(space: dict[str, object], key: str, allowed: str) -> None:
    with pytest.raises(SpaceError) as e:
        parse_space(space, "s.yaml")
    assert e.value.key == key and allowed in e.value.allowed, (e.value.key, e.value.allowed)
    assert str(e.value).startswith(f"s.yaml: key '{key}': bad value ") and "\n" not in str(e.value)


def test_axes_of_students_and_teachers_in_the_grid(tmp_path: Path) -> None:
    model = build(model_args("mlp", {"hidden": [8]}, MNIST, 10), 0)
    save_model_file(tmp_path / "t.pt", model_args("mlp", {"hidden": [8]}, MNIST, 10), model.state_dict())
    space = tiny_space(student={"arch": "mlp", "hidden": [16], "lr": 0.003},
                       grid={"alpha": [0.5], "epochs": [1, 2], "seed": [0, 1],
                             "student": {"s16": {}, "s32": {"hidden": [32]}, "cnn": {"arch": "cnn", "widths": [4, 8]}},
                             "teacher": {"trained": {}, "file": {"from": str(tmp_path / "t.pt")}}},
                       baselines=["scratch"], resources={"cpu": 1, "pack": 8})
    spec = parse_space(space, "s.yaml")
    assert {n: s.model.describe() for n, s in spec.students().items()} == {
        "s16": "mlp(dropout=0, hidden=16, input_dropout=0)", "s32": "mlp(dropout=0, hidden=32, input_dropout=0)", "cnn": "cnn(widths=4x8)"}
    assert spec.teachers()["file"].source == str(tmp_path / "t.pt") and spec.teachers()["trained"].widths == (8, 16)
    points = spec.grid_points()
    assert len(points) == 3 * 2 * 2 * 2 + 3 * 2 * 2  # students x teachers x seeds x epochs, then scratch per student
    assert len({p.label for p in points}) == len(points) and "a0.5-T3-e1-s0-Ss32-tfile" in {p.label for p in points}
    assert {p.teacher for p in points if p.role == "scratch"} == {""}
    # A pack holds students of one grid.student entry; all three pack (mlp and cnn).
    assert all(len({m.student for m in pack}) == 1 for pack in spec.packs()) and len(spec.packs()) == 3
    params = spec.run_params()
    assert params["s32", "file"]["student.hidden"] == [32] and params["s32", "file"]["teacher.from"] == str(tmp_path / "t.pt")
    assert params["cnn", ""]["student.arch"] == "cnn" and "teacher.from" not in params["cnn", ""]
    # As stored beside the sweep (what resume reads): the same spec.
    from kd_tune.space.parse import load_space_text, space_to_yaml

    assert load_space_text(space_to_yaml(spec), "stored.yaml") == spec
