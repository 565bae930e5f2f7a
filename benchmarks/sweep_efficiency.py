"""Sweep efficiency on this machine: the same students trained one after another in plain PyTorch (kd-tune's own
loop, one thread) against the same students as a ``kd-tune sweep`` with the default settings (one trial per CPU).

    python benchmarks/sweep_efficiency.py              # 8 students x 5 epochs on 20,000 MNIST images, teacher cached first
    python benchmarks/sweep_efficiency.py --repeats 3  # sequential and sweep alternated 3 times: medians

ratio = median sequential seconds / median sweep wall seconds (the whole ``kd-tune sweep`` command: Python,
Ray's start and shutdown included). The two alternate (A B A B ...) because this machine's speed drifts by
10 % from one minute to the next. With N cores the ceiling is about N. Needs kd-tune installed and MNIST
(``kd-tune data mnist``); works in ./sweep_efficiency (made anew).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kd_tune.config import load_space
from kd_tune.data import prepare
from kd_tune.models import build_model
from kd_tune.storage import resolve_storage
from kd_tune.teacher import TeacherCache, teacher_key
from kd_tune.train import TensorData, make_optimizer, train

HERE = Path.cwd() / "sweep_efficiency"
SPACE = """name: efficiency
dataset: {name: mnist, train_size: 20000, label_noise: 0.0, val_size: 5000}
teacher: {widths: [32, 64], epochs: 1, lr: 0.001, batch_size: 128}
student: {widths: [16, 32], lr: 0.001, batch_size: 128}
grid: {alpha: [0.0, 0.33, 0.67, 1.0], temperature: [3.0], epochs: [5], seed: [0, 1]}
resources: {cpu: 1, gpu: 0}
"""


def sweep(name: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["kd-tune", "sweep", str(HERE / "space.yaml"), "--name", name, "--storage", str(HERE / "st"),
                    "--tracking-uri", f"sqlite:///{HERE}/mlflow.db", "--quiet"], cwd=HERE, check=True, capture_output=True)
    return time.perf_counter() - t0


def sequential() -> float:
    """Every grid point of the space trained one after another, one thread, with the sweep's cached teacher."""
    spec = load_space(HERE / "space.yaml")
    ds = spec.dataset
    split = prepare(ds.name, ds.train_size, 0.0, ds.seed, None, lambda s: None, val_size=ds.val_size, normalize=ds.normalize)
    (member,) = spec.teacher.members()
    teacher = TeacherCache(resolve_storage(str(HERE / "st"))).load(teacher_key(ds, member, split))
    assert teacher is not None, "the warm-up sweep caches the teacher"
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")  # the first optimizer imports it (1.4 s); a warm process has it: not timed
    t0 = time.perf_counter()
    for point in spec.grid_points():
        data = TensorData.from_split(split, "cpu", teacher.train_logits if point.role == "student" else None, teacher.test_logits)
        model = build_model(spec.student.widths, split.info.shape, split.info.num_classes, point.seed)
        train(model, make_optimizer(model, spec.student.lr), data, epochs=point.epochs, batch_size=spec.student.batch_size,
              seed=point.seed, alpha=point.alpha, temperature=point.temperature or 1.0)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="sequential / sweep pairs, alternated (default 1)")
    args = parser.parse_args()
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    (HERE / "space.yaml").write_text(SPACE)
    warm = sweep("warmup")  # trains and caches the teacher; not measured
    seqs, walls = [], []
    for r in range(args.repeats):
        seqs.append(sequential())
        walls.append(sweep(f"measured{r}"))
        print(json.dumps({"pair": r, "sequential_s": round(seqs[-1], 1), "sweep_wall_s": round(walls[-1], 1),
                          "ratio": round(seqs[-1] / walls[-1], 2)}), flush=True)
    seq, wall = statistics.median(seqs), statistics.median(walls)
    print(json.dumps({"students": 8, "epochs": 5, "repeats": args.repeats, "sequential_s": round(seq, 1), "sweep_wall_s": round(wall, 1),
                      "ratio": round(seq / wall, 2), "warmup_sweep_s": round(warm, 1)}))


if __name__ == "__main__":
    main()
