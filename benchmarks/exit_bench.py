"""What kd-tune's fast exit (kd_tune.cli.app.run: Python's threading shutdown and exit handlers, then ``os._exit``)
saves against a plain interpreter exit (``sys.exit(main())``: the same, then the teardown of every imported module).

Runs the tests' tiny sweep (the committed MNIST slice, 2 trials, a cold teacher cache) both ways, alternated (this
machine's speed drifts), and prints each run's wall seconds and the seconds from its last output line to its exit.

    python benchmarks/exit_bench.py [REPEATS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPACE = """name: tiny
dataset: {name: mnist, train_size: 1000, label_noise: 0.0, val_size: 100}
teacher: {widths: [8, 16], epochs: 1, lr: 0.003, batch_size: 64}
student: {widths: [4, 8], lr: 0.003, batch_size: 64}
grid: {alpha: [0.0, 1.0], temperature: [3.0], epochs: [1, 2], seed: [0]}
resources: {cpu: 1, gpu: 0}
"""
WAYS = {
    "fast exit (kd-tune)": ["-m", "kd_tune.cli"],
    "plain exit": ["-c", "import sys; from kd_tune.cli.app import main; sys.exit(main())"],
}


def one(way: list[str], folder: Path) -> tuple[float, float]:
    """Wall seconds of the whole command, and from its last output line to its exit."""
    folder.mkdir()
    (folder / "space.yaml").write_text(SPACE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KD_TUNE_DATA_DIR": str(REPO / "tests" / "fixtures" / "mnist_slice"),
           "KD_TUNE_STORAGE": str(folder / "store")}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *way, "sweep", "space.yaml", "--quiet"], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = t0
    assert proc.stdout is not None
    for _ in proc.stdout:
        last = time.monotonic()
    code = proc.wait()
    end = time.monotonic()
    if code != 0:
        raise SystemExit(f"the sweep failed ({code}) in {folder}")
    return end - t0, end - last


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name, way in WAYS.items():
                wall, tail = one(way, Path(tmp) / f"{i}-{len(results[name])}-{name.split()[0]}")
                results[name].append((wall, tail))
                print(f"{name:20s} {i}: wall {wall:5.1f} s, last line -> exit {tail:4.2f} s", flush=True)
    for name, rs in results.items():
        print(f"{name:20s} median: wall {statistics.median(r[0] for r in rs):5.1f} s, last line -> exit {statistics.median(r[1] for r in rs):4.2f} s")


if __name__ == "__main__":
    main()
