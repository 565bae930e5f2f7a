"""Any teacher, any student, through the real CLI with a real local Ray and a real sqlite MLflow store: a grid over two
students (an MLP of the registry and a user's own factory from a module on PYTHONPATH) and two teachers (one trained
here, one pre-trained, from a file) gives one run per grid point with its params; and a factory or a teacher file that
does not fit the dataset is refused in one line before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_tune.distill.checkpoint import load_model_file, save_model_file
from kd_tune.distill.models import build, count_parameters, model_args
from kd_tune.tracking.tags import TAG_ROLE, TAG_SOURCE

from .conftest import FIXTURE_DATA, tiny_space

# Marked per test: the module also holds tests that need neither Ray nor a server (they stay in `-m "not integration"`).

FACTORY = '''
import math
from torch import nn


def tiny(in_shape, num_classes, width=8):
    """A user's own student: one hidden layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU(), nn.Linear(width, num_classes))
'''


def _cli(args: list[str], cwd: Path, modules: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "kd_tune.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "kdt_user_models.py").write_text(FACTORY)
    return folder


@pytest.mark.integration
def test_students_and_teachers_as_axes_with_a_user_factory_and_a_pretrained_teacher(write_space: Callable[..., Path], tmp_path: Path,
                                                                                    modules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_tune.data.split import normalize, prepare

    teacher_args = model_args("mlp", {"hidden": [32]}, (1, 28, 28), 10)
    save_model_file(tmp_path / "teacher.pt", teacher_args, build(teacher_args, seed=5).state_dict())  # another run's teacher, untrained
    space = tiny_space(name="models", grid={"alpha": [0.5], "epochs": [1], "seed": [0],
                                            "student": {"mine": {"arch": "kdt_user_models:tiny", "args": {"width": 16}},
                                                        "mlp": {"arch": "mlp", "hidden": [16]}},
                                            "teacher": {"trained": {}, "file": {"from": str(tmp_path / "teacher.pt")}}},
                       baselines=["scratch"], resources={"cpu": 1, "pack": 4})
    path = write_space(space)
    plan = _cli(["plan", str(path)], tmp_path, modules)
    assert plan.returncode == 0, plan.stderr
    assert "note: students of kdt_user_models:tiny (grid.student.mine) do not pack: one per trial" in plan.stdout
    res = _cli(["sweep", str(path), "--storage", str(tmp_path / "store"), "--data-dir", str(FIXTURE_DATA)], tmp_path, modules)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sweep 'models': 6/6 grid points finished" in res.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("models")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags[TAG_ROLE] in ("student", "scratch")]
    points = sorted((r.data.tags[TAG_ROLE], r.data.params["student"], r.data.params.get("teacher", "")) for r in children)
    assert points == [("scratch", "mine", ""), ("scratch", "mlp", ""), ("student", "mine", "file"), ("student", "mine", "trained"),
                      ("student", "mlp", "file"), ("student", "mlp", "trained")]  # one run per grid point
    sizes = {"mine": 784 * 16 + 16 + 16 * 10 + 10, "mlp": count_parameters(build(model_args("mlp", {"hidden": [16]}, (1, 28, 28), 10), 0))}
    for r in children:
        name = r.data.params["student"]
        assert r.data.params["student.arch"] == {"mine": "kdt_user_models:tiny", "mlp": "mlp"}[name]
        assert int(r.data.params["student.parameters"]) == sizes[name] and r.info.status == "FINISHED"
        if r.data.params.get("teacher") == "file":
            assert r.data.params["teacher.from"] == str(tmp_path / "teacher.pt")
    # Each run's model rebuilds from its file: the user's factory too (imported by name, as on every node).
    monkeypatch.syspath_prepend(str(modules))
    mine = next(r for r in children if r.data.params["student"] == "mine" and r.data.tags[TAG_ROLE] == "scratch")
    import mlflow.artifacts

    rebuilt = load_model_file(mlflow.artifacts.download_artifacts(run_id=mine.info.run_id, artifact_path="model/student.pt",
                                                                  dst_path=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert count_parameters(rebuilt) == sizes["mine"]

    teachers = [r for r in runs if r.data.tags[TAG_ROLE] == "teacher"]
    assert sorted(r.data.tags["kd_tune.teacher"] for r in teachers) == ["file", "trained"]
    loaded = next(r for r in teachers if r.data.tags["kd_tune.teacher"] == "file")
    assert loaded.data.tags[TAG_SOURCE] == str(tmp_path / "teacher.pt")
    # Its measured accuracy is the file's model's own on the sweep's test images (its logits were computed from it).
    split = prepare("mnist", 1000, 0.0, 0, FIXTURE_DATA, lambda s: None, val_size=100)
    model = build(teacher_args, seed=5).eval()
    with torch.no_grad():
        acc = float((model(normalize(split.test_x, split.info, standardize=False)).argmax(1) == split.test_y).float().mean())
    assert loaded.data.metrics["test_acc"] == pytest.approx(acc, abs=1e-9)


def test_a_model_that_does_not_fit_is_refused_before_anything_starts(write_space: Callable[..., Path], tmp_path: Path, modules: Path) -> None:
    five = model_args("mlp", {"hidden": [8]}, (1, 28, 28), 5)
    save_model_file(tmp_path / "five.pt", five, build(five, 0).state_dict())
    cases = [
        (tiny_space(student={"arch": "kdt_user_models:nope"}), "student.arch", "cannot import 'kdt_user_models:nope'"),
        (tiny_space(student={"arch": "kdt_user_models:tiny", "args": {"depth": 2}}), "student.arch", "unexpected keyword argument 'depth'"),
        (tiny_space(teacher={"from": str(tmp_path / "five.pt")}), "teacher.from", "the dataset has 10 classes"),
    ]
    for space, key, problem in cases:
        res = _cli(["sweep", str(write_space(space)), "--storage", str(tmp_path / "store"), "--data-dir", str(FIXTURE_DATA)], tmp_path, modules)
        lines = res.stderr.splitlines()
        assert res.returncode == 2 and len(lines) == 2 and f"key '{key}'" in lines[0] and problem in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.pt", "space.yaml", "user_code"]  # nothing written: no store, no MLflow
