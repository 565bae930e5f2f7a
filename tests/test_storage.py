"""--storage: local folders and object stores (a real S3-compatible server, moto, on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kd_tune.data import split as data_split
from kd_tune.distill.checkpoint import STATE_FILE
from kd_tune.distill.teacher import teacher_key, train_teacher
from kd_tune.errors import UsageError
from kd_tune.process import environment_kept
from kd_tune.space.options import SweepOptions
from kd_tune.space.schema import DatasetSpec
from kd_tune.space.sections import TeacherSpec, model_spec
from kd_tune.sweep.results import sweep_status
from kd_tune.sweep.start import SweepExistsError, resume_sweep, run_sweep
from kd_tune.sweep.state.storage import Storage, filesystem_type, is_network_fs, resolve_storage
from kd_tune.sweep.state.trial_state import newest_persisted
from kd_tune.sweep.teacher_cache import CACHE_FOLDER, TeacherCache

from .conftest import FIXTURE_DATA, tiny_space
from .servers import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        with environment_kept():
            os.environ.update(S3Server.CREDENTIALS)  # read by pyarrow here and by the Ray workers this process starts
            yield server
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return resolve_storage(str(tmp_path / "store"))
    s3: S3Server = request.getfixturevalue("s3")
    return resolve_storage(s3.uri(f"unit-{tmp_path.name}"))


def test_local_paths_and_file_uris_resolve_to_absolute_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KD_TUNE_STORAGE", raising=False)
    assert resolve_storage(None).root == str(tmp_path / "kd_tune_results") and resolve_storage(None).is_local
    assert resolve_storage("rel/dir").given == str(tmp_path / "rel" / "dir")
    assert resolve_storage(f"file://{tmp_path}/x").root == str(tmp_path / "x")
    monkeypatch.setenv("KD_TUNE_STORAGE", str(tmp_path / "from-env"))
    assert resolve_storage(None).root == str(tmp_path / "from-env")


@pytest.mark.parametrize("uri,expected", [
    ("nosuch://bucket/x", "--storage 'nosuch://bucket/x': "),
    ("s3://", "--storage 's3://': "),
])
def test_bad_storage_uri_is_a_usage_error(uri: str, expected: str) -> None:
    with pytest.raises(UsageError) as e:
        resolve_storage(uri)
    msg = str(e.value)
    assert msg.startswith(expected) and "allowed: a local folder, a folder every node mounts (NFS), or a URI such as s3://" in msg
    assert "\n" not in msg


def test_cli_bad_storage_exits_2_and_writes_nothing(write_space: Callable[..., Path], tmp_path: Path) -> None:
    space = write_space(tiny_space())
    res = subprocess.run([sys.executable, "-m", "kd_tune.cli", "sweep", str(space), "--storage", "nosuch://b/x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("kd-tune sweep: error: --storage 'nosuch://b/x': ") and "allowed:" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_network_file_systems_are_told_from_local_disks() -> None:
    mounts = ("overlay / overlay rw 0 0\n/dev/vda1 /data ext4 rw 0 0\nfiler:/export /data/shared nfs4 rw 0 0\n"
              "lustre@tcp:/fs /scratch lustre rw 0 0\ns3fs /mnt/bucket fuse.s3fs rw 0 0\n")
    assert filesystem_type("/data/shared/sweeps", mounts) == "nfs4" and is_network_fs("/data/shared/sweeps", mounts)
    assert filesystem_type("/data/sweeps", mounts) == "ext4" and not is_network_fs("/data/sweeps", mounts)
    assert filesystem_type("/data/sharedness", mounts) == "ext4"  # a prefix of the name is not a mount below it
    assert is_network_fs("/scratch/x", mounts) and is_network_fs("/mnt/bucket/x", mounts)
    assert not is_network_fs("/home/x", mounts)


def test_storage_files_roundtrip(storage: Storage) -> None:
    assert not storage.exists("a", "f.json") and storage.list_dirs() == []
    storage.write_text('{"v": 1}', "a", "f.json")
    storage.write_text('{"v": 2}', "a", "f.json")  # replaced whole
    storage.write_bytes(b"x", "b", "c", "g.bin")
    assert json.loads(storage.read_text("a", "f.json")) == {"v": 2}
    assert storage.list_dirs() == ["a", "b"] and storage.list_dirs("b") == ["c"]
    storage.delete("b")
    storage.delete("b")  # already gone: nothing to do
    assert storage.list_dirs() == ["a"] and not storage.exists("b", "c", "g.bin")
    if storage.is_local:
        assert sorted(p.name for p in Path(storage.root, "a").iterdir()) == ["f.json"]  # no temporary file left
    else:
        assert storage.show("a").startswith("s3://kd-tune/unit-")


def test_teacher_cache_and_checkpoints_on_storage(storage: Storage) -> None:
    split = data_split.prepare("mnist", 300, 0.0, 0, FIXTURE_DATA)
    spec = TeacherSpec(model_spec("cnn", widths=(4, 8)), epochs=1, lr=3e-3, batch_size=64)
    teacher = train_teacher(split, spec, teacher_key(DatasetSpec(train_size=300), spec, split), log=lambda s: None)
    cache = TeacherCache(storage)
    assert cache.load(teacher.key) is None
    cache.save(teacher, {})
    loaded = cache.load(teacher.key)
    assert loaded is not None and loaded.cached and torch.equal(loaded.test_logits, teacher.test_logits)
    raw = storage.read_bytes(CACHE_FOLDER, teacher.key, "teacher.pt")
    storage.write_bytes(raw[: len(raw) // 2], CACHE_FOLDER, teacher.key, "teacher.pt")  # a torn copy
    messages: list[str] = []
    assert cache.load(teacher.key, messages.append) is None and "sha256 mismatch" in messages[0]
    assert cache.keys() == []  # discarded, to be trained again

    # The newest complete checkpoint of a trial, as a restarted trial finds it in the storage.
    for epoch in (1, 2):
        buf = io.BytesIO()
        torch.save({"epoch": epoch, "model": teacher.state_dict}, buf)
        storage.write_bytes(buf.getvalue(), "sweep", "t_1", f"checkpoint_{epoch:06d}", STATE_FILE)
    storage.write_bytes(b"torn", "sweep", "t_1", "checkpoint_000003", STATE_FILE)
    state = newest_persisted(storage, "sweep/t_1")
    assert state is not None and state["epoch"] == 2
    assert newest_persisted(storage, "sweep/none") is None


@pytest.fixture
def ray_with_s3_credentials(s3: S3Server) -> Iterator[None]:
    """One real embedded Ray (as ``run_sweep`` starts it, the test S3 server's credentials in its workers'
    environment) for a sweep and its resume, instead of one each."""

    from kd_tune.sweep.cluster.connect import connect_ray, shutdown_ray

    assert connect_ray(None)
    try:
        yield
    finally:
        shutdown_ray()


@pytest.mark.integration
def test_sweep_on_s3_storage_then_resume(s3: S3Server, ray_with_s3_credentials: None, write_space: Callable[..., Path], tmp_path: Path) -> None:
    """Ray Tune's state and checkpoints, the teacher cache and the sweep record all in the bucket."""
    uri = s3.uri("sweeps")
    opts = SweepOptions(storage=uri, data_dir=str(FIXTURE_DATA), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", quiet=True)
    space = write_space(tiny_space(name="ons3", grid={"alpha": [0.5], "epochs": [1, 2]}, baselines=["scratch"]))
    outcome = run_sweep(space, resolve_storage(opts.storage), opts, log=lambda s: None)
    assert outcome.ok and outcome.total == 4
    assert outcome.path == "s3://kd-tune/sweeps/ons3"
    store = resolve_storage(uri)
    assert store.list_dirs() == ["_teachers", "ons3"] and len(TeacherCache(store).keys()) == 1
    assert store.exists("ons3", "kd_tune_sweep.json") and store.exists("ons3", "kd_tune_space.yaml")
    trials = [d for d in store.list_dirs("ons3") if d.startswith(("a0.5", "scratch"))]
    assert len(trials) == 2 and all(store.list_dirs("ons3", t) for t in trials)  # checkpoints persisted in the bucket
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock", "space.yaml"]  # nothing on the local disk but the store (and the lock its first opening took)

    st = sweep_status("ons3", resolve_storage(uri))
    assert st.counts["finished"] == 2 and not st.driver_alive
    with pytest.raises(SweepExistsError) as e:
        run_sweep(space, resolve_storage(opts.storage), opts, log=lambda s: None)
    assert f"kd-tune resume ons3 --storage '{uri}'" in str(e.value)  # quoted: the URI has '&' in it
    messages: list[str] = []
    again = resume_sweep("ons3", resolve_storage(uri), SweepOptions(data_dir=str(FIXTURE_DATA)), log=messages.append)
    assert again.ok and set(again.table["how"]) == {"restored"}
    assert any("from the cache (s3://kd-tune/sweeps/_teachers/" in m for m in messages)


def test_storage_the_driver_cannot_write_is_refused_before_anything_starts(s3: S3Server, write_space: Callable[..., Path],
                                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    space = write_space(tiny_space())
    (tmp_path / "a-file").write_text("not a folder")
    missing_bucket = s3.uri("x").replace(f"s3://{s3.bucket}/", "s3://no-such-bucket/")
    for storage in (str(tmp_path / "a-file" / "store"), missing_bucket):
        with pytest.raises(UsageError) as e:
            run_sweep(space, resolve_storage(storage), SweepOptions(data_dir=str(FIXTURE_DATA)), log=lambda s: None)
        assert str(e.value).startswith(f"--storage {storage!r}: cannot write there (") and "allowed: " in str(e.value)
        assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "space.yaml"]  # no MLflow store, no storage folder


def test_a_truncated_tune_search_state_is_put_back_from_the_drivers_staging_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Tune copies its search algorithm's state (a pickle, ``basic-variant-state-*.json`` for a grid) into the sweep's
    folder in place too: a SIGKILLed driver left it empty in a packed kill test and the resume failed ("EOFError: Ran
    out of input"). Every cut of a pickle is told from the whole one without unpickling it; the whole staging copy
    replaces a cut one."""
    import pickle

    from kd_tune.sweep.state.tune_state import _whole_pickle_bytes, can_restore

    state = pickle.dumps({"_finished": True, "_counter": 2, "_uuid_prefix": "ab12_", "_total_samples": 2, "iterators": [list(range(50))]})
    assert _whole_pickle_bytes(state) and not any(_whole_pickle_bytes(state[:cut]) for cut in range(len(state)))
    storage = resolve_storage(str(tmp_path / "store"))
    folder = tmp_path / "store" / "study"
    folder.mkdir(parents=True)
    (folder / "experiment_state-2026-11-28_02-16-00.json").write_text(json.dumps({"trial_data": [], "runner_data": {}}))
    name = "basic-variant-state-2026-11-28_02-16-00.json"
    (folder / name).write_bytes(b"")  # cut before its first byte, as in the kill test
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    staging = tmp_path / "tmp" / "ray" / "session_2026-11-28_02-15-50_1" / "artifacts" / "2026-11-28_02-16-00" / "study" / "driver_artifacts"
    staging.mkdir(parents=True)
    (staging / name).write_bytes(state)
    assert can_restore(storage, "study")
    assert (folder / name).read_bytes() == state
    (folder / name).write_bytes(state[:-1])
    (staging / name).write_bytes(state[:-3])  # no whole copy anywhere: left as it is
    can_restore(storage, "study")
    assert (folder / name).read_bytes() == state[:-1]
    # ... and a resume says so in one line, before anything starts (Tune would make the grid's trials again).
    from kd_tune.cli.app import main
    from kd_tune.sweep.state.sweep_files import SweepRecord
    from kd_tune.sweep.state.tune_state import torn_tune_states

    assert torn_tune_states(storage, "study") == [folder / name]
    SweepRecord("study", f"sqlite:///{tmp_path / 'mlflow.db'}", "1", "parent").save(storage)
    assert main(["resume", "study", "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kd-tune resume: error: sweep 'study' cannot be resumed: Ray Tune's saved state {folder / name} was cut short by a kill")
    assert "did not end normally" not in err and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_a_truncated_ray_experiment_state_is_put_back_from_the_drivers_staging_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray copies its experiment state into the sweep's folder in place: a driver SIGKILLed mid-copy left one cut at
    80 KiB in a kill test, and status and resume could not read it. The whole staging copy in Ray's temp folder
    replaces it, unless a driver is running (it may be writing) or no whole copy exists (then it stays, untouched)."""
    import socket

    from kd_tune.sweep.state.sweep_files import DRIVER_FILE
    from kd_tune.sweep.state.tune_state import can_restore, repair_experiment_state

    storage = resolve_storage(str(tmp_path / "store"))
    folder = tmp_path / "store" / "study"
    folder.mkdir(parents=True)
    whole = json.dumps({"trial_data": ["x" * 5000], "runner_data": {}}).encode()
    name = "experiment_state-2026-11-27_13-16-17.json"
    (folder / "experiment_state-2026-11-27_10-00-00.json").write_bytes(b"{}")  # an earlier driver's: not the newest
    (folder / name).write_bytes(whole[:4096])  # cut short mid-copy
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    staging = tmp_path / "tmp" / "ray" / "session_2026-11-27_13-16-07_1" / "artifacts" / "2026-11-27_13-16-17" / "study" / "driver_artifacts"
    staging.mkdir(parents=True)
    (staging / name).write_bytes(whole)

    (folder / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live driver
    assert not repair_experiment_state(storage, "study") and (folder / name).read_bytes() == whole[:4096]
    (folder / DRIVER_FILE).unlink()
    can_restore(storage, "study")  # what every reader of Ray's state asks first
    assert (folder / name).read_bytes() == whole
    assert not repair_experiment_state(storage, "study")  # whole now: nothing to do

    (folder / name).write_bytes(whole[:100])
    (staging / name).write_bytes(whole[:50])  # no whole copy anywhere: left as it is (Ray's error names the file)
    assert not repair_experiment_state(storage, "study") and (folder / name).read_bytes() == whole[:100]
