"""Your own datasets: a folder in ImageFolder's layout and a .npz file, made here, read with their shape, channels and
classes; and through the real CLI (a real local Ray, a real sqlite MLflow store) a sweep on each, the npz one with
augmented students and a live teacher; bad keys, unreadable folders, inconsistent shapes and data too large for memory
each refused in one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from kd_tune.data.custom import DataError, describe, load_own
from kd_tune.errors import SpaceError
from kd_tune.space.parse import parse_space

from .conftest import tiny_space

CLASSES = ("cat", "dog", "emu")


def make_folder(root: Path, per_class: int = 12, size: tuple[int, int] = (10, 12), rgb: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c, name in enumerate(CLASSES):
            (root / part / name).mkdir(parents=True)
            for i in range(per_class if part == "train" else 4):
                a = rng.integers(0, 60, (*size, 3) if rgb else size, dtype=np.uint8)
                a[:, c * size[1] // 3 : (c + 1) * size[1] // 3] += 150
                Image.fromarray(a).save(root / part / name / f"{i}.png")
    return root


def make_npz(path: Path, n_train: int = 300, n_test: int = 60) -> Path:
    rng = np.random.default_rng(1)
    y_train, y_test = rng.integers(0, 4, n_train), rng.integers(0, 4, n_test)

    def images(y: np.ndarray) -> np.ndarray:
        x = rng.integers(0, 60, (len(y), 14, 14), dtype=np.uint8)
        for i, label in enumerate(y):
            x[i, label * 3 : label * 3 + 4, :] += 180  # a bright band per class
        return x

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def test_an_image_folder_is_read_with_its_shape_channels_and_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "pets", rgb=True)
    layout = describe(str(root))
    assert layout.shape == (3, 10, 12) and layout.classes == CLASSES and (layout.train_count, layout.test_count) == (36, 12)
    info, train_x, train_y, test_x, test_y = load_own(str(root), "pets", 0.0, 0)
    assert info.shape == (3, 10, 12) and info.num_classes == 3 and train_x.shape == (36, 3, 10, 12) and test_x.shape == (12, 3, 10, 12)
    assert sorted(train_y.tolist()) == sorted([0] * 12 + [1] * 12 + [2] * 12) and train_x.dtype == test_x.dtype
    # each class's band, where the files put it (label = the sorted folder's index)
    band = train_x[train_y == 2].float().mean(dim=(0, 1, 2))
    assert band[8:].mean() > band[:4].mean() + 100


def test_a_npz_file_and_a_test_split(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "bands.npz")
    info, train_x, train_y, test_x, _ = load_own(str(path), "bands", 0.0, 0)
    assert info.shape == (1, 14, 14) and info.num_classes == 4 and (train_x.shape[0], test_x.shape[0]) == (300, 60)
    x = np.zeros((50, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x=x, y=np.arange(50) % 5)
    info, train_x, train_y, test_x, test_y = load_own(str(tmp_path / "one.npz"), "one", 0.2, 0)
    assert info.shape == (3, 8, 8) and (train_x.shape[0], test_x.shape[0]) == (40, 10) and sorted(test_y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_unusable_data_says_what_is_wrong(tmp_path: Path) -> None:
    from PIL import Image

    root = make_folder(tmp_path / "mixed", per_class=2)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(root / "train" / "dog" / "odd.png")
    with pytest.raises(DataError, match=r"odd.png is 9x9 pixels, the first image 12x10; allowed: images of one size"):
        load_own(str(root), "mixed", 0.0, 0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match="holds no class folders of images"):
        describe(str(tmp_path / "empty"))
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a readable .npz file"):
        describe(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "floats.npz", x_train=np.zeros((4, 8, 8)), y_train=np.zeros(4, int), x_test=np.zeros((2, 8, 8)), y_test=np.zeros(2, int))
    with pytest.raises(DataError, match="x_train is float64; allowed: uint8 images"):
        load_own(str(tmp_path / "floats.npz"), "floats", 0.0, 0)


@pytest.mark.parametrize("section,key,allowed", [
    ({"name": "mnist", "path": "{tmp}"}, "dataset.name", "a name of your own with dataset.path"),
    ({"name": "mine", "path": "{tmp}/nowhere"}, "dataset.path", "an existing folder in ImageFolder's layout"),
    ({"name": "mine", "path": "{tmp}"}, "dataset.val_size", "this key is required with dataset.path"),
    ({"name": "mine", "path": "{tmp}", "val_size": 10, "test_split": 1.0}, "dataset.test_split", "a number in [0, 1)"),
    ({"name": "mine", "path": "{tmp}", "val_size": 10, "max_gb": 0}, "dataset.max_gb", "a number in (0, 1e+06]"),
    ({"name": "mnist", "max_gb": 1}, "dataset.max_gb", "this key only with dataset.path"),
])
def test_bad_dataset_keys(tmp_path: Path, section: dict[str, object], key: str, allowed: str) -> None:
    section = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in section.items()}
    with pytest.raises(SpaceError) as e:
        parse_space(tiny_space(dataset=section), "s.yaml")
    assert e.value.key == key and allowed in e.value.allowed, (e.value.key, e.value.allowed)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "kd_tune.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.integration
def test_sweeps_on_your_own_data_with_augmented_students_and_a_live_teacher(write_space: Callable[..., Path], tmp_path: Path) -> None:
    npz, folder = make_npz(tmp_path / "bands.npz"), make_folder(tmp_path / "pets")
    student = {"arch": "mlp", "hidden": [16], "lr": 0.003, "batch_size": 32}
    space = tiny_space(name="bands", dataset={"name": "bands", "path": str(npz), "val_size": 30},
                       teacher={"arch": "mlp", "hidden": [32], "epochs": 2, "lr": 0.003, "batch_size": 32, "augment": "shift"},
                       student={**student, "augment": "shift"}, grid={"alpha": [0.5], "epochs": [1, 2], "seed": [0, 1]},
                       baselines=["scratch"], resources={"cpu": 1, "pack": 4})
    res = _cli(["sweep", str(write_space(space, "bands.yaml")), "--storage", str(tmp_path / "store")], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sweep 'bands': 8/8 grid points finished" in res.stdout
    pets = tiny_space(name="pets", dataset={"name": "pets", "path": str(folder), "val_size": 6}, student=student,
                      grid={"alpha": [0.5], "epochs": [1], "seed": [0]})
    res = _cli(["sweep", str(write_space(pets, "pets.yaml")), "--storage", str(tmp_path / "store")], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name, rows, classes in (("bands", 270, 4), ("pets", 30, 3)):
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["kd_tune.role"] in ("student", "scratch")]
        assert runs and all(r.info.status == "FINISHED" for r in runs)
        train = next(d for d in runs[0].inputs.dataset_inputs if d.dataset.name == f"{name}-train")
        profile = json.loads(train.dataset.profile)
        assert profile["num_rows"] == rows and len(profile["class_counts"]) == classes  # the own data, as the runs used it
        assert json.loads(train.dataset.source)["uri"] == str(npz if name == "bands" else folder)
    bands = client.get_experiment_by_name("bands")
    assert bands is not None
    augmented = [r for r in client.search_runs([bands.experiment_id]) if r.data.tags["kd_tune.role"] == "student"]
    assert {r.data.params["student.augment"] for r in augmented} == {"shift"}


@pytest.mark.parametrize("case", ["too large", "inconsistent", "val_size"])
def test_own_data_that_cannot_be_used_is_refused_before_anything_starts(write_space: Callable[..., Path], tmp_path: Path, case: str) -> None:
    folder = make_folder(tmp_path / "pets", per_class=3)
    dataset: dict[str, object] = {"name": "pets", "path": str(folder), "val_size": 3}
    if case == "too large":
        dataset["max_gb"] = 1e-6
    elif case == "inconsistent":
        (folder / "test" / "cat").rename(folder / "test" / "cow")
    else:
        dataset["val_size"] = 8
    problem = {"too large": "21 images of 1x10x12 are 0.00 GB as uint8", "inconsistent": "test/ has the classes ['cow', 'dog', 'emu']",
               "val_size": "an integer in [0, 6]"}[case]
    res = _cli(["sweep", str(write_space(tiny_space(dataset=dataset))), "--storage", str(tmp_path / "store")], tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 2 and problem in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets", "space.yaml"]  # nothing written


def test_an_own_data_space_is_stored_and_read_back_whole(tmp_path: Path) -> None:
    from kd_tune.space.parse import load_space_text, space_to_yaml

    path = make_npz(tmp_path / "bands.npz")
    spec = parse_space(tiny_space(dataset={"name": "bands", "path": str(path), "val_size": 30, "test_split": 0.0, "max_gb": 2},
                                  student={"widths": [4, 8], "augment": "shift"}), "s.yaml")
    assert spec.dataset.path == str(path) and spec.dataset.max_gb == 2 and spec.student.online
    stored = load_space_text(space_to_yaml(spec), "stored.yaml")
    assert stored.dataset == spec.dataset and stored.student == spec.student
