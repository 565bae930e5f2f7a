"""What a tracking-server outage costs a sweep: the same sweep with no outage and with the MLflow server
SIGKILLed for N seconds mid-sweep (then restarted on the same port and store).

    python benchmarks/outage_bench.py base:0 out240:240 out40:40      # NAME:OUTAGE_SECONDS, run in that order

Needs kd-tune installed (Ray, MLflow) and MNIST (``kd-tune data mnist``); works in ./outage_bench (made
anew). Each run prints one JSON line: exit status, wall time, epochs trained while the server was down,
and the record afterwards (runs, steps per run, runs with a step logged twice, statuses).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

HERE = Path.cwd() / "outage_bench"
PORT = 5077
URL = f"http://127.0.0.1:{PORT}"
# 2 trials x 60 epochs on 20,000 images: ~2.5 min on 2 idle cores, long enough for a 40 s outage inside it.
SPACE = """name: outage
dataset: {name: mnist, train_size: 20000, label_noise: 0.0, val_size: 5000}
teacher: {widths: [32, 64], epochs: 1, lr: 0.001, batch_size: 128}
student: {widths: [16, 32], lr: 0.001, batch_size: 128}
grid: {alpha: [0.5, 1.0], temperature: [3.0], epochs: [60], seed: [0]}
resources: {cpu: 1, gpu: 0}
"""


def start_server() -> subprocess.Popen[bytes]:
    log = open(HERE / "server.log", "a")  # noqa: SIM115 - the server's own log, open while it runs
    p = subprocess.Popen(["kd-tune", "ui", "--tracking-uri", f"sqlite:///{HERE}/ui.db", "--port", str(PORT)], cwd=HERE,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{URL}/health", timeout=1)
            return p
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the MLflow server did not start")


def kill(p: subprocess.Popen[bytes]) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def newest_epoch(name: str) -> int:
    out = 0
    for f in (HERE / "st" / name).glob("*/result.json"):
        for line in f.read_text().splitlines():
            try:
                out = max(out, int(json.loads(line)["epoch"]))
            except (ValueError, KeyError):
                pass
    return out


def run(name: str, outage: float, server: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    t0 = time.monotonic()
    with open(HERE / f"{name}.log", "w") as log:
        sweep = subprocess.Popen(["kd-tune", "sweep", str(HERE / "space.yaml"), "--name", name, "--storage", str(HERE / "st"),
                                  "--tracking-uri", URL, "--quiet"], cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        extra = {}
        if outage:
            while newest_epoch(name) < 3:
                time.sleep(0.5)
            kill(server)
            down, before = time.monotonic(), newest_epoch(name)
            time.sleep(outage)
            during = newest_epoch(name) - before
            server = start_server()
            extra = {"epochs_during_outage": during, "server_down_s": round(time.monotonic() - down, 1)}
        rc = sweep.wait()
    wall = time.monotonic() - t0
    client = MlflowClient(URL)
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kd_tune.role") == "student"]
    steps = {r.info.run_name: [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] for r in runs}
    print(json.dumps({"name": name, "outage_s": outage, "rc": rc, "wall_s": round(wall, 1), **extra, "runs": len(runs),
                      "steps_per_run": sorted(len(s) for s in steps.values()),
                      "runs_with_a_step_twice": [n for n, s in steps.items() if len(s) != len(set(s))],
                      "status": sorted(r.info.status for r in runs)}), flush=True)
    return server


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    (HERE / "space.yaml").write_text(SPACE)
    server = start_server()
    try:
        for arg in sys.argv[1:] or ["base:0", "out40:40"]:
            name, seconds = arg.split(":")
            server = run(name, float(seconds), server)
    finally:
        kill(server)


if __name__ == "__main__":
    main()
