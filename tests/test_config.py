from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kd_tune.errors import SpaceError
from kd_tune.space.parse import load_space, parse_space, space_to_yaml

from .conftest import DELETE, REPO, tiny_space, with_key

SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def test_there_are_shipped_spaces() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"smoke", "seed_alpha_grid", "alpha_temperature"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_is_valid(path: Path) -> None:
    spec = load_space(path)
    assert spec.name == path.stem  # the file name is the sweep's default name
    assert spec.planned_rows() > 0  # grid points, or a search's (a population's) trials
    # What is stored beside a sweep reads back to the same spec, with its packing pinned (a grid's default pack
    # follows the device, and a resume on other devices must train the same packs).
    pinned = replace(spec.resources, pack=None if spec.is_search else spec.resources.pack_size)
    assert parse_space(__import__("yaml").safe_load(space_to_yaml(spec)), "stored") == replace(spec, resources=pinned)


def test_seed_grid_is_the_study() -> None:
    spec = load_space(REPO / "search_spaces" / "seed_alpha_grid.yaml")
    assert spec.teacher.widths == (256, 512) and spec.student.widths == (16, 32)
    assert spec.grid.alpha == tuple(round(0.1 * i, 1) for i in range(11))
    assert spec.grid.epochs == (100, 300, 500, 1000) and spec.grid.temperature == (3.0,)
    points = spec.grid_points()
    assert sum(t.role == "student" for t in points) == 44
    assert sum(t.role == "scratch" for t in points) == 4
    # Epoch sharing: one trial per (alpha, T, seed) trains 1000 epochs and reports 100/300/500/1000.
    trials = spec.trials()
    assert len(trials) == 12 and all(t.milestones == (100, 300, 500, 1000) and t.epochs == 1000 for t in trials)
    assert spec.student_epochs() == 12 * 1000
    assert replace(spec, share_epochs=False).student_epochs() == 12 * 1900


def test_alpha_temperature_grid() -> None:
    spec = load_space(REPO / "search_spaces" / "alpha_temperature.yaml")
    assert spec.grid.temperature == (1.0, 2.0, 3.0, 5.0, 10.0)
    assert len([t for t in spec.grid_points() if t.role == "student"]) == 55


def test_defaults_and_trial_points() -> None:
    spec = parse_space(tiny_space(baselines=["scratch"]), "x.yaml")
    trials = spec.grid_points()
    assert len(trials) == 2 * 1 * 2 * 1 + 2
    assert [t.label for t in spec.trials()] == ["a0-T3-e1+2-s0", "a1-T3-e1+2-s0", "scratch-e1+2-s0"]
    assert spec.share_epochs
    scratch = [t for t in trials if t.role == "scratch"]
    assert all(t.alpha == 1.0 and t.temperature is None for t in scratch)
    assert spec.max_failures == 1 and spec.dataset.seed == 0


BAD = [
    # (key to change, value, key named in the error, words of the allowed values)
    ("bogus", 1, "bogus", "known keys"),
    ("grid.bogus", [1], "grid.bogus", "known keys"),
    ("teacher", DELETE, "teacher", "required"),
    ("dataset.normalize", "yes", "dataset.normalize", "true (mean/std standardization) or false (pixel / 255 only)"),
    ("dataset.normalize", 1, "dataset.normalize", "true (mean/std standardization) or false"),
    ("dataset.val_size", -1, "dataset.val_size", "an integer in [0, 59000]"),
    ("dataset.val_size", 2.5, "dataset.val_size", "an integer in [0, 59000]"),
    ("dataset.val_size", True, "dataset.val_size", "an integer in [0, 59000]"),
    ("dataset.val_size", 59001, "dataset.val_size", "what is left must hold train_size = 1000"),
    ("grid.alpha", DELETE, "grid.alpha", "required"),
    ("teacher.epochs", "ten", "teacher.epochs", "integer >= 1"),
    ("teacher.epochs", 2.5, "teacher.epochs", "integer >= 1"),
    ("student.lr", "fast", "student.lr", "number in (0, 10]"),
    ("student.precision", "float16", "student.precision", "float32 (the default) or bfloat16 (autocast)"),
    ("grid.alpha", [0.5, 1.5], "grid.alpha[1]", "number in [0, 1]"),
    ("grid.alpha", [-0.1], "grid.alpha[0]", "number in [0, 1]"),
    ("grid.alpha", [True], "grid.alpha[0]", "number in [0, 1]"),
    ("grid.temperature", [0], "grid.temperature[0]", "number in (0, inf]"),
    ("grid.temperature", [-2.0], "grid.temperature[0]", "number in (0, inf]"),
    ("grid.epochs", [0], "grid.epochs[0]", "integer >= 1"),
    ("grid.epochs", [], "grid.epochs", "non-empty list"),
    ("grid.seed", 3, "grid.seed", "non-empty list"),
    ("grid.alpha", [0.5, 0.5], "grid.alpha", "without repeated"),
    ("dataset.name", "imagenet", "dataset.name", "one of mnist"),
    ("teacher.widths", [256, -1], "teacher.widths[1]", "integer in [1, 65536]"),
    ("student.widths", [16, 3.5], "student.widths[1]", "integer in [1, 65536]"),
    ("student.widths", [16, 32, 64], "student.widths", "list of 2 positive integers"),
    ("dataset.train_size", 60001, "dataset.train_size", "integer in [10, 60000]"),
    ("dataset.train_size", 0, "dataset.train_size", "integer in [10, 60000]"),
    ("dataset.label_noise", 1.0, "dataset.label_noise", "number in [0, 1)"),
    ("dataset.label_noise", -0.1, "dataset.label_noise", "number in [0, 1)"),
    ("resources.gpu", -0.5, "resources.gpu", "number in [0, 64]"),
    ("resources.cpu", 0, "resources.cpu", "number in (0, 1024]"),
    ("name", "../escape", "name", "no path separators"),
    ("name", "a/b", "name", "no path separators"),
    ("name", "", "name", "no path separators"),
    ("name", "_teachers", "name", "starting with a letter or digit"),
    ("baselines", ["teacher"], "baselines[0]", "one of scratch"),
    ("max_failures", -1, "max_failures", "integer in [0, 100]"),
    ("share_epochs", "yes", "share_epochs", "true or false"),
    ("teacher.ensemble", 0, "teacher.ensemble", "integer in [1, 16]"),
    ("teacher.clean", "no", "teacher.clean", "true or false"),
    ("grid.label_noise", [0.0, 1.0], "grid.label_noise[1]", "number in [0, 1)"),
    ("grid.label_noise", [], "grid.label_noise", "non-empty list"),
    ("dataset.name", "cifar1000", "dataset.name", "one of mnist, fashion_mnist, cifar10, cifar100"),
]


