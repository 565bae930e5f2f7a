"""What a live teacher costs: a distilled epoch with augmented batches (the teacher scoring each one) against a scratch
epoch with the same augmentation, for one student and for packs of K (shared data order: one teacher forward a step
for the whole pack; K seeds: one per data order).

    python benchmarks/online_bench.py                       # CPU, 1 thread, K = 1, 4, 16, 4,096 images (~2 min on 2 idle cores)
    python benchmarks/online_bench.py --device cuda --images 16384 --sizes 1,16,64

PyTorch only. Synthetic MNIST-shaped data (random pixels: the cost does not depend on them); the study's student (the
16/32 CNN, which packs), the teacher the small conv net of search_spaces/hinton_mnist.yaml (16/32 filters, 128 hidden
units), random shifts of up to 2 pixels, batch 128. The contenders are interleaved after a warm-up, medians of the
repeats. "ratio" = seconds of the distilled epoch / seconds of the scratch epoch of the same pack.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import interleaved  # noqa: E402
from pack_bench import device_name, timed_epochs  # noqa: E402

from kd_tune.distill.augment import Augment  # noqa: E402
from kd_tune.distill.models import build, model_args  # noqa: E402
from kd_tune.distill.online import OnlineTeacher  # noqa: E402
from kd_tune.distill.pack_train import Member, PackData, pack_epoch  # noqa: E402
from kd_tune.distill.packed import pack_from_state_dicts  # noqa: E402
from kd_tune.distill.train import TensorData, make_optimizer, train_epoch  # noqa: E402

SHAPE, CLASSES, BATCH, LR = (1, 28, 28), 10, 128, 1e-3
STUDENT = model_args("cnn", {"widths": [16, 32]}, SHAPE, CLASSES)
TEACHER = model_args("convnet", {"channels": [16, 32], "hidden": 128}, SHAPE, CLASSES)
SHIFT = Augment("shift", 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, *SHAPE, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (args.images,), generator=g).to(device)
    teacher = OnlineTeacher([build(TEACHER, 1)]).to(device)
    print(f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; {args.images} images/epoch, "
          f"batch {BATCH}; student cnn 16/32, teacher convnet 16/32-128, shift 2; {args.repeats} repeats; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load average {os.getloadavg()[0]:.2f} at start\n", flush=True)

    def alone(distill: bool) -> Callable[[], float]:
        model = build(STUDENT, 0).to(device)
        opt = make_optimizer(model, LR)
        data = TensorData(x, y, x[:1], y[:1], online_teacher=teacher if distill else None)
        return timed_epochs(device, lambda e: train_epoch(model, opt, data, e, BATCH, 0, 0.5 if distill else 1.0, 4.0, augment=SHIFT).tolist())

    def pack(k: int, shared: bool, distill: bool) -> Callable[[], float]:
        seeds = [0] * k if shared else list(range(k))
        members = [Member(seed=s, epochs=1, alpha=0.5 if distill else 1.0, temperature=4.0, teacher=0 if distill else None) for s in seeds]
        model = pack_from_state_dicts(STUDENT, [build(STUDENT, s).state_dict() for s in seeds], channels_last=device.type == "cpu").to(device)
        opt = make_optimizer(model, LR)
        data = PackData(x, y[None], x[:1], y[:1], online_teachers=[teacher])
        return timed_epochs(device, lambda e: pack_epoch(model, opt, data, members, e, BATCH, augment=SHIFT).tolist())

    print("| K | data orders | scratch epoch (s) | distilled epoch, live teacher (s) | ratio | teacher forwards per step |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    steps = -(-args.images // BATCH)
    for k in args.sizes:
        for shared in [True] if k == 1 else [True, False]:
            scratch, distilled = (alone(False), alone(True)) if k == 1 else (pack(k, shared, False), pack(k, shared, True))
            before = teacher.forwards
            s_sec, d_sec = interleaved([scratch, distilled], args.repeats)
            per_step = (teacher.forwards - before) / (steps * (args.repeats + 1))
            print(f"| {k} | {1 if shared else k} | {s_sec:.3f} | {d_sec:.3f} | {d_sec / s_sec:.2f}x | {per_step:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
