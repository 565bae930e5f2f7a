"""kd-tune's speed, measured side by side in one run: ratios, not absolute times.

    python benchmarks/bench.py                 # the full run (about 10 min on 2 CPU cores)
    python benchmarks/bench.py --quick         # seconds: proves the script works (used by the tests)

Every comparison interleaves its contenders (A B A B ...) after a warm-up and takes the median of
the repeats, so drift of the machine hits both sides alike. Per-epoch comparisons use one thread:
what a 1-CPU trial gets. Recorded results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_tune.data.sources import default_data_dir
from kd_tune.data.split import DataSplit, prepare
from kd_tune.distill.losses import kd_loss
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.train import TensorData, make_optimizer, predict_logits, train


@dataclass
class Row:
    name: str
    a: float
    b: float
    goal: str
    unit: str = "s"

    @property
    def ratio(self) -> float:
        return self.a / self.b


def interleaved(contenders: list[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each contender, run in turns after one warm-up round."""
    for run in contenders:
        run()
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(repeats):
        for i, run in enumerate(contenders):
            times[i].append(run())
    return [statistics.median(t) for t in times]


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


# --- 1-3: one epoch of the student ------------------------------------------------------------


def kd_tune_epoch(split: DataSplit, teacher_logits: torch.Tensor | None, batch: int) -> Callable[[], float]:
    """One epoch of kd-tune's loop: in-memory tensors, gather by index, cached teacher logits."""
    data = TensorData.from_split(split, "cpu", teacher_logits, None)

    def run() -> None:
        model = build_cnn((16, 32), split.info.shape, 10, 0)
        train(model, make_optimizer(model, 1e-3), data, epochs=1, batch_size=batch, seed=0, alpha=0.5, temperature=3.0)

    return timed(run)


def torchvision_dataset(root: Path, n: int) -> torch.utils.data.Dataset:
    import torchvision.transforms as T
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=True, download=False, transform=T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))]))
    return torch.utils.data.Subset(ds, range(n))