@pytest.mark.parametrize("key,value,named,allowed", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_values_name_file_key_value_and_allowed(key: str, value: Any, named: str, allowed: str) -> None:
    with pytest.raises(SpaceError) as err:
        parse_space(with_key(tiny_space(), key, value), "spaces/bad.yaml")
    msg = str(err.value)
    assert msg.startswith("spaces/bad.yaml: ")
    assert f"key '{named}'" in msg
    assert allowed in msg
    if value is not DELETE:
        assert repr(value)[:20] in msg or repr(value) in msg or named.endswith("]")
    assert "\n" not in msg


def test_yaml_syntax_error_names_line(write_space: Callable[..., Path]) -> None:
    path = write_space("name: x\ngrid: {alpha: [0.1, 0.2\n")
    with pytest.raises(SpaceError, match=r"YAML syntax error at line \d+, column \d+"):
        load_space(path)


def test_missing_file() -> None:
    with pytest.raises(SpaceError, match="no such file"):
        load_space("does/not/exist.yaml")


def test_not_a_mapping(write_space: Callable[..., Path]) -> None:
    with pytest.raises(SpaceError, match="a YAML mapping"):
        load_space(write_space("- just\n- a list\n"))


def test_safe_load_refuses_python_objects(write_space: Callable[..., Path]) -> None:
    with pytest.raises(SpaceError, match="YAML"):
        load_space(write_space("name: !!python/object/apply:os.system ['true']\n"))


def test_ensemble_members_and_dataset_sizes() -> None:
    spec = load_space(REPO / "search_spaces" / "ensemble_teacher.yaml")
    assert [m.seed for m in spec.teacher.members()] == [0, 1, 2] and all(m.ensemble == 1 for m in spec.teacher.members())
    assert load_space(REPO / "search_spaces" / "fashion_mnist.yaml").dataset.name == "fashion_mnist"
    with pytest.raises(SpaceError, match=r"key 'dataset.train_size': bad value 50001; allowed: an integer in \[10, 50000\]"):
        parse_space(tiny_space(dataset={"name": "cifar10", "train_size": 50001}), "c.yaml")


def test_label_noise_axis() -> None:
    spec = parse_space(tiny_space(grid={"alpha": [0.5], "epochs": [1, 2], "label_noise": [0.0, 0.2]}, baselines=["scratch"]), "n.yaml")
    assert spec.noise_levels() == (0.0, 0.2)
    assert [t.label for t in spec.trials()] == ["a0.5-T3-e1+2-s0", "a0.5-T3-e1+2-s0-n0.2", "scratch-e1+2-s0", "scratch-e1+2-s0-n0.2"]
    assert len(spec.grid_points()) == 8
    with pytest.raises(SpaceError, match="either dataset.label_noise or grid.label_noise, not both"):
        parse_space(tiny_space(dataset={"name": "mnist", "label_noise": 0.1}, grid={"alpha": [0.5], "label_noise": [0.2]}), "n.yaml")
    shipped = load_space(REPO / "search_spaces" / "label_noise.yaml")
    assert len(shipped.noise_levels()) > 1


def test_val_size_default_and_what_train_size_leaves() -> None:
    space = tiny_space()
    del space["dataset"]["val_size"]
    assert parse_space(space, "s").dataset.val_size == 5000  # the documented default
    space["dataset"]["train_size"] = 58000
    assert parse_space(space, "s").dataset.val_size == 2000  # what the subset leaves, not an error
    space["dataset"]["train_size"] = None
    spec = parse_space(space, "s")
    assert spec.dataset.val_size == 5000 and spec.dataset.normalize is False
    space["dataset"]["val_size"] = 59991
    with pytest.raises(SpaceError, match=r"key 'dataset.val_size': bad value 59991; allowed: an integer in \[0, 59990\] .*one image per class"):
        parse_space(space, "s")
