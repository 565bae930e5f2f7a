"""Sweep efficiency on this machine: the same students trained one after another in plain PyTorch (kd-tune's own
loop, one thread) against the same students as a ``kd-tune sweep`` with the default settings (one trial per CPU).

    python benchmarks/sweep_efficiency.py              # 8 students x 5 epochs on 20,000 MNIST images, teacher cached first
    python benchmarks/sweep_efficiency.py --repeats 3  # sequential and sweep alternated 3 times: medians
    python benchmarks/sweep_efficiency.py --epochs 15  # longer students: the fixed costs weigh less
    python benchmarks/sweep_efficiency.py --repeats 2 --compare-with ../old  # also an older checkout's sweep, alternated

ratio = median sequential seconds / median sweep wall seconds (the whole ``kd-tune sweep`` command: Python,
Ray's start and shutdown included). The two alternate (A B A B ...) because this machine's speed drifts by
10 % from one minute to the next. With N cores the ceiling is about N. Needs kd-tune installed and MNIST
(``kd-tune data mnist``); works in ./sweep_efficiency (made anew).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
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
grid: {alpha: [0.0, 0.33, 0.67, 1.0], temperature: [3.0], epochs: [EPOCHS], seed: [0, 1]}
resources: {cpu: 1, gpu: 0}
"""


def sweep(name: str, code: str | None = None) -> float:
    """Seconds of one ``kd-tune sweep`` command (``python -m kd_tune.cli``, as the ``kd-tune`` script runs it), with
    kd-tune imported from ``code`` (a checkout, e.g. an older commit's worktree) when given."""
    env = {**os.environ, "PYTHONPATH": code} if code else None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kd_tune.cli", "sweep", str(HERE / "space.yaml"), "--name", name, "--storage", str(HERE / "st"),
                    "--tracking-uri", f"sqlite:///{HERE}/mlflow.db", "--quiet"], cwd=HERE, check=True, capture_output=True, env=env)
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
    parser.add_argument("--epochs", type=int, default=5, help="epochs per student (default 5, the issue's measurement)")
    parser.add_argument("--compare-with", metavar="CHECKOUT", help="also time the sweep of the kd-tune in this folder (an older "
                        "commit's worktree), alternated with the others")
    args = parser.parse_args()
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    (HERE / "space.yaml").write_text(SPACE.replace("EPOCHS", str(args.epochs)))
    warm = sweep("warmup")  # trains and caches the teacher; not measured
    seqs, walls, others = [], [], []
    for r in range(args.repeats):
        seqs.append(sequential())
        walls.append(sweep(f"measured{r}"))
        row = {"pair": r, "sequential_s": round(seqs[-1], 1), "sweep_wall_s": round(walls[-1], 1), "ratio": round(seqs[-1] / walls[-1], 2)}
        if args.compare_with:
            others.append(sweep(f"compared{r}", args.compare_with))
            row |= {"compared_sweep_wall_s": round(others[-1], 1), "compared_ratio": round(seqs[-1] / others[-1], 2)}
        print(json.dumps(row), flush=True)
    seq, wall = statistics.median(seqs), statistics.median(walls)
    summary = {"students": 8, "epochs": args.epochs, "repeats": args.repeats, "sequential_s": round(seq, 1), "sweep_wall_s": round(wall, 1),
               "ratio": round(seq / wall, 2), "warmup_sweep_s": round(warm, 1)}
    if others:
        summary |= {"compared": args.compare_with, "compared_sweep_wall_s": round(statistics.median(others), 1),
                    "compared_ratio": round(seq / statistics.median(others), 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