def dataloader_epoch(ds: torch.utils.data.Dataset, batch: int, teacher: torch.nn.Module | None) -> Callable[[], float]:
    """The usual PyTorch way (and the Keras Distiller's): per-sample transforms, a DataLoader,
    and, for distillation, the teacher's forward pass on every batch."""

    def run() -> None:
        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=0)
        model = build_cnn((16, 32), (1, 28, 28), 10, 0)
        opt = make_optimizer(model, 1e-3)
        for x, y in loader:
            if teacher is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(model(x), t, y, 0.5, 3.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(run)


# --- 4: sweep overhead ------------------------------------------------------------------------


def sweep_overhead(data_dir: Path, n_trials: int, train_size: int, warm_up: bool = True) -> tuple[float, float, float]:
    """(wall of the sweep, the trials' own training time, seconds of overhead per trial) for trials
    run one at a time (each asks for every CPU), with the teacher already cached (``warm_up``: by a
    first sweep; without it, as in ``--quick``, the measured sweep trains the teacher itself)."""
    import yaml

    from kd_tune.space.options import SweepOptions
    from kd_tune.sweep.start import run_sweep
    from kd_tune.sweep.state.storage import resolve_storage

    cpus = os.cpu_count() or 1
    alphas = [round(i / max(1, n_trials - 1), 3) for i in range(n_trials)]
    space = {
        "name": "bench", "dataset": {"name": "mnist", "train_size": train_size, "val_size": 0},
        "teacher": {"widths": [8, 16], "epochs": 1}, "student": {"widths": [16, 32]},
        "grid": {"alpha": alphas, "epochs": [1]}, "resources": {"cpu": cpus},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "space.yaml"
        opts = SweepOptions(data_dir=str(data_dir), tracking_uri=f"sqlite:///{tmp}/mlflow.db", quiet=True)
        storage = resolve_storage(f"{tmp}/store")
        if warm_up:
            path.write_text(yaml.safe_dump({**space, "name": "warmup", "grid": {"alpha": [0.5], "epochs": [1]}}))
            run_sweep(path, storage, opts, log=lambda s: None)  # trains and caches the teacher; warms imports
        path.write_text(yaml.safe_dump(space))
        t0 = time.perf_counter()
        outcome = run_sweep(path, storage, opts, log=lambda s: None)
        wall = time.perf_counter() - t0
        assert outcome.ok
        import pandas as pd

        train_s = 0.0
        for f in Path(outcome.path).glob("*/progress.csv"):
            train_s += float(pd.read_csv(f)["epoch_seconds"].sum())
    return wall, train_s, (wall - train_s) / n_trials


# --- 5: concurrency ---------------------------------------------------------------------------


def concurrency(split: DataSplit, epochs: int) -> tuple[float, float]:
    """Student epochs per second with one 1-CPU Ray task, then with two side by side."""
    import ray

    from kd_tune.sweep.cluster.connect import assigned_threads

    @ray.remote(num_cpus=1)
    def student(split: DataSplit, epochs: int) -> tuple[float, float]:
        torch.set_num_threads(assigned_threads())  # what the trainable does
        data = TensorData.from_split(split)
        model = build_cnn((16, 32), split.info.shape, 10, 0)
        t0 = time.time()
        train(model, make_optimizer(model, 1e-3), data, epochs=epochs, batch_size=128, seed=0)
        return t0, time.time()

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        ref = ray.put(split)
        ray.get([student.remote(ref, 1) for _ in range(2)])  # warm-up: both worker processes started, torch imported
        rates = []
        for n in (1, 2):
            spans = ray.get([student.remote(ref, epochs) for _ in range(n)])
            wall = max(e for _, e in spans) - min(s for s, _ in spans)
            rates.append(n * epochs / wall)
        return rates[0], rates[1]
    finally:
        ray.shutdown()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="MNIST in torchvision layout (fetched if missing)")
    p.add_argument("--train-size", type=int, default=5000, help="training images per epoch (ratios do not depend on it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: proves the script works, measures nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.repeats = min(args.train_size, 500), 1
    teacher_widths = (16, 32) if args.quick else (256, 512)  # the study's teacher

    torch.set_num_threads(1)
    full = prepare("mnist", args.train_size, 0.0, 0, args.data_dir, log=lambda s: None)
    # The epochs compared below train only: a 1-image test set makes kd-tune's per-epoch evaluation free.
    split = dataclasses.replace(full, test_x=full.test_x[:1], test_y=full.test_y[:1])
    teacher = build_cnn(teacher_widths, (1, 28, 28), 10, 0).eval()
    logits = predict_logits(teacher, TensorData.from_split(split).train_x)
    ds = torchvision_dataset(args.data_dir, len(split.train_y))
    batch = 128
    rows: list[Row] = []

    kd, scratch = interleaved([kd_tune_epoch(split, logits, batch), kd_tune_epoch(split, None, batch)], args.repeats)
    rows.append(Row("KD epoch (cached teacher logits) / scratch epoch", kd, scratch, "<= 1.10"))
    naive, ours = interleaved([dataloader_epoch(ds, batch, teacher), kd_tune_epoch(split, logits, batch)], args.repeats)
    rows.append(Row(f"naive KD epoch (DataLoader + teacher {teacher_widths[0]}/{teacher_widths[1]} every batch) / kd-tune KD epoch",
                    naive, ours, ">= 20"))
    loader, memory = interleaved([dataloader_epoch(ds, batch, None), kd_tune_epoch(split, None, batch)], args.repeats)
    rows.append(Row("torchvision DataLoader epoch / kd-tune in-memory epoch (scratch)", loader, memory, ">= 3"))

    n_trials = 2 if args.quick else 6
    wall, train_s, per_trial = sweep_overhead(args.data_dir, n_trials, 500 if args.quick else 2000, warm_up=not args.quick)
    one, two = concurrency(full, 1 if args.quick else 3)

    print(f"machine: {machine()}")
    print(f"images per epoch: {len(split.train_y)}, batch {batch}, 1 thread, median of {args.repeats} interleaved repeats")
    print()
    print("| measure | A (s) | B (s) | A / B | goal |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.name} | {r.a:.3f} | {r.b:.3f} | {r.ratio:.2f} | {r.goal} |")
    print(f"| concurrency: student epochs/s with 2 concurrent 1-CPU trials / with 1 | {two:.3f} | {one:.3f} | {two / one:.2f} | >= 1.7 |")
    print()
    cached = "teacher trained in it (--quick)" if args.quick else "teacher cached"
    print(f"sweep overhead: {n_trials} trials run one at a time, {cached}: wall {wall:.1f} s, "
          f"training {train_s:.1f} s -> {per_trial:.2f} s per trial (Ray start-up, scheduling, MLflow, checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
