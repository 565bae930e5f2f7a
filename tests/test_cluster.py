"""A sweep on a real two-node Ray cluster, tracked by a real MLflow server (checked through its REST API).

The cluster is `ray start --head` plus `ray start --address`, one CPU each, on this machine; the
worker node runs in a mount namespace of its own, where one folder is a private tmpfs, so it can
be shown a storage folder it cannot see. Everything is stopped by PID afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kd_tune.sweep.hooks import GATE_ENV

from .conftest import FIXTURE_DATA, tiny_space
from .helpers import process_state
from .servers import RAY_ENV, MlflowServer, RayCluster, S3Server, listening_addresses

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]

EPOCHS = 6
# ~0.8 s per epoch on one CPU (250 small steps): a trial lasts long enough for the worker node to die in the middle of one.
SPACE = tiny_space(
    name="cluster",
    dataset={"name": "mnist", "train_size": 2000, "val_size": 0},  # the whole slice: none left to hold out
    student={"widths": [16, 32], "lr": 0.003, "batch_size": 8},
    grid={"alpha": [0.0, 0.5, 1.0], "epochs": [EPOCHS]},
    baselines=["scratch"],
    max_failures=2,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    root = tmp_path_factory.mktemp("cluster")
    c = RayCluster(root / "ray", root / "private")
    try:
        yield c
    finally:
        c.stop()


def _env() -> dict[str, str]:
    env = {**os.environ, **RAY_ENV, "PYTHONUNBUFFERED": "1", "KD_TUNE_DATA_DIR": str(FIXTURE_DATA)}
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "KD_TUNE_STORAGE"):
        env.pop(var, None)
    return env


def test_storage_that_a_node_cannot_see_is_refused(cluster: RayCluster, write_space: Callable[..., Path], tmp_path: Path) -> None:
    store = cluster.private / "store"
    res = subprocess.run([sys.executable, "-m", "kd_tune.cli", "sweep", str(write_space(SPACE)), "--address", cluster.address,
                          "--storage", str(store)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert err[-1] == "(see 'kd-tune sweep --help')" and "Traceback" not in res.stderr
    assert err[-2].startswith(f"kd-tune sweep: error: --storage '{store}' is a folder that 1 of the cluster's 2 nodes cannot see: ")
    assert f"(node {cluster.worker_id[:12]})" in err[-2] and cluster.head_id[:12] not in err[-2]
    assert "allowed: a local folder, a folder every node mounts (NFS), or a URI such as s3://bucket/prefix" in err[-2]
    assert not store.exists()  # the probe and the folders it made are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no MLflow store, nothing else written


def test_a_cluster_the_caller_joined_is_not_the_drivers_only_node(cluster: RayCluster, tmp_path: Path) -> None:
    """A program that ran ``ray.init(address=...)`` itself and then calls kd-tune without an address: two live
    nodes, so its CPU teacher runs as a cluster task, not in that program (kd_tune.sweep.cluster.connect.driver_is_the_only_node)."""
    if not cluster.worker_alive():
        cluster.start_worker()
    code = ("import ray\n"
            f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
            "from kd_tune.sweep.cluster.connect import driver_is_the_only_node\n"
            "print(len([n for n in ray.nodes() if n['Alive']]), driver_is_the_only_node(None))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**_env(), **cluster.env}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["2", "False"]


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _trial_runs(server: MlflowServer, experiment_id: str) -> list[dict[str, Any]]:
    """The sweep's student and scratch runs, read through the REST API."""
    runs = server.api("runs/search", {"experiment_ids": [experiment_id], "max_results": 100}).get("runs", [])
    return [r for r in runs if _tags(r).get("kd_tune.role") in ("student", "scratch")]


