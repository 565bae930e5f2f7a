"""Trials are packs (resources.pack / --pack): the grid points grouped into packed trials, recorded in MLflow
exactly as an unpacked sweep records them (kd_tune.packed trains them; tests/test_packed.py checks the math)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.errors import FlagError, SpaceError
from kd_tune.space.options import SweepOptions, apply_overrides
from kd_tune.space.parse import load_space_text, parse_space
from kd_tune.space.trials import TrialConfig
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.tracking.tags import EPOCH_METRICS, TAG_ROLE

from .conftest import FIXTURE_DATA, tiny_space
from .helpers import LOSS_REL, ONE_TEST_IMAGE

# alpha {0, 0.5, 1} x 2 label-noise levels + a scratch baseline per level, epochs {1, 2} shared: 16 grid points,
# 8 epoch-shared trials, 2 packs of 4.
GRID = {"alpha": [0.0, 0.5, 1.0], "temperature": [3.0], "epochs": [1, 2], "seed": [0], "label_noise": [0.0, 0.2]}


def _spec(**resources: Any) -> Any:
    return parse_space(tiny_space(grid=GRID, baselines=["scratch"], resources={"cpu": 1, "gpu": 0, **resources}), "s.yaml")


def test_packs_group_trials_in_grid_order() -> None:
    unpacked, packed = _spec(), _spec(pack=3)
    assert unpacked.resources.pack_size == 1 and not unpacked.packed
    # pack 1: today's configs, exactly (old sweeps resume, nothing changes for unpacked sweeps)
    assert unpacked.tune_configs() == [{"point": t.as_config()} for t in unpacked.trials()]
    assert [len(p) for p in unpacked.packs()] == [1] * 8
    packs = packed.packs()
    assert [len(p) for p in packs] == [3, 3, 2]
    assert [t for p in packs for t in p] == packed.trials()  # grid order, every trial once
    configs = packed.tune_configs()
    assert [TrialConfig.decode(c).points for c in configs] == packs
    assert TrialConfig.decode(configs[0]).label == "pack3-a0-T3-e1+2-s0"
    assert packed.trials() == unpacked.trials() and packed.student_epochs() == unpacked.student_epochs()
    # the params of a grid point's run do not depend on packing
    assert packed.flat_params() == unpacked.flat_params() and "resources.pack" not in packed.flat_params()
    # members of a pack train the same epochs: without sharing, one pack per epochs value at least
    separate = parse_space(tiny_space(grid={"alpha": [0.0, 1.0], "epochs": [1, 2]}, resources={"pack": 8}), "s.yaml")
    from dataclasses import replace

    assert [[t.epochs for t in p] for p in replace(separate, share_epochs=False).packs()] == [[1, 1], [2, 2]]
    # the stored space keeps the pack (a resume trains the same packs)
    from kd_tune.space.parse import space_to_yaml

    assert load_space_text(space_to_yaml(packed), "x").resources.pack == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True, 2000])
def test_bad_resources_pack(value: object) -> None:
    with pytest.raises(SpaceError, match=r"resources\.pack") as e:
        _spec(pack=value)
    assert "an integer in [1, 1024]" in str(e.value) and "\n" not in str(e.value)


def test_pack_flag() -> None:
    spec = _spec()
    assert apply_overrides(spec, SweepOptions(pack=4)).resources.pack_size == 4
    assert apply_overrides(_spec(pack=4), SweepOptions()).resources.pack == 4
    for bad in (0, -3):
        with pytest.raises(FlagError, match=r"--pack .*an integer in \[1, 1024\]"):
            apply_overrides(spec, SweepOptions(pack=bad))
    search = {"algorithm": "random", "num_samples": 2}
    with pytest.raises(SpaceError, match="a search trains one student per trial"):
        parse_space(tiny_space(search=search, resources={"pack": 2}), "s.yaml")
    with pytest.raises(FlagError, match="one student per trial"):
        apply_overrides(parse_space(tiny_space(search=search), "s.yaml"), SweepOptions(pack=2))


def test_the_default_pack_follows_the_trials_device() -> None:
    from dataclasses import replace

    from kd_tune.distill.packed import channels_last_on
    from kd_tune.space.parse import space_to_yaml
    from kd_tune.space.schema import GPU_PACK

    cpu, gpu = _spec(), _spec(gpu=0.25)
    assert cpu.resources.pack is None and cpu.resources.pack_size == 1 and not cpu.packed
    assert gpu.resources.pack_size == GPU_PACK == 64 and gpu.packed and [len(p) for p in gpu.packs()] == [8]
    assert _spec(gpu=1, pack=4).resources.pack_size == 4 and _spec(gpu=1, pack=None).resources.pack_size == GPU_PACK
    # the flags decide the device, hence the default: a GPU space run on CPUs trains one student per trial
    assert apply_overrides(gpu, SweepOptions(gpus_per_trial=0)).resources.pack_size == 1
    assert apply_overrides(cpu, SweepOptions(gpus_per_trial=1)).resources.pack_size == GPU_PACK
    # a search keeps one student per trial on a GPU too, and that is no error
    search = parse_space(tiny_space(search={"algorithm": "random", "num_samples": 2}, resources={"cpu": 1, "gpu": 1}), "s.yaml")
    assert not search.packed and all(len(p) == 1 for p in search.packs())
    assert load_space_text(space_to_yaml(search), "x").resources.pack is None
    # the stored space says the packs as trained: a resume on other devices trains the same packs
    stored = load_space_text(space_to_yaml(gpu), "x")
    assert stored.resources.pack == GPU_PACK
    assert apply_overrides(stored, SweepOptions(gpus_per_trial=0)).packs() == gpu.packs()
    assert load_space_text(space_to_yaml(replace(gpu, resources=replace(gpu.resources, gpu=0.0))), "x").resources.pack == 1
    # NCHW packs on a GPU, channels_last on a CPU (benchmarks/RESULTS.md)
    assert channels_last_on("cpu") and not channels_last_on("cuda") and not channels_last_on(torch.device("cuda", 1))


def test_plan_shows_packs(write_space: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tiny_space(grid=GRID, baselines=["scratch"]))
    assert main(["plan", str(space), "--pack", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 packed trials of up to 4 students" in out
    assert "pack 1: 4 students, trains 2 epochs: a0-T3-e1+2-s0, a0.5-T3-e1+2-s0, a1-T3-e1+2-s0, a0-T3-e1+2-s0-n0.2" in out
    assert "pack 2: 4 students, trains 2 epochs: a0.5-T3-e1+2-s0-n0.2, a1-T3-e1+2-s0-n0.2, scratch-e1+2-s0, scratch-e1+2-s0-n0.2" in out
    assert "student epochs: 16" in out
    assert main(["plan", str(space), "--pack", "0"]) == 2
    # unset, the pack follows the device: one pack of 8 on a GPU, and plan says why
    assert main(["plan", str(write_space(tiny_space(grid=GRID, baselines=["scratch"], resources={"cpu": 1, "gpu": 0.5})))]) == 0
    out = capsys.readouterr().out
    assert "1 packed trial of up to 64 students" in out and "8 students in 1 pack (resources.pack unset: 64 when trials get a GPU, as resources.gpu 0.5 asks; --pack 1" in out


def _record(client: MlflowClient, name: str) -> dict[Any, Any]:
    """Each child run by its params (what identifies a grid point), with its status, tags and metric histories."""
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    out: dict[Any, Any] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get(TAG_ROLE) not in ("student", "scratch"):
            continue
        params = tuple(sorted((k, v) for k, v in r.data.params.items() if k != "name"))
        assert params not in out, f"two runs for {params}"
        out[params] = {
            "name": r.info.run_name, "status": r.info.status, "diverged": r.data.tags.get("kd_tune.diverged"),
            "error": r.data.tags.get("kd_tune.error"),
            "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id)) + sorted(a.path for a in client.list_artifacts(r.info.run_id, "model")),
            "metrics": {k: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                        for k in r.data.metrics},
        }
    return out


def _close(metric: str, a: float, b: float) -> bool:
    """tests/test_packed.py's tolerances: losses within LOSS_REL relative; accuracies within one image."""
    if metric == "epoch_seconds":
        return True  # a pack splits its epoch's wall time over its members
    if metric.endswith("loss"):
        return a == b or abs(a - b) <= LOSS_REL * max(abs(b), 1e-12)
    if metric in ("test_acc", "teacher_agreement"):
        return abs(a - b) <= ONE_TEST_IMAGE
    if metric == "val_acc":
        return abs(a - b) <= 1 / 100 + 1e-9
    return abs(a - b) <= 0.01  # macro precision / recall / F1, ECE: one image moves them by < 0.01


