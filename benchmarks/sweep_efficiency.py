"""Sweep efficiency on this machine: the same students trained one after another in plain PyTorch (kd-tune's own
loop, one thread) against the same students as a ``kd-tune sweep`` with the default settings (one trial per CPU).

    python benchmarks/sweep_efficiency.py              # 8 students x 5 epochs on 20,000 MNIST images, teacher cached first
    python benchmarks/sweep_efficiency.py --repeats 3  # sequential and sweep alternated 3 times: medians
    python benchmarks/sweep_efficiency.py --epochs 15  # longer students: the fixed costs weigh less
    python benchmarks/sweep_efficiency.py --repeats 2 --compare-with ../old  # also an older checkout's sweep, alternated
    python benchmarks/sweep_efficiency.py --cpu        # and where the CPU time went during the sweep (Linux /proc)
    python benchmarks/sweep_efficiency.py --floor      # and the least any Ray Tune sweep costs here: the ratio's ceiling

ratio = median sequential seconds / median sweep wall seconds (the whole ``kd-tune sweep`` command: Python,
Ray's start and shutdown included). The two alternate (A B A B ...) because this machine's speed drifts by
10 % from one minute to the next. With N cores the ceiling is about N. Needs kd-tune installed and MNIST
(``kd-tune data mnist``); works in ./sweep_efficiency (made anew).

``--floor`` also times (alternated with the others) a bare Ray Tune command with no kd-tune in it: Python, Ray
Tune, the embedded Ray started as kd-tune starts it, one trial per CPU that imports torch (kd-tune's Adam,
kd_tune/distill/optim.py, does not import torch._dynamo as torch.optim's would), then Ray's shutdown. No sweep on this machine can take less than
that floor plus its training spread over the cores, so ``ceiling = sequential / (floor + sequential / cores)``
is the best ratio any Ray Tune sweep of these students could reach here.
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

from kd_tune.data.split import prepare
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.teacher import teacher_key
from kd_tune.distill.train import TensorData, make_optimizer, train
from kd_tune.space.parse import load_space
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.sweep.teacher_cache import TeacherCache

HERE = Path.cwd() / "sweep_efficiency"
CORES = os.cpu_count() or 1
SPACE = """name: efficiency
dataset: {name: mnist, train_size: 20000, label_noise: 0.0, val_size: 5000}
teacher: {widths: [32, 64], epochs: 1, lr: 0.001, batch_size: 128}
student: {widths: [16, 32], lr: 0.001, batch_size: 128}
grid: {alpha: [0.0, 0.33, 0.67, 1.0], temperature: [3.0], epochs: [EPOCHS], seed: [0, 1]}
resources: {cpu: 1, gpu: 0}
"""


FLOOR = """import os, sys
import ray
from ray import tune


def trial(config):
    import torch  # noqa: F401

    tune.report({"done": 1})


ray.init(address="local", include_dashboard=False, _system_config={"prestart_worker_first_driver": False}, log_to_driver=False)
tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"x": tune.grid_search(list(range(os.cpu_count() or 1)))},
                   run_config=tune.RunConfig(name=sys.argv[1], storage_path=sys.argv[2], verbose=0))
assert not tuner.fit().errors
ray.shutdown()
os._exit(0)  # without Python's module teardown (seconds), as the kd-tune command exits
"""


def floor(name: str) -> float:
    """Seconds of a bare Ray Tune command (``FLOOR``): one trivial PyTorch trial per CPU, whole process."""
    script = HERE / "floor.py"
    script.write_text(FLOOR)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), name, str(HERE / "floor_results")], cwd=HERE, check=True, capture_output=True)
    return time.perf_counter() - t0


def ceiling(sequential: float, floor_s: float) -> float:
    """The best ratio any Ray Tune sweep could reach here: its floor plus the training spread over the cores."""
    return round(sequential / (floor_s + sequential / CORES), 2)


def sweep(name: str, code: str | None = None, cpu: bool = False) -> float:
    """Seconds of one ``kd-tune sweep`` command (``python -m kd_tune.cli``, as the ``kd-tune`` script runs it), with
    kd-tune imported from ``code`` (a checkout, e.g. an older commit's worktree) when given; with ``cpu``, prints
    where the machine's CPU time went meanwhile (:func:`cpu_use`)."""
    env = {**os.environ, "PYTHONPATH": code} if code else None
    before = _cpu_times() if cpu else {}
    log = HERE / f"{name}.log"  # a file, not a pipe: nothing reads the output while the sweep runs
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "kd_tune.cli", "sweep", str(HERE / "space.yaml"), "--name", name, "--storage",
                                 str(HERE / "st"), "--tracking-uri", f"sqlite:///{HERE}/mlflow.db", "--quiet"],
                                cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
        use = cpu_use(proc, before, t0) if cpu else None
        proc.wait()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kd-tune sweep {name} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    if use is not None:
        print(json.dumps(use), flush=True)
    return wall


