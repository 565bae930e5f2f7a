"""``teacher.from`` with what a finished kd-tune sweep wrote for its teacher (issue 35): the cached teacher's file and its
folder in the sweep's storage, the teacher run's ``runs:/`` artifact and its ``models:/`` model, all from the session's
shared sweep (conftest's ``native_sweep``). One real ``kd-tune sweep`` process takes all four as a grid axis, and it
must exit within seconds of its last line: an MLflow artifact download leaves a thread pool behind, which once kept the
process waiting forever."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kd_tune.distill.checkpoint import load_model_file
from kd_tune.distill.pretrained import load_model, portable_bytes
from kd_tune.tracking.logged_models import find_model
from kd_tune.tracking.tags import TAG_PARENT, TAG_ROLE, TAG_SOURCE

from .conftest import FIXTURE_DATA, Swept, tiny_space

pytestmark = pytest.mark.integration


def _cached_entry(swept: Swept) -> Path:
    (entry,) = (Path(swept.storage) / "_teachers").iterdir()
    return entry


def test_a_cached_teacher_loads_as_the_teacher_run_logged_it(native_sweep: Swept, tmp_path: Path) -> None:
    entry = _cached_entry(native_sweep)
    (run,) = native_sweep.runs["teacher"]
    logged = load_model_file(native_sweep.client.download_artifacts(run.info.run_id, "model/teacher.pt", str(tmp_path)))
    x = torch.rand(4, 1, 28, 28)
    for source in (entry, entry / "teacher.pt"):
        model, margs = load_model(source)
        assert margs is not None and margs["arch"] == "cnn"
        assert torch.equal(model(x), logged(x))  # the same network, bit for bit
    # What a Ray task or a live teacher on another node gets: one file that rebuilds it alone, without the meta beside it.
    (tmp_path / "alone.pt").write_bytes(portable_bytes(entry))
    assert torch.equal(load_model(tmp_path / "alone.pt")[0](x), logged(x))


def test_a_cached_teacher_without_its_meta_or_with_another_file_is_refused_naming_what_to_pass(native_sweep: Swept, tmp_path: Path) -> None:
    entry = _cached_entry(native_sweep)
    shutil.copy(entry / "teacher.pt", tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="without a readable meta.json beside it"):
        load_model(tmp_path / "teacher.pt")
    (tmp_path / "meta.json").write_text((entry / "meta.json").read_text().replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_model(tmp_path / "teacher.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"_teachers/<key>/teacher\.pt \(or that folder\), or its MLflow run's runs:/<run id>/model/teacher\.pt"):
        load_model(tmp_path / "other.pt")


def _sweep_until_exit(args: list[str], cwd: Path, timeout: float) -> tuple[int, list[tuple[float, str]], float]:
    """Runs the ``kd-tune`` command; its exit code, each output line with the time it came, and the time it exited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "kd_tune.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(10)
        pytest.fail(f"kd-tune sweep did not exit within {timeout} s; its last lines:\n" + "\n".join(s for _, s in lines[-20:]))
    ended = time.monotonic()
    reader.join(10)
    return code, lines, ended


@pytest.mark.slow
def test_a_sweep_takes_its_teachers_from_a_finished_sweep_and_exits_promptly(native_sweep: Swept, tmp_path: Path) -> None:
    entry = _cached_entry(native_sweep)
    (teacher_run,) = native_sweep.runs["teacher"]
    run_id = teacher_run.info.run_id
    model_id = find_model(native_sweep.client, native_sweep.experiment_id, run_id, "teacher")
    assert model_id
    # A copy of the shared store (its artifacts stay where the sweep wrote them): this sweep's runs go into the copy.
    shutil.copy(native_sweep.folder / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sources = {"cache": str(entry / "teacher.pt"), "folder": str(entry), "run": f"runs:/{run_id}/model/teacher.pt", "model": f"models:/{model_id}"}
    space = tiny_space(name="reuse", student={"arch": "mlp", "hidden": [8], "lr": 0.003, "batch_size": 64},
                       grid={"alpha": [0.5], "temperature": [3.0], "epochs": [1], "seed": [0],
                             "teacher": {k: {"from": v} for k, v in sources.items()}})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    code, lines, ended = _sweep_until_exit(["sweep", "space.yaml", "--storage", str(tmp_path / "store"), "--tracking-uri", uri,
                                            "--data-dir", str(FIXTURE_DATA)], tmp_path, timeout=300)
    text = "\n".join(s for _, s in lines)
    assert code == 0, text[-3000:]
    assert "4/4 grid points finished" in text, text[-3000:]
    # The last line came, then the process ended: no thread pool left to wait for (the watchdog would say so after 15 s).
    assert ended - lines[-1][0] < 10, (ended - lines[-1][0], text[-2000:])
    assert "threads still running" not in text
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("reuse")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    students = [r for r in runs if r.data.tags.get(TAG_ROLE) == "student" and r.data.tags.get(TAG_PARENT)]
    teachers = {r.data.tags[TAG_SOURCE] for r in runs if r.data.tags.get(TAG_ROLE) == "teacher"}
    assert len(students) == 4 and all(r.info.status == "FINISHED" for r in students)
    # Each source was read as the same network: the logits the cache and the run artifact give are identical, so
    # both runs of their teachers measured the same accuracy (the folder resolves to the cached file itself).
    assert teachers == {sources["cache"], sources["run"], sources["model"]}, teachers
    accs = {r.data.tags[TAG_SOURCE]: r.data.metrics["test_acc"] for r in runs if r.data.tags.get(TAG_ROLE) == "teacher"}
    assert accs[sources["cache"]] == accs[sources["run"]] == pytest.approx(teacher_run.data.metrics["test_acc"])