@pytest.mark.integration
def test_packed_sweep_records_what_an_unpacked_sweep_records(write_space: Callable[..., Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_tune.sweep.start import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One member's loss is NaN (its images in the unpacked trial, its outputs in the pack): it diverges, alone.
    monkeypatch.setenv("KD_TUNE_TEST_FAULT", "a0.5-T3-e1+2-s0-n0.2:nan")

    from kd_tune.sweep.cluster.connect import connect_ray, shutdown_ray

    assert connect_ray(None)  # one Ray (started after the fault is set: its workers inherit it) for both sweeps
    records, tables = {}, {}
    try:
        for name, pack in (("unpacked", None), ("packed", 4)):
            outcome = run_sweep(write_space(tiny_space(name=name, grid=GRID, baselines=["scratch"]), f"{name}.yaml"),
                                resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True, pack=pack),
                                log=lambda s: None)
            assert outcome.total == 16 and outcome.finished == 14 and outcome.diverged == 2, outcome.table
            records[name], tables[name] = _record(MlflowClient(uri), name), outcome.table
    finally:
        shutdown_ray()
    from ray import tune

    trials = tune.ExperimentAnalysis(str(tmp_path / "store" / "packed")).trials
    assert sorted(len(t.config["pack"]) for t in trials) == [4, 4]  # two trials, each a pack of 4
    assert tables["packed"].drop(columns=["test_acc", "test_loss", "teacher_agreement"]).equals(
        tables["unpacked"].drop(columns=["test_acc", "test_loss", "teacher_agreement"]))

    _same_record(records["unpacked"], records["packed"])

    # A tracking outage, as far as this member is concerned: its runs never reached the store. kd-tune sync
    # rebuilds them from the pack's checkpoints (metrics of every epoch, each run's model), the rest is untouched.
    from kd_tune.sweep.state.sync import sync_sweep

    client = MlflowClient(uri)
    lost = [r for r in client.search_runs([client.get_experiment_by_name("packed").experiment_id])  # type: ignore[union-attr]
            if r.data.tags.get("kd_tune.trial") == "a1-T3-e1+2-s0-n0.2"]
    assert len(lost) == 2
    for r in lost:
        client.delete_run(r.info.run_id)
    synced = sync_sweep("packed", resolve_storage(str(tmp_path / "store")), log=lambda s: None)
    assert (synced.replayed.steps, synced.replayed.ended) == (3, 2), synced.replayed  # epochs 1 (e1), 1 and 2 (e2); two run ends
    _same_record(records["unpacked"], _record(client, "packed"))
    again = sync_sweep("packed", resolve_storage(str(tmp_path / "store")), log=lambda s: None)
    assert (again.replayed.steps, again.replayed.ended) == (0, 0)


def _same_record(unpacked: dict[Any, Any], packed: dict[Any, Any]) -> None:
    assert len(unpacked) == 16 and set(packed) == set(unpacked)  # the same runs, by their params
    for params, want in unpacked.items():
        got = packed[params]
        assert (got["name"], got["status"], got["diverged"], got["error"], got["artifacts"]) == \
               (want["name"], want["status"], want["diverged"], want["error"], want["artifacts"]), want["name"]
        assert set(got["metrics"]) == set(want["metrics"]), want["name"]
        for metric, steps in want["metrics"].items():
            assert [s for s, _ in got["metrics"][metric]] == [s for s, _ in steps], (want["name"], metric)
            for (_, a), (_, b) in zip(got["metrics"][metric], steps, strict=True):
                assert _close(metric, a, b), (want["name"], metric, a, b)
        if want["status"] == "FINISHED":
            epochs = int(dict(params)["epochs"])
            assert sorted(want["metrics"]) == sorted(m for m in EPOCH_METRICS if m in want["metrics"])
            assert [s for s, _ in want["metrics"]["test_acc"]] == list(range(1, epochs + 1))
            assert want["artifacts"] == ["confusion_matrix.json", "model", "model/student.pt"]
        else:
            assert want["diverged"] == "true" and want["error"] == "training diverged at epoch 1: loss = nan"


def _pack_reference(sweep: Any, pack: int) -> dict[str, dict[str, float]]:
    """Each pack trained uninterrupted, without Ray, in this process (1 thread, as a 1-CPU trial): the last
    epoch's metrics per member grid point, keyed by run name."""
    import torch

    from kd_tune.data import split as data
    from kd_tune.distill.pack_train import train_pack
    from kd_tune.distill.packed import build_pack
    from kd_tune.distill.teacher import teacher_key
    from kd_tune.distill.train import TensorData, make_optimizer
    from kd_tune.space.parse import load_space
    from kd_tune.sweep.state.storage import resolve_storage
    from kd_tune.sweep.teacher_cache import TeacherCache
    from kd_tune.sweep.trainable import TrialBundle, pack_inputs

    spec = apply_overrides(load_space(sweep.space), SweepOptions(pack=pack))
    split = data.prepare("mnist", spec.dataset.train_size, 0.0, 0, FIXTURE_DATA, val_size=spec.dataset.val_size, log=lambda s: None)
    storage = resolve_storage(str(sweep.storage))
    teacher = TeacherCache(storage).load(teacher_key(spec.dataset, spec.teacher, split))
    assert teacher is not None
    bundle = TrialBundle(split, spec.students(), {0.0: split.train_y}, {("", 0.0): teacher.train_logits}, {("", 0.0): teacher.test_logits},
                         storage, "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for points in spec.packs():
            d, members = pack_inputs(bundle, list(points), TensorData.from_split(split, "cpu"))
            model = build_pack(spec.student.widths, split.info.shape, 10, [m.seed for m in members])
            result = train_pack(model, make_optimizer(model, spec.student.lr), d, members, batch_size=spec.student.batch_size)
            for p, h in zip(points, result.history, strict=True):
                for m in p.milestones:
                    out[p.at(m).label] = h[m - 1].as_dict()
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_packed_sweep_killed_then_resumed(write_space: Callable[..., Path], tmp_path: Path, teachers: Path) -> None:
    """tests/test_resume.py's sweep (8 grid points, 4 epoch-shared trials of 3 + 5 epochs) in 2 packs of 2, SIGKILLed
    between a pack's two milestones, then resumed: one run per grid point, every step once, nothing recomputed
    beyond the epoch in progress, the same numbers as the packs trained uninterrupted."""
    from .helpers import EPOCHS, SPACE, Sweep, check_record, kill_tree

    sweep = Sweep(tmp_path, write_space(SPACE), teachers)  # the teacher from the cache (conftest's teachers fixture)
    proc = sweep.start("sweep", str(sweep.space), "--pack", "2")
    sweep.wait_until(proc, lambda p, base: any(3 <= max(e, default=0) < EPOCHS for e in p.values()))
    kill_tree(proc)
    killed_at = sweep.progress()
    assert len(killed_at) <= 2 and all(label.startswith("pack2-") for label in killed_at), killed_at
    # Runs finished before the kill stay untouched (tracking is asynchronous: whether the 3-epoch runs of a pack
    # that passed epoch 3 reached the store before the kill depends on the moment; the resume finishes them if not).
    untouched = {r.info.run_id: r.info.end_time for r in sweep.child_runs() if r.info.status == "FINISHED"}
    st = sweep.run("status", "study")
    assert st.returncode == 0 and "driver not running" in st.stdout and "to continue: kd-tune resume study" in st.stdout
    assert "a0.5-T3-e3+5-s0" in st.stdout and "scratch-e3+5-s0" in st.stdout  # a row per member, not per pack

    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "8/8 grid points finished" in done.stdout
    check_record(sweep, untouched, 8)
    final = sweep.progress()
    assert len(final) == 2
    for label, epochs in final.items():
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)) and len(epochs) - len(set(epochs)) <= 1, (label, epochs)
    st = sweep.run("status", "study")
    assert "4 finished" in st.stdout, st.stdout

    ref = _pack_reference(sweep, 2)
    for r in sweep.child_runs():
        for metric in ("test_acc", "test_loss", "train_loss"):
            assert r.data.metrics[metric] == pytest.approx(ref[r.info.run_name][metric], rel=1e-6, abs=1e-7), (r.info.run_name, metric)
    print(f"\nkilled at {killed_at}; final {final}")