def _cpu_times() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and its command line, from /proc."""
    hz, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields, comm = stat[stat.rfind(")") + 2 :].split(), stat[stat.find("(") + 1 : stat.rfind(")")]
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / hz, f"{comm} {cmd}")  # Ray retitles its workers: both names
    return out


def _kind(pid: int, cmd: str, driver: int) -> str:
    if pid == driver:
        return "driver"
    if "ImplicitFu" in cmd:  # a Tune trial actor (the command name is cut at 15 characters)
        return "trial workers"
    return "ray's processes" if "ray" in cmd.lower() else "other"


def cpu_use(proc: subprocess.Popen[bytes], before: dict[int, tuple[float, str]], t0: float, every: float = 0.25) -> dict[str, object]:
    """Samples every process's CPU time until ``proc`` ends: core-seconds per kind of process (the sweep's driver,
    its trial workers, Ray's own processes, anything else), busy and idle core-seconds, and the busy cores per
    2-second window. Sampling, not synchronization: the loop only reads /proc while the sweep runs."""
    cores = os.cpu_count() or 1
    last: dict[int, tuple[float, str]] = {}
    windows: dict[int, float] = {}
    previous = sum(c for c, _ in before.values())
    while proc.poll() is None:
        time.sleep(every)
        now = _cpu_times()
        last |= {pid: v for pid, v in now.items() if pid not in before or v[0] > before[pid][0]}
        total = sum(c for c, _ in now.values()) + sum(before[p][0] for p in before.keys() - now.keys())
        window = int((time.perf_counter() - t0) // 2) * 2
        windows[window] = windows.get(window, 0.0) + max(0.0, total - previous)
        previous = total
    wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    for pid, (cpu_s, cmd) in last.items():
        kind = _kind(pid, cmd, proc.pid)
        kinds[kind] = kinds.get(kind, 0.0) + cpu_s - (before[pid][0] if pid in before else 0.0)
    busy = sum(kinds.values())
    return {"cpu_wall_s": round(wall, 1), "core_s_available": round(wall * cores, 1), "core_s_busy": round(busy, 1),
            "core_s_idle": round(wall * cores - busy, 1), "core_s_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items())},
            "busy_cores_per_2s": [round(v / 2, 1) for _, v in sorted(windows.items())]}


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
        model = build_cnn(spec.student.widths, split.info.shape, split.info.num_classes, point.seed)
        train(model, make_optimizer(model, spec.student.lr), data, epochs=point.epochs, batch_size=spec.student.batch_size,
              seed=point.seed, alpha=point.alpha, temperature=point.temperature or 1.0)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="sequential / sweep pairs, alternated (default 1)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per student (default 5, the issue's measurement)")
    parser.add_argument("--cpu", action="store_true", help="also print where the CPU time went during each measured sweep "
                        "(core-seconds of the driver, trial workers, Ray's processes; idle core-seconds; busy cores per 2 s)")
    parser.add_argument("--floor", action="store_true", help="also time a bare Ray Tune command (one trivial PyTorch trial per "
                        "CPU): the least any sweep costs here, and so the ratio's ceiling")
    parser.add_argument("--compare-with", metavar="CHECKOUT", help="also time the sweep of the kd-tune in this folder (an older "
                        "commit's worktree), alternated with the others")
    args = parser.parse_args()
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    (HERE / "space.yaml").write_text(SPACE.replace("EPOCHS", str(args.epochs)))
    warm = sweep("warmup")  # trains and caches the teacher; not measured
    seqs, walls, others, floors = [], [], [], []
    for r in range(args.repeats):
        seqs.append(sequential())
        walls.append(sweep(f"measured{r}", cpu=args.cpu))
        row = {"pair": r, "sequential_s": round(seqs[-1], 1), "sweep_wall_s": round(walls[-1], 1), "ratio": round(seqs[-1] / walls[-1], 2)}
        if args.compare_with:
            others.append(sweep(f"compared{r}", args.compare_with))
            row |= {"compared_sweep_wall_s": round(others[-1], 1), "compared_ratio": round(seqs[-1] / others[-1], 2)}
        if args.floor:
            floors.append(floor(f"floor{r}"))
            row |= {"floor_s": round(floors[-1], 1), "ceiling_ratio": ceiling(seqs[-1], floors[-1])}
        print(json.dumps(row), flush=True)
    seq, wall = statistics.median(seqs), statistics.median(walls)
    summary = {"students": 8, "epochs": args.epochs, "repeats": args.repeats, "sequential_s": round(seq, 1), "sweep_wall_s": round(wall, 1),
               "ratio": round(seq / wall, 2), "warmup_sweep_s": round(warm, 1)}
    if others:
        summary |= {"compared": args.compare_with, "compared_sweep_wall_s": round(statistics.median(others), 1),
                    "compared_ratio": round(seq / statistics.median(others), 2)}
    if floors:
        summary |= {"floor_s": round(statistics.median(floors), 1), "ceiling_ratio": ceiling(seq, statistics.median(floors))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
