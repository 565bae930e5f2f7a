"""The epoch cost of each distillation method (``grid.method``) against a KD epoch, with cached teacher logits.

    python benchmarks/method_bench.py                      # CPU, 1 thread: one student and a pack of 16 (~2.5 min)
    python benchmarks/method_bench.py --rounds 9 --pack-rounds 0   # the one student alone
    python benchmarks/method_bench.py --device cuda

PyTorch only. The study's CNN student (16/32), batch 128, alpha 0.5, T 3, Adam, on synthetic data of MNIST's shape
(random pixels and teacher logits: a step's cost does not depend on their values; ``pack_bench.synthetic``). Timed:
one training epoch, its host sync at the end included, without evaluation:

  one student   ``kd_tune.distill.train.train_epoch`` with ``method`` and ``knobs``, 6,000 images per epoch
  pack of 16    ``kd_tune.distill.pack_train.pack_epoch``, 16 members of one method and one data order (the study's
                pack), 1,024 images per epoch (a pack's epoch costs ~16 students')

Methods: kd (Hinton's), kd with logit standardization, kd with reverse_kl, js and skew_kl, dkd, dist (their default
knobs otherwise). Each contender keeps its own model and optimizer from epoch to epoch. The machine's speed drifts
(up to 35 % within an hour here, with other work beside it), so after one warm-up epoch of each, rounds alternate KD
with every other method (kd, m1, kd, m2, ..., kd, m6; one closing kd after the last round), and a method's ratio is
the median over the rounds of its epoch's seconds over the mean of the two KD epochs beside it. On the CPU the
seconds are the process's CPU time (``time.process_time``; one thread): other work that takes the core away from this
process stops its clock instead of adding to it (it still shares the caches and memory); on a GPU, wall seconds.

An epoch's spread on a shared machine (+-15 % between neighbours) hides a few per cent, so the loss is also timed
alone, alternated the same way: its forward and backward on random logits of a step's shape ([128, 10] for the one
student, [16, 128, 10] for the pack; ``--loss-reps`` calls per timing), and what it adds to a KD step in per cent of
that step (the KD epoch's median seconds over its steps): the part of an epoch's ratio that the loss accounts for.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pack_bench import BATCH, CLASSES, LR, SHAPE, WIDTHS, device_name, sync, synthetic  # noqa: E402  (benchmarks/)

from kd_tune.distill.losses import get_loss  # noqa: E402
from kd_tune.distill.models.cnn import build_cnn  # noqa: E402
from kd_tune.distill.pack_train import Member, PackData, pack_epoch  # noqa: E402
from kd_tune.distill.packed import build_pack, channels_last_on  # noqa: E402
from kd_tune.distill.train import make_optimizer, train_epoch  # noqa: E402
from kd_tune.space.methods import canonical_knobs  # noqa: E402

ALPHA, TEMPERATURE = 0.5, 3.0
METHODS: list[tuple[str, str, tuple[tuple[str, Any], ...]]] = [
    ("kd", "kd", ()),
    ("kd+standardize", "kd", (("standardize", True),)),
    ("kd reverse_kl", "kd", (("divergence", "reverse_kl"),)),
    ("kd js", "kd", (("divergence", "js"),)),
    ("kd skew_kl", "kd", (("divergence", "skew_kl"), ("skew", 0.1))),
    ("dkd", "dkd", ()),
    ("dist", "dist", ()),
]


def clock(device: torch.device) -> Callable[[], float]:
    """The process's CPU seconds on the CPU (what this process ran, whoever else shares the cores), wall seconds on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def timed_epochs(device: torch.device, body: Callable[[int], object]) -> Callable[[], float]:
    """A contender: each call runs ``body(epoch)`` for the next epoch (1, 2, ...) and returns its seconds (:func:`clock`)."""
    epoch, now = 0, clock(device)

    def run() -> float:
        nonlocal epoch
        epoch += 1
        sync(device)
        t0 = now()
        body(epoch)
        return now() - t0

    return run


def one_student(d: PackData, device: torch.device, method: str, knobs: tuple[tuple[str, Any], ...]) -> Callable[[], float]:
    model = build_cnn(WIDTHS, SHAPE, CLASSES, 0).to(device)
    opt = make_optimizer(model, LR)
    data = d.member_data(Member(seed=0, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0, method=method, knobs=knobs))
    return timed_epochs(device, lambda e: train_epoch(model, opt, data, e, BATCH, 0, ALPHA, TEMPERATURE, "float32", method, knobs).tolist())


def pack(d: PackData, device: torch.device, k: int, method: str, knobs: tuple[tuple[str, Any], ...]) -> Callable[[], float]:
    members = [Member(seed=0, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0, method=method, knobs=knobs) for _ in range(k)]
    model = build_pack(WIDTHS, SHAPE, CLASSES, [0] * k, channels_last=channels_last_on(device)).to(device)
    opt = make_optimizer(model, LR)
    return timed_epochs(device, lambda e: pack_epoch(model, opt, d, members, e, BATCH).tolist())