def _step(run: dict[str, Any]) -> int:
    return max((int(m["step"]) for m in run["data"].get("metrics", []) if m["key"] == "test_acc"), default=0)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_sweep_on_both_nodes_tracked_by_mlflow_server_survives_losing_one(
    kind: str, cluster: RayCluster, write_space: Callable[..., Path], tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    # A folder both nodes see (as an NFS mount would be), or a bucket both reach with their credentials.
    storage = str(tmp_path / "shared") if kind == "folder" else request.getfixturevalue("s3").uri(f"sweeps-{tmp_path.name}")
    if not cluster.worker_alive():
        cluster.start_worker()  # the previous case killed it
    gate = tmp_path / "gate"  # while it exists, trials wait after each epoch (kd_tune.sweep.hooks); both nodes see it
    gate.touch()
    with MlflowServer(tmp_path / "mlflow") as server:
        assert listening_addresses(server.port) == {"127.0.0.1"}
        log = tmp_path / "driver.log"
        with open(log, "w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-m", "kd_tune.cli", "sweep", str(write_space(SPACE)), "--address", cluster.address,
                 "--storage", storage, "--tracking-uri", server.url],
                cwd=tmp_path, env={**_env(), **cluster.env, GATE_ENV: str(gate)}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            # Kill the worker node while one of its trials is mid-way. Every trial waits at the gate after each epoch, so
            # the victim is taken from what it really reported (the tracking can lag behind a trial that has already
            # trained to its end), and nothing finishes before the kill: which node gets which trial is Ray's choice.
            deadline, victim, experiment, runs, pid = time.monotonic() + 300, None, None, [], 0
            while victim is None:
                assert driver.poll() is None, (f"the sweep ended before the kill point; worker {cluster.worker_id}, runs: "
                                               f"{[(_tags(r).get('kd_tune.nodes'), r['info']['status'], _step(r)) for r in runs]}")
                if experiment is None:
                    found = server.api("experiments/search", {"max_results": 10, "filter": "name = 'cluster'"}).get("experiments", [])
                    experiment = found[0]["experiment_id"] if found else None
                runs = [r for r in _trial_runs(server, experiment) if _tags(r).get("kd_tune.node_id") == cluster.worker_id] if experiment else []
                assert time.monotonic() < deadline, f"no kill point reached: {[(_tags(r)['kd_tune.trial'], _step(r)) for r in runs]}"
                for r in runs:  # a trial on the worker, held after an epoch before its last (what the hook wrote)
                    held = Path(f"{gate}.{_tags(r)['kd_tune.trial']}")
                    epoch, pid = map(int, held.read_text().split()) if held.exists() else (EPOCHS, 0)
                    if epoch < EPOCHS:
                        victim = _tags(r)["kd_tune.trial"]
                        break
                if victim is None:
                    time.sleep(0.1)  # polling a condition against a deadline
            cluster.kill_worker_raylet()
            # Its trial's process ends with its node (it would otherwise train on once let go); then the others go on,
            # and the victim's retry on the head trains its epochs left.
            deadline = time.monotonic() + 60
            while Path(f"/proc/{pid}").exists() and "Z" not in process_state(pid):
                assert time.monotonic() < deadline, f"the victim's trial (pid {pid}) outlived its node"
                time.sleep(0.05)  # polling a condition against a deadline
            gate.unlink()
            assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
        assert "sweep 'cluster': 4/4 grid points finished, 0 errored, 0 diverged" in log.read_text()

        # The record, read through the tracking server's REST API.
        exp = server.api("experiments/get-by-name", experiment_name="cluster")["experiment"]
        runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        by_role: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by_role.setdefault(_tags(r)["kd_tune.role"], []).append(r)
        assert len(by_role["sweep"]) == 1 and by_role["sweep"][0]["info"]["status"] == "FINISHED"
        assert len(by_role["teacher"]) == 1
        children = by_role["student"] + by_role["scratch"]
        assert len(children) == 4 and len({_tags(r)["kd_tune.trial_id"] for r in children}) == 4  # one run per trial
        nodes: dict[str, list[str]] = {}
        for r in children:
            tags = _tags(r)
            assert r["info"]["status"] == "FINISHED", tags
            assert tags["mlflow.parentRunId"] == by_role["sweep"][0]["info"]["run_id"]
            assert tags["kd_tune.device"] == "cpu"
            nodes[tags["kd_tune.trial"]] = tags["kd_tune.nodes"].split(",")
            assert tags["kd_tune.node_id"] == nodes[tags["kd_tune.trial"]][-1]
            history = server.api("metrics/get-history", run_id=r["info"]["run_id"], metric_key="test_acc")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1))  # each epoch once, none lost
            files = server.api("artifacts/list", run_id=r["info"]["run_id"], path="model").get("files", [])
            assert [f["path"] for f in files] == ["model/student.pt"]
        # Trials ran on both nodes; the one cut short on the worker finished on the head, retried by FailureConfig.
        assert {n[0] for n in nodes.values()} == {cluster.head_id, cluster.worker_id}, nodes
        assert nodes[victim] == [cluster.worker_id, cluster.head_id]
        victim_run = next(r for r in children if _tags(r)["kd_tune.trial"] == victim)
        assert _tags(victim_run)["kd_tune.retries"] == "1"
        # Artifacts went through the server into its destination: the driver needs no access to that storage.
        assert len(list(server.artifacts.rglob("student.pt"))) == 4
