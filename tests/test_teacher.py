from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kd_tune.data import split as data_split
from kd_tune.distill.teacher import Teacher, teacher_key, train_teacher
from kd_tune.space.schema import DatasetSpec
from kd_tune.space.sections import TeacherSpec, model_spec
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.sweep.teacher_cache import CACHE_FOLDER, TeacherCache

from .conftest import FIXTURE_DATA


@pytest.fixture(scope="module")
def split() -> data_split.DataSplit:
    return data_split.prepare("mnist", 500, 0.0, 0, FIXTURE_DATA)


@pytest.fixture(scope="module")
def teacher(split: data_split.DataSplit) -> Teacher:
    spec = TeacherSpec(model_spec("cnn", widths=(4, 8)), epochs=1, lr=3e-3, batch_size=64)
    return train_teacher(split, spec, teacher_key(DatasetSpec(train_size=500), spec, split), log=lambda s: None)


def test_key_covers_the_spec(split: data_split.DataSplit) -> None:
    ds, t = DatasetSpec(train_size=500), TeacherSpec(model_spec("cnn", widths=(4, 8)), epochs=1)
    key = teacher_key(ds, t, split)
    assert key == teacher_key(ds, t, split)
    assert key != teacher_key(ds, replace(t, epochs=2), split)
    assert key != teacher_key(ds, replace(t, seed=1), split)
    assert key != teacher_key(replace(ds, label_noise=0.1), t, split)
    other = data_split.prepare("mnist", 400, 0.0, 0, FIXTURE_DATA)
    assert key != teacher_key(ds, t, other)  # the data fingerprint is in the key too
    # Preprocessing and the validation split decide what the teacher learns: both are in the key.
    standardized = replace(split, normalize=True)
    assert key != teacher_key(replace(ds, normalize=True), t, standardized)
    assert teacher_key(ds, t, split) != teacher_key(ds, t, standardized)  # even with the spec alone unchanged
    assert key != teacher_key(replace(ds, val_size=100), t, data_split.prepare("mnist", 500, 0.0, 0, FIXTURE_DATA, val_size=100))


def test_logits_cover_train_and_test(split: data_split.DataSplit, teacher: Teacher) -> None:
    assert teacher.train_logits.shape == (500, 10)
    assert teacher.test_logits.shape == (500, 10)
    acc = (teacher.test_logits.argmax(1) == split.test_y).float().mean().item()
    assert acc == pytest.approx(teacher.test_acc)
    assert len(teacher.history) == 1 and not teacher.cached


def test_cache_roundtrip(tmp_path: Path, teacher: Teacher) -> None:
    cache = TeacherCache(resolve_storage(str(tmp_path)))
    assert cache.load(teacher.key) is None
    path = Path(cache.save(teacher, {"note": "test"}))
    assert path == tmp_path / CACHE_FOLDER / teacher.key
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "teacher.pt"]  # no temporary file left
    assert cache.keys() == [teacher.key]
    loaded = cache.load(teacher.key)
    assert loaded is not None and loaded.cached
    assert torch.equal(loaded.train_logits, teacher.train_logits)
    assert torch.equal(loaded.test_logits, teacher.test_logits)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in teacher.state_dict.items())
    # A second writer of the same teacher leaves the first entry in place.
    assert cache.save(teacher, {"note": "again"}) == str(path)
    assert json.loads((path / "meta.json").read_text())["spec"] == {"note": "test"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta"])
def test_corrupt_entry_is_discarded_not_loaded(tmp_path: Path, teacher: Teacher, damage: str) -> None:
    cache = TeacherCache(resolve_storage(str(tmp_path)))
    path = Path(cache.save(teacher, {}))
    weights = path / "teacher.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        weights.write_bytes(bytes(raw))
    else:
        (path / "meta.json").unlink()
    messages: list[str] = []
    assert cache.load(teacher.key, log=messages.append) is None
    assert not path.exists()
    assert "training the teacher again" in messages[0]


def test_a_cpu_teacher_on_the_embedded_ray_trains_in_the_driver(tmp_path: Path, split: data_split.DataSplit) -> None:
    # in_driver: no Ray task (Ray is not even started here), node_cpus threads while it trains, the driver's own count
    # afterwards; the same teacher as train_teacher gives with those threads, saved in the cache, its epochs logged.
    import ray
    import yaml

    from kd_tune.space.parse import load_space_text
    from kd_tune.sweep.teacher_cache import get_teachers

    from .conftest import tiny_space

    spec = load_space_text(yaml.safe_dump(tiny_space(dataset={"name": "mnist", "train_size": 500, "val_size": 0},
                                                     teacher={"widths": [4, 8], "epochs": 1, "lr": 0.003, "batch_size": 64})), "space")
    (member,) = spec.teacher.members()
    key = teacher_key(spec.dataset, member, split)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        messages: list[str] = []
        (got,) = get_teachers(spec, split, resolve_storage(str(tmp_path / "store")), 2, messages.append, in_driver=True)
        assert torch.get_num_threads() == 1 and not ray.is_initialized()
        torch.set_num_threads(2)
        want = train_teacher(split, member, key, log=lambda s: None)
    finally:
        torch.set_num_threads(before)
    assert got.key == key and torch.equal(got.train_logits, want.train_logits) and torch.equal(got.test_logits, want.test_logits)
    assert any(m.startswith("teacher epoch 1/1") for m in messages) and any("cached in" in m for m in messages)
    assert TeacherCache(resolve_storage(str(tmp_path / "store"))).load(key) is not None


def test_weighted_ensemble_averages_logits_by_weight(split: data_split.DataSplit, teacher: Teacher) -> None:
    """An ensemble's members weighted as ``teacher.ensemble_weights`` says: cached logits and a live teacher alike."""
    from kd_tune.distill.online import OnlineTeacher
    from kd_tune.distill.teacher import ensemble_logits
    from kd_tune.space.parse import parse_space

    from .conftest import tiny_space

    other = replace(teacher, train_logits=teacher.train_logits * -2.0 + 1.0, test_logits=teacher.test_logits * -2.0 + 1.0)
    train, test, acc = ensemble_logits([teacher, other], split.test_y, (0.75, 0.25))
    # 0.75 z + 0.25 (-2 z + 1) = 0.25 z + 0.25, worked out by hand.
    torch.testing.assert_close(train, 0.25 * teacher.train_logits + 0.25)
    assert acc == pytest.approx(((0.25 * teacher.test_logits + 0.25).argmax(1) == split.test_y).float().mean().item())
    assert torch.equal(ensemble_logits([teacher, other], split.test_y)[1], torch.stack([teacher.test_logits, other.test_logits]).mean(0))

    nets = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    x = torch.randn(5, 3)
    live = OnlineTeacher(nets, (0.9, 0.1))(x)
    torch.testing.assert_close(live, 0.9 * nets[0](x) + 0.1 * nets[1](x))

    spec = parse_space(tiny_space(teacher={"widths": [8, 16], "epochs": 1, "ensemble": 3, "ensemble_weights": [2, 1, 1]}), "x.yaml")
    assert spec.teacher.weights() == (0.5, 0.25, 0.25)
    assert [m.ensemble_weights for m in spec.teacher.members()] == [(), (), ()]  # the members are the unweighted networks
    with pytest.raises(Exception, match=r"key 'teacher.ensemble_weights': bad value \[1, 1\]; allowed: 3 numbers >= 0"):
        parse_space(tiny_space(teacher={"widths": [8, 16], "epochs": 1, "ensemble": 3, "ensemble_weights": [1, 1]}), "x.yaml")