def loss_alone(shape: tuple[int, ...], method: str, knobs: tuple[tuple[str, Any], ...], device: torch.device, reps: int) -> Callable[[], float]:
    """Seconds per forward and backward of the loss on logits of ``shape`` ([B, C]: ``terms``, [K, B, C]: ``pack_terms``
    with [K] knobs, as ``pack_epoch`` calls it), the mean of ``reps`` calls."""
    g = torch.Generator().manual_seed(0)
    z0, teacher = (torch.randn(*shape, generator=g).mul_(scale).to(device) for scale in (2.0, 3.0))
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    loss = get_loss(method)
    if len(shape) == 2:
        kwargs: dict[str, Any] = dict(knobs)
        terms, args = loss.terms, (ALPHA, TEMPERATURE)
    else:
        k = shape[0]
        kwargs = {n: v if isinstance(v, (str, bool)) else torch.full((k,), float(v), device=device) for n, v in canonical_knobs(method, knobs)}
        kwargs["has_teacher"] = torch.ones(k, dtype=torch.bool, device=device)
        terms, args = loss.pack_terms, (torch.full((k,), ALPHA, device=device), torch.full((k,), TEMPERATURE, device=device))
    assert terms is not None
    now = clock(device)

    def run() -> float:
        sync(device)
        t0 = now()
        for _ in range(reps):
            z = z0.clone().requires_grad_(True)
            terms(z, teacher, labels, *args, epoch=1, **kwargs).total.sum().backward()
        sync(device)
        return (now() - t0) / reps

    return run


def alternated(contenders: list[Callable[[], float]], rounds: int) -> tuple[list[list[float]], list[list[float]]]:
    """One warm-up epoch of each, then ``rounds`` rounds of kd, m1, kd, m2, ..., kd, m_n and a last kd: each
    contender's seconds, and for each other method's epoch the mean seconds of the two KD epochs beside it (contender 0
    is KD)."""
    for run in contenders:
        run()
    sequence = [i for _ in range(rounds) for m in range(1, len(contenders)) for i in (0, m)] + [0]
    times = [contenders[i]() for i in sequence]
    own: list[list[float]] = [[] for _ in contenders]
    beside: list[list[float]] = [[] for _ in contenders]
    for p, (i, t) in enumerate(zip(sequence, times, strict=True)):
        own[i].append(t)
        if i:
            beside[i].append((times[p - 1] + times[p + 1]) / 2)
    return own, beside


def table(title: str, names: list[str], own: list[list[float]], beside: list[list[float]]) -> None:
    print(f"\n{title}\n\n| method | median s per epoch | median ratio to the KD epochs beside it | range of the ratios |\n| --- | --- | --- | --- |")
    kd = statistics.median(own[0])
    print(f"| {names[0]} | {kd:.3f} (all {len(own[0])} KD epochs) | 1 | |")
    for name, times, kds in zip(names[1:], own[1:], beside[1:], strict=True):
        ratios = [t / k for t, k in zip(times, kds, strict=True)]
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |", flush=True)


def loss_table(names: list[str], shapes: list[tuple[str, tuple[int, ...], float]], runs: list[tuple[list[list[float]], list[list[float]]]]) -> None:
    """Microseconds of each loss's forward and backward, and what it adds to a KD step in per cent of that step."""
    print("\nThe loss alone (forward and backward), median microseconds per step; + % of a KD step: (its median - KD's) / the KD step")
    header = " | ".join(f"{label} us | + % of a KD step ({step * 1e3:.1f} ms)" for label, _, step in shapes)
    print(f"\n| method | {header} |\n| --- |{' --- | --- |' * len(shapes)}")
    for i, name in enumerate(names):
        cells = []
        for (_, _, step), (own, _) in zip(shapes, runs, strict=True):
            us, kd = statistics.median(own[i]), statistics.median(own[0])
            cells.append(f"{us * 1e6:.0f} | {(us - kd) / step * 100:+.1f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--images", type=int, default=6000, help="training images per epoch of the one student (default 6000)")
    p.add_argument("--pack-images", type=int, default=1024, help="training images per epoch of the pack (default 1024)")
    p.add_argument("--pack", type=int, default=16, help="members of the pack (default 16)")
    p.add_argument("--rounds", type=int, default=15, help="alternated rounds of the one student (default 15)")
    p.add_argument("--pack-rounds", type=int, default=3, help="alternated rounds of the pack (default 3; 0: no pack)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: what a 1-CPU trial gets)")
    p.add_argument("--loss-rounds", type=int, default=5, help="alternated rounds of the loss alone (default 5; 0: none)")
    p.add_argument("--loss-reps", type=int, default=100, help="calls per timing of the loss alone (default 100)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what the trainable does: fixed shapes
    print(f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; batch {BATCH}, student "
          f"{WIDTHS[0]}/{WIDTHS[1]}, float32, alpha {ALPHA}, T {TEMPERATURE}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load average {os.getloadavg()[0]:.2f} at start; seconds: {'CPU time of this process' if device.type == 'cpu' else 'wall'}", flush=True)
    names = [name for name, _, _ in METHODS]
    steps: list[tuple[str, tuple[int, ...], float]] = []  # (label, a step's logits shape, a KD step's median seconds)
    if args.rounds:
        d = synthetic(args.images, device)
        own, beside = alternated([one_student(d, device, m, k) for _, m, k in METHODS], args.rounds)
        table(f"One student (train_epoch), {args.images} images per epoch, {args.rounds} rounds:", names, own, beside)
        steps.append(("one student", (BATCH, CLASSES), statistics.median(own[0]) / math.ceil(args.images / BATCH)))
    if args.pack_rounds:
        d = synthetic(args.pack_images, device)
        own, beside = alternated([pack(d, device, args.pack, m, k) for _, m, k in METHODS], args.pack_rounds)
        table(f"A pack of {args.pack} (pack_epoch, one data order), {args.pack_images} images per epoch, {args.pack_rounds} rounds:", names, own, beside)
        steps.append((f"pack of {args.pack}", (args.pack, BATCH, CLASSES), statistics.median(own[0]) / math.ceil(args.pack_images / BATCH)))
    if args.loss_rounds and steps:
        runs = [alternated([loss_alone(shape, m, k, device, args.loss_reps) for _, m, k in METHODS], args.loss_rounds) for _, shape, _ in steps]
        loss_table(names, steps, runs)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {time.strftime('%H:%M')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
