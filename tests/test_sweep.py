"""End to end with a real local Ray and a real sqlite MLflow store, on a slice of real MNIST."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.process import QUIET_LOGGERS
from kd_tune.space.options import SweepOptions
from kd_tune.sweep.start import run_sweep
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.sweep.teacher_cache import CACHE_FOLDER
from kd_tune.tracking.tags import EVERY_RUN_METRICS, TAG_PARENT, TAG_ROLE, TAG_TRIAL

from .conftest import FIXTURE_DATA, tiny_space

# Marked per test: the module also holds tests that need neither Ray nor a server (they stay in `-m "not integration"`).


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[None]:
    """One real embedded Ray (as ``run_sweep`` starts it) for this module's in-process sweeps: each joins it
    instead of starting and stopping its own, and later sweeps find its workers already up. Sweeps that
    must start their own Ray (the CLI's, in a subprocess) still do. Its end checks that shutdown_ray()
    (which kills the autoscaler's monitor first) stops every process the cluster started."""
    import ray

    from kd_tune.sweep.cluster.connect import connect_ray, shutdown_ray

    assert connect_ray(None)
    processes = {kind: [i.process for i in infos] for kind, infos in ray._private.worker._global_node.all_processes.items()}
    assert "monitor" in processes and "raylet" in processes  # what shutdown_ray() relies on in this Ray version
    try:
        yield
    finally:
        shutdown_ray()
    alive = {kind: [p.pid for p in procs if p.poll() is None] for kind, procs in processes.items()}
    assert not any(alive.values()), alive


def _runs_by_role(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(run.data.tags[TAG_ROLE], []).append(run)
    return out


@pytest.mark.integration
def test_cli_sweep_then_second_sweep_reuses_teacher(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    storage = tmp_path / "store"
    space = write_space(tiny_space())  # alpha {0, 1} x epochs {1, 2}: 4 grid points, 2 trials (epochs shared)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_AUTH_MODE", None)  # as in a user's shell (this process's own Ray set it)
    proc = subprocess.run(
        [sys.executable, "-m", "kd_tune.cli", "sweep", str(space), "--storage", str(storage), "--data-dir", str(FIXTURE_DATA)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Token authentication is enabled" not in proc.stderr  # Ray's notice on every local start: not ours to print
    assert "teacher epoch 1/1" in out and "training 8/16" in out
    assert "sweep 'tiny': 4/4 grid points finished, 0 errored" in out
    table = out[out.index("role  alpha"):].splitlines()
    assert len([ln for ln in table if ln.strip().startswith("student")]) == 4
    assert "Open the UI: kd-tune ui" in out

    # MLflow's own default store in the current folder: what `kd-tune ui` and `mlflow ui` read there.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _runs_by_role(client, "tiny")
    assert len(runs["sweep"]) == 1 and len(runs["teacher"]) == 1 and len(runs["student"]) == 4
    parent = runs["sweep"][0]
    assert parent.info.status == "FINISHED"
    assert runs["teacher"][0].data.tags[TAG_PARENT] == parent.info.run_id
    assert runs["teacher"][0].data.tags["kd_tune.cached"] == "false"
    assert "test_acc" in runs["teacher"][0].data.metrics
    trial_ids = set()
    for run in runs["student"]:
        assert run.data.tags[TAG_PARENT] == parent.info.run_id
        assert run.info.status == "FINISHED"
        trial_ids.add(run.data.tags[TAG_TRIAL])
        epochs = int(run.data.params["epochs"])
        assert run.data.params["student.widths"] == "[4, 8]" and run.data.params["alpha"] in ("0.0", "1.0")
        for metric in EVERY_RUN_METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)
        assert run.data.tags["kd_tune.epochs"] == str(epochs)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/student.pt"]
    assert len(trial_ids) == 2  # one trial per alpha served both epochs values, each with its own run
    # What the trainable received: the 1,000 training images of the subset, the 100 validation images held out of them.
    from ray import tune

    for trial in tune.ExperimentAnalysis(str(storage / "tiny")).trials:
        assert (trial.last_result["train_images"], trial.last_result["val_images"]) == (1000, 100)

    # Same teacher spec, another sweep (with a scratch baseline): the cached teacher is reused.
    teacher_entries = list((storage / CACHE_FOLDER).iterdir())
    assert len(teacher_entries) == 1
    messages: list[str] = []
    # What the sweep changes in this process is put back when it returns (kd_tune.process): its environment,
    # library loggers' levels and the collector (a notebook's process, a second sweep in it, start from the same state).
    environ, levels = dict(os.environ), {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    outcome = run_sweep(
        write_space(tiny_space(name="tiny2", grid={"alpha": [0.5], "epochs": [1]}, baselines=["scratch"]), "tiny2.yaml"),
        resolve_storage(str(storage)), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", quiet=True),
        log=messages.append,
    )
    assert outcome.ok and outcome.total == 2
    # The start-up's pause of the garbage collector and the fit's freeze are undone when run_sweep returns.
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert dict(os.environ) == environ and {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == levels
    assert any("from the cache" in m for m in messages) and not any("training" in m for m in messages)
    assert list((storage / CACHE_FOLDER).iterdir()) == teacher_entries
    runs2 = _runs_by_role(client, "tiny2")
    assert runs2["teacher"][0].data.tags["kd_tune.cached"] == "true"
    assert len(runs2["scratch"]) == 1 and len(runs2["student"]) == 1
    assert set(outcome.table["role"]) == {"student", "scratch"}
    assert outcome.table["test_acc"].notna().all()


@pytest.mark.integration
def test_existing_sweep_name_is_refused(write_space: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], shared_ray: None) -> None:
    monkeypatch.chdir(tmp_path)
    space = write_space(tiny_space(name="once", grid={"alpha": [0.0], "epochs": [1]}))
    args = ["sweep", str(space), "--storage", str(tmp_path / "store"), "--data-dir", str(FIXTURE_DATA), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a sweep named 'once' already exists" in err


@pytest.mark.integration
def test_epoch_sharing_gives_the_same_runs_as_separate_trials(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    """One trial trained to 3 epochs reporting at 1 and 3 == two trials of 1 and 3 epochs (CPU, same seed)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tiny_space(grid={"alpha": [0.5], "epochs": [1, 3]}, baselines=["scratch"])
    metrics: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {}
    for name, share in (("shared", True), ("separate", False)):
        outcome = run_sweep(
            write_space({**space, "name": name}, f"{name}.yaml"),
            resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True, no_share_epochs=not share),
            log=lambda s: None,
        )
        assert outcome.ok and outcome.total == 4 and len(outcome.table) == 4
        client = MlflowClient(uri)
        runs = [r for role in ("student", "scratch") for r in _runs_by_role(client, name)[role]]
        assert len({r.data.tags[TAG_TRIAL] for r in runs}) == (2 if share else 4)
        metrics[name] = {
            r.info.run_name: {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                              for k in EVERY_RUN_METRICS if k != "epoch_seconds"}
            for r in runs
        }
        assert all(r.info.status == "FINISHED" for r in runs)
    assert set(metrics["shared"]) == {"a0.5-T3-e1-s0", "a0.5-T3-e3-s0", "scratch-e1-s0", "scratch-e3-s0"}
    assert metrics["shared"] == metrics["separate"]


@pytest.mark.integration
def test_teacher_ensemble_averages_cached_members(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    import torch

    from kd_tune.data import split as data
    from kd_tune.distill.teacher import teacher_key
    from kd_tune.space.parse import load_space
    from kd_tune.sweep.state.storage import resolve_storage
    from kd_tune.sweep.teacher_cache import TeacherCache

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Two entries of one ensemble: the plain mean, and weights that keep the first member alone (the weights as an axis).
    space = write_space(tiny_space(name="ens", teacher={"widths": [8, 16], "epochs": 1, "lr": 0.003, "batch_size": 64, "ensemble": 2},
                                   grid={"alpha": [0.5], "epochs": [1], "teacher": {"mean": {}, "first": {"ensemble_weights": [1.0, 0.0]}}}))
    outcome = run_sweep(space, resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True),
                        log=lambda s: None)
    assert outcome.ok
    spec = load_space(space)
    split = data.prepare("mnist", 1000, 0.0, 0, FIXTURE_DATA, val_size=100)
    cache = TeacherCache(resolve_storage(str(tmp_path / "store")))
    members = [cache.load(teacher_key(spec.dataset, m, split)) for m in spec.teacher.members()]
    # Each member cached on its own, once for both entries (the weights are no part of a member).
    assert all(m is not None for m in members) and len(cache.keys()) == 2
    avg = torch.stack([m.test_logits for m in members if m is not None]).mean(0)
    assert outcome.teacher_acc == pytest.approx((avg.argmax(1) == split.test_y).float().mean().item())
    client = MlflowClient(uri)
    runs = _runs_by_role(client, "ens")
    assert sorted(r.info.run_name for r in runs["teacher"]) == ["teacher-first-0", "teacher-first-1", "teacher-mean-0", "teacher-mean-1"]
    assert sorted(r.data.params["teacher.seed"] for r in runs["teacher"]) == ["0", "0", "1", "1"]
    parent = client.get_run(runs["student"][0].data.tags[TAG_PARENT]).data.metrics
    first = members[0]
    assert first is not None
    assert parent["teacher_test_acc_first"] == pytest.approx((first.test_logits.argmax(1) == split.test_y).float().mean().item())
    assert parent["teacher_test_acc_mean"] == pytest.approx(outcome.teacher_acc)
    assert sorted(r.data.params["teacher.ensemble_weights"] for r in runs["student"]) == ["[1.0, 0.0]", "[]"]


@pytest.mark.integration
def test_label_noise_axis_with_noisy_and_clean_teachers(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    from kd_tune.data import split as data

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = SweepOptions(storage=str(tmp_path / "store"), data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True)
    grid = {"alpha": [0.5], "epochs": [1], "label_noise": [0.0, 0.3]}
    outcome = run_sweep(write_space(tiny_space(name="noisy", grid=grid, baselines=["scratch"]), "noisy.yaml"), resolve_storage(opts.storage), opts, log=lambda s: None)
    assert outcome.ok and outcome.total == 4
    assert sorted(outcome.table["label_noise"].tolist()) == [0.0, 0.0, 0.3, 0.3]
    cache = tmp_path / "store" / CACHE_FOLDER
    assert len(list(cache.iterdir())) == 2  # the teacher learnt from the noisy labels too: one per level
    client = MlflowClient(uri)
    runs = _runs_by_role(client, "noisy")
    assert sorted(r.data.tags["kd_tune.label_noise"] for r in runs["teacher"]) == ["0", "0.3"]
    assert sorted(r.data.params["label_noise"] for r in runs["student"] + runs["scratch"]) == ["0.0", "0.0", "0.3", "0.3"]
    # The noisy students really saw other labels: same seed, different results.
    accs = {float(r.data.params["label_noise"]): r.data.metrics["train_hard_loss"] for r in runs["scratch"]}
    assert accs[0.0] != accs[0.3]
    # Exactly 30 % of the 1,000 training labels flipped, as data.prepare would (the sweep's flips are the same).
    clean, noisy = data.prepare("mnist", 1000, 0.0, 0, FIXTURE_DATA, val_size=100), data.prepare("mnist", 1000, 0.3, 0, FIXTURE_DATA, val_size=100)
    assert int((clean.train_y != noisy.train_y).sum()) == 300

    # teacher.clean: every level distils from the clean-label teacher, already in the cache.
    messages: list[str] = []
    teacher = {"widths": [8, 16], "epochs": 1, "lr": 0.003, "batch_size": 64, "clean": True}
    outcome = run_sweep(write_space(tiny_space(name="cleanteacher", teacher=teacher, grid=grid), "clean.yaml"), resolve_storage(opts.storage), opts, log=messages.append)
    assert outcome.ok and outcome.total == 2
    assert not any("training" in m for m in messages) and len(list(cache.iterdir())) == 2
    runs = _runs_by_role(client, "cleanteacher")
    assert [r.data.tags["kd_tune.label_noise"] for r in runs["teacher"]] == ["0"]


@pytest.mark.parametrize("nodes,gpu,expected,warns", [
    ([{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}], 0.0, 8, False),  # CPU sweep: the biggest node
    ([{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}], 0.25, 4, False),  # GPU sweep: the biggest GPU node, not the CPU head
    ([{"CPU": 8.0}], 0.25, 1, True),  # GPU workers not up yet: what one trial asks, which the autoscaler can grant
])
def test_teacher_gets_a_whole_node_of_the_trials_kind(monkeypatch: pytest.MonkeyPatch, nodes: list[dict[str, float]], gpu: float,
                                                      expected: int, warns: bool) -> None:
    import ray

    from kd_tune.space.schema import ResourcesSpec
    from kd_tune.sweep.cluster.connect import teacher_cpus

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes] + [{"Alive": False, "Resources": {"CPU": 64.0}}])
    messages: list[str] = []
    assert teacher_cpus(ResourcesSpec(cpu=1.0, gpu=gpu), messages.append) == expected
    assert bool(messages) == warns


@pytest.mark.integration
def test_the_embedded_ray_is_the_drivers_only_node(shared_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded Ray is this machine alone: a CPU teacher trains in the driver; with a cluster address
    (``--address`` or a Ray job's ``$RAY_ADDRESS``) it does not (test_cluster.py: a cluster joined by the caller)."""
    from kd_tune.sweep.cluster.connect import driver_is_the_only_node

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert driver_is_the_only_node(None)
    assert not driver_is_the_only_node("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not driver_is_the_only_node(None)


@pytest.mark.integration
def test_method_axis_sweep_trains_each_method_in_one_mixed_pack(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    """grid.method in a real sweep: kd, DKD at two betas, DIST and standardized kd packed with the scratch baseline
    into one trial; every grid point is a run whose params and name carry its method and knobs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = {"alpha": [0.5], "temperature": [3.0], "epochs": [1, 2], "seed": [0],
            "method": ["kd", {"method": "dkd", "alpha": 1.0, "nckd_weight": [2.0, 8.0], "warmup": 1}, {"method": "dist", "alpha": 1.0},
                       {"method": "kd", "standardize": True}]}
    space = write_space(tiny_space(name="methods", grid=grid, baselines=["scratch"], resources={"cpu": 1, "gpu": 0, "pack": 8}))
    outcome = run_sweep(space, resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True),
                        log=lambda s: None)
    assert outcome.ok and outcome.total == 12
    assert sorted(outcome.table["method"].tolist()) == ["dist"] * 2 + ["dkd"] * 4 + ["kd"] * 6
    runs = _runs_by_role(MlflowClient(uri), "methods")
    by_name = {r.info.run_name: r for r in runs["student"] + runs["scratch"]}
    assert set(by_name) == {f"{p}-e{e}-s0" for e in (1, 2) for p in ("a0.5-T3", "dkd-nw2-wu1-a1-T3", "dkd-wu1-a1-T3", "dist-a1-T3", "kd-ls-a0.5-T3")} | {
        "scratch-e1-s0", "scratch-e2-s0"}
    assert len(runs["student"]) + len(runs["scratch"]) == 12  # one run per grid point, none twice
    dkd = by_name["dkd-nw2-wu1-a1-T3-e1-s0"].data.params
    assert (dkd["method"], dkd["nckd_weight"], dkd["tckd_weight"], dkd["warmup"], dkd["standardize"]) == ("dkd", "2.0", "1.0", "1", "False")
    kd = by_name["a0.5-T3-e1-s0"].data.params
    assert (kd["method"], kd["divergence"], kd["standardize"]) == ("kd", "forward_kl", "False") and "nckd_weight" not in kd
    assert by_name["kd-ls-a0.5-T3-e1-s0"].data.params["standardize"] == "True"
    # Each member trained with its own loss: DKD's distillation term scales with its beta, and no two methods agree.
    distill = {name: r.data.metrics["train_distill_loss"] for name, r in by_name.items() if name.endswith("-e1-s0") and "scratch" not in name}
    assert len(set(distill.values())) == len(distill)
    assert distill["dkd-wu1-a1-T3-e1-s0"] > distill["dkd-nw2-wu1-a1-T3-e1-s0"]
    assert by_name["scratch-e1-s0"].data.metrics["train_distill_loss"] == 0.0


@pytest.mark.integration
def test_method_search_samples_each_methods_knobs(write_space: Callable[..., Path], tmp_path: Path, shared_ray: None) -> None:
    """A search over methods through Ray Tune's OptunaSearch: DKD's beta is sampled for DKD trials alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = {"alpha": {"low": 0.0, "high": 1.0}, "temperature": [3.0], "epochs": [1], "seed": [0],
            "method": ["kd", {"method": "dkd", "alpha": 1.0, "nckd_weight": {"low": 1.0, "high": 8.0}}]}
    space = write_space(tiny_space(name="msearch", grid=grid, search={"algorithm": "random", "num_samples": 6, "max_concurrent": 2, "seed": 1}))
    outcome = run_sweep(space, resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True),
                        log=lambda s: None)
    assert outcome.ok
    students = _runs_by_role(MlflowClient(uri), "msearch")["student"]
    assert len(students) == 6
    methods = [r.data.params["method"] for r in students]
    assert set(methods) == {"kd", "dkd"}, methods  # seeded: this seed samples both
    for r in students:
        p = r.data.params
        if p["method"] == "dkd":
            assert float(p["alpha"]) == 1.0 and 1.0 <= float(p["nckd_weight"]) <= 8.0 and r.info.run_name.startswith("dkd-")
        else:
            assert "nckd_weight" not in p and p["divergence"] == "forward_kl"
