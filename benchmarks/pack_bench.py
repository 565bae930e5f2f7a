"""Packed students (kd_tune.packed) against one unpacked student: student epochs per second.

    python benchmarks/pack_bench.py                          # CPU, 1 thread, K = 1, 4, 16, 64, 1,024 images (~2 min on 2 idle cores)
    python benchmarks/pack_bench.py --threads 2
    python benchmarks/pack_bench.py --device cuda            # K up to 256, 16,384 images
    python benchmarks/pack_bench.py --device cuda --study    # the study's pack, whole epochs with evaluation
    python benchmarks/pack_bench.py --eval --sizes 1,4,16    # the members' evaluation: packed forward or one by one
    python benchmarks/pack_bench.py --bf16                   # also student.precision bfloat16 (autocast forward)
    python benchmarks/pack_bench.py --device cuda --nchw --graphs --bf16   # and CUDA graphs (an experiment)
    python benchmarks/pack_bench.py --device cuda --fused    # and fused Adam (one kernel per update; an experiment)
    python benchmarks/pack_bench.py --mlp 800,800            # MLP students (hidden sizes) instead: one alone against packs

PyTorch only (no Ray, no MLflow): it runs wherever torch does. The data are synthetic, with MNIST's
shape (1x28x28 uint8 images, 10 classes, cached teacher logits): the step's cost does not depend on
the pixel values. The study's student (16/32), batch 128, distillation loss (alpha 0.5, T 3).

For each K the contenders are interleaved (A B C A B C ...) after a warm-up round, and the median of
the repeats is kept, so a drifting machine hits all alike:
  unpacked    one SeedCNN, the loop of kd_tune.train.train (gather by index, kd_loss_terms, Adam)
  shared      a pack of K whose members share one data order (one seed): a plain first conv
  per-member  a pack of K with K seeds, so K data orders: a grouped first conv on [K, B, ...] batches
Timed: one training epoch (the host sync at its end included), without the evaluation.
"speedup" = student epochs/s of the pack / those of one unpacked student.

``--study`` times what a sweep of ``search_spaces/seed_alpha_grid.yaml`` trains instead: whole epochs,
evaluation included, of the study's pack (alpha 0.0 ... 1.0 at T 3 and a scratch member, one seed, the
layout and evaluation the trainable picks for the device) and of one unpacked student (``kd_tune.train.train``),
on 55,000 training, 10,000 test and 5,000 validation images (``--images`` scales all three), and the
pack's evaluation alone, as one packed forward and member by member. The study's training time is then
1,000 pack epochs (its 12 epoch-shared students, 12,000 student epochs), against 12,000 unpacked epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench import interleaved  # noqa: E402  (benchmarks/, the script's own folder: the same interleaving as bench.py)

from kd_tune.distill.losses import pack_loss_terms  # noqa: E402
from kd_tune.distill.models import build, count_parameters, model_args  # noqa: E402
from kd_tune.distill.models.cnn import build_cnn  # noqa: E402
from kd_tune.distill.pack_train import Member, PackData, evaluate_pack, pack_epoch, train_pack  # noqa: E402
from kd_tune.distill.packed import build_pack, channels_last_on, pack_from_state_dicts  # noqa: E402
from kd_tune.distill.train import epoch_order, make_optimizer, train, train_epoch  # noqa: E402

SHAPE, CLASSES, WIDTHS, BATCH, LR, ALPHA, TEMPERATURE = (1, 28, 28), 10, (16, 32), 128, 1e-3, 0.5, 3.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_epochs(device: torch.device, body: Callable[[int], object]) -> Callable[[], float]:
    """A contender: each call runs ``body(epoch)`` for the next epoch (1, 2, ...) and returns its seconds, from a
    device with no queued work to ``body``'s end (each body ends in a host sync, as the real loops do)."""
    epoch = 0

    def run() -> float:
        nonlocal epoch
        epoch += 1
        sync(device)
        t0 = time.perf_counter()
        body(epoch)
        return time.perf_counter() - t0

    return run


def unpacked(d: PackData, device: torch.device, precision: str = "float32") -> Callable[[], float]:
    """One student, epoch after epoch, trained by kd_tune.train.train's own epoch (``train_epoch``)."""
    model = build_cnn(WIDTHS, SHAPE, CLASSES, 0).to(device)
    opt = make_optimizer(model, LR)
    data = d.member_data(Member(seed=0, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0))
    n = data.train_x.shape[0]
    # train.train's one host sync per epoch included.
    return timed_epochs(device, lambda e: (train_epoch(model, opt, data, e, BATCH, 0, ALPHA, TEMPERATURE, precision) / n).tolist())


def packed(d: PackData, device: torch.device, k: int, shared: bool, channels_last: bool, precision: str = "float32",
           fused: bool = False) -> Callable[[], float]:
    seeds = [0] * k if shared else list(range(k))
    members = [Member(seed=s, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0) for s in seeds]
    model = build_pack(WIDTHS, SHAPE, CLASSES, seeds, channels_last=channels_last).to(device)
    # fused: Adam's whole update in one kernel per step instead of torch's default (foreach: ~a dozen
    # launches per step), an experiment for the launch-bound GPU step; the same arithmetic up to reassociation.
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True) if fused else make_optimizer(model, LR)
    n = d.train_x.shape[0]
    return timed_epochs(device, lambda e: (pack_epoch(model, opt, d, members, e, BATCH, precision=precision) / n).tolist())


def graphed(d: PackData, device: torch.device, k: int, shared: bool) -> Callable[[], float]:
    """An experiment, not what the trainable does: the NCHW pack's whole step (gather, forward, loss,
    backward, Adam with ``capturable=True``) captured once as a CUDA graph and replayed per batch (PyTorch's
    "whole network capture"), so a step costs one index copy and one graph launch instead of dozens of
    kernel launches. Full batches only (the timed epochs are whole multiples of the batch)."""
    seeds = [0] * k if shared else list(range(k))
    model = build_pack(WIDTHS, SHAPE, CLASSES, seeds, channels_last=False).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR, capturable=True)
    alpha, temperature = torch.full((k,), ALPHA, device=device), torch.full((k,), TEMPERATURE, device=device)
    labels, teacher = d.train_labels[0], d.teacher_train[0] if d.teacher_train is not None else None
    assert teacher is not None
    n = d.train_x.shape[0] // BATCH * BATCH
    static_idx = torch.stack([epoch_order(n, s, 1)[:BATCH] for s in seeds]).to(device)  # [K, B]
    sums = torch.zeros(k, 3, device=device)

    def step() -> None:
        x = d.train_x[static_idx[0]] if shared else d.train_x[static_idx.t()].transpose(0, 1)
        terms = pack_loss_terms(model(x), teacher[static_idx], labels[static_idx], alpha, temperature)
        terms.total.sum().backward()
        opt.step()
        sums.add_(torch.stack([terms.total, terms.hard, terms.distill], dim=1).detach() * BATCH)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN's autotuning, Adam's state), as the recipe asks
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()

    def epoch(e: int) -> None:
        orders = torch.stack([epoch_order(n, s, e) for s in seeds]).to(device)
        sums.zero_()
        for i in range(0, n, BATCH):
            static_idx.copy_(orders[:, i : i + BATCH])
            graph.replay()
        (sums / n).tolist()

    return timed_epochs(device, epoch)


def synthetic(n: int, device: torch.device) -> PackData:
    """MNIST-shaped synthetic data at the study's split: n training images (55,000 = 60,000 less 5,000 for
    validation), test and validation sets in proportion (10,000 and 5,000 at n = 55,000), a teacher's logits
    on each. Random pixels: a step's cost does not depend on their values."""
    g = torch.Generator().manual_seed(1)
    n_test, n_val = max(100, n * 10 // 55), max(100, n * 5 // 55)

    def images(m: int) -> torch.Tensor:
        x = torch.randint(0, 256, (m, *SHAPE), dtype=torch.uint8, generator=g).float().div_(255)
        return x.to(device).contiguous(memory_format=torch.channels_last)  # the study's pixel / 255

    def labels(m: int) -> torch.Tensor:
        return torch.randint(0, CLASSES, (m,), generator=g).to(device)

    return PackData(images(n), labels(n)[None], images(n_test), labels(n_test), (3 * torch.randn(1, n, CLASSES, generator=g)).to(device),
                    (3 * torch.randn(1, n_test, CLASSES, generator=g)).to(device), images(n_val), labels(n_val))


def study(device: torch.device, n: int, repeats: int) -> None:
    """The study's grid as a sweep trains it (see the module's docstring)."""
    d = synthetic(n, device)
    members = [Member(seed=0, epochs=1, alpha=a / 10, temperature=3.0, teacher=0, teacher_test=0) for a in range(11)]
    members.append(Member(seed=0, epochs=1, alpha=1.0, teacher_test=0))  # scratch: no teacher
    pack = build_pack(WIDTHS, SHAPE, CLASSES, [0] * len(members), channels_last=channels_last_on(device)).to(device)
    pack_opt = make_optimizer(pack, LR)
    student = build_cnn(WIDTHS, SHAPE, CLASSES, 0).to(device)
    student_opt = make_optimizer(student, LR)
    alone = d.member_data(members[5])
    def pack_epoch_with_eval(e: int) -> None:
        train_pack(pack, pack_opt, d, [replace(m, epochs=e) for m in members], batch_size=BATCH, start_epoch=e - 1)

    def student_epoch_with_eval(e: int) -> None:
        train(student, student_opt, alone, epochs=e, batch_size=BATCH, seed=0, alpha=0.5, temperature=3.0, start_epoch=e - 1)

    def evaluation(packed: bool) -> Callable[[], float]:
        return timed_epochs(device, lambda e: evaluate_pack(pack, d, members, range(len(members)), packed))

    rows = [("one unpacked student: epoch with evaluation", timed_epochs(device, student_epoch_with_eval)),
            (f"the study's pack ({len(members)} students): epoch with evaluation", timed_epochs(device, pack_epoch_with_eval)),
            ("the pack's evaluation, one packed forward", evaluation(True)),
            ("the pack's evaluation, member by member", evaluation(False))]
    seconds = interleaved([run for _, run in rows], repeats)
    print(f"\n{n} training, {d.test_x.shape[0]} test, {d.val_x.shape[0] if d.val_x is not None else 0} validation images; "
          f"pack layout {'channels_last' if channels_last_on(device) else 'NCHW'}; default evaluation "
          f"{'member by member' if device.type == 'cpu' else 'one packed forward'}\n")
    print("| measure | s |\n| --- | --- |")
    for (name, _), sec in zip(rows, seconds, strict=True):
        print(f"| {name} | {sec:.3f} |")
    unpacked_h, packed_min = 12_000 * seconds[0] / 3600, 1_000 * seconds[1] / 60
    print(f"\nthe study's 12,000 student epochs of {n} images: {packed_min:.1f} min as one pack (1,000 pack epochs), "
          f"{unpacked_h:.2f} h as 12,000 unpacked student epochs one after another: {unpacked_h * 60 / packed_min:.1f}x", flush=True)


def evaluation_table(device: torch.device, sizes: list[int], repeats: int) -> None:
    """A pack's per-epoch evaluation (10,000 test and 5,000 validation images, ``evaluate_pack``): one packed forward
    per chunk of images against member by member, for each K."""
    d = synthetic(55_000, device)  # its 10,000 test and 5,000 validation images (the training images are not used)
    print("\n| K | member by member (s) | one packed forward (s) | packed / by member speed |\n| --- | --- | --- | --- |", flush=True)
    def contender(k: int, packed: bool) -> Callable[[], float]:
        members = [Member(seed=i, epochs=1, teacher_test=0) for i in range(k)]
        pack = build_pack(WIDTHS, SHAPE, CLASSES, list(range(k)), channels_last=channels_last_on(device)).to(device)
        return timed_epochs(device, lambda e: evaluate_pack(pack, d, members, range(k), packed))

    for k in sizes:
        by_member, packed = interleaved([contender(k, False), contender(k, True)], repeats)
        print(f"| {k} | {by_member:.3f} | {packed:.3f} | {by_member / packed:.2f}x |", flush=True)


def mlp_table(device: torch.device, d: PackData, sizes: list[int], hidden: tuple[int, ...], repeats: int) -> None:
    """MLP students (``mlp`` with ``hidden``, no dropout) one alone (``train_epoch``) against packs of K
    (:class:`~kd_tune.distill.packed.PackedMLP`: batched matmuls), shared (one data order) and per-member (K orders)."""
    margs = model_args("mlp", {"hidden": list(hidden)}, SHAPE, CLASSES)
    print(f"\nstudent: mlp {'-'.join(map(str, hidden))} ({count_parameters(build(margs, 0)):,} parameters)\n\n"
          "| K | variant | s per pack-epoch | student epochs/s | speedup vs unpacked |\n| --- | --- | --- | --- | --- |", flush=True)

    def alone() -> Callable[[], float]:
        model = build(margs, 0).to(device)
        opt = make_optimizer(model, LR)
        data = d.member_data(Member(seed=0, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0))
        return timed_epochs(device, lambda e: (train_epoch(model, opt, data, e, BATCH, 0, ALPHA, TEMPERATURE) / d.train_x.shape[0]).tolist())

    def pack(k: int, shared: bool) -> Callable[[], float]:
        seeds = [0] * k if shared else list(range(k))
        members = [Member(seed=s, epochs=1, alpha=ALPHA, temperature=TEMPERATURE, teacher=0) for s in seeds]
        model = pack_from_state_dicts(margs, [build(margs, s).state_dict() for s in seeds]).to(device)
        opt = make_optimizer(model, LR)
        return timed_epochs(device, lambda e: (pack_epoch(model, opt, d, members, e, BATCH) / d.train_x.shape[0]).tolist())

    for k in sizes:
        variants = [("unpacked (1 student)", alone()), ("shared", pack(k, True))] + ([("per-member", pack(k, False))] if k > 1 else [])
        seconds = interleaved([run for _, run in variants], repeats)
        for (name, _), sec in zip(variants, seconds, strict=True):
            students = 1 if name.startswith("unpacked") else k
            print(f"| {k} | {name} | {sec:.3f} | {students / sec:.2f} | {students / sec * seconds[0]:.2f}x |", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"unknown CPU ({os.cpu_count()} logical cores)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="pack sizes K, comma-separated (default 1,4,16,64; on cuda 1,4,16,64,256)")
    p.add_argument("--images", type=int, default=None, help="training images per epoch (default 1024; on cuda 16384): seconds scale linearly with it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: what a 1-CPU trial gets)")
    p.add_argument("--nchw", action="store_true", help="also time packs with contiguous (NCHW) activations instead of channels_last")
    p.add_argument("--study", action="store_true",
                   help="time the study's pack and one student, whole epochs with evaluation (--images: training images, default 55000)")
    p.add_argument("--eval", action="store_true", help="time the members' evaluation instead: one packed forward against member by member")
    p.add_argument("--graphs", action="store_true", help="also time NCHW packs whose step is replayed as one CUDA graph (an experiment; cuda only)")
    p.add_argument("--bf16", action="store_true", help="also time every contender with student.precision bfloat16 (autocast forward)")
    p.add_argument("--fused", action="store_true", help="also time the packs (channels_last, float32) with fused Adam (torch.optim.Adam(fused=True))")
    p.add_argument("--mlp", type=lambda s: tuple(int(v) for v in s.split(",")), default=None, metavar="HIDDEN",
                   help="time MLP students of these hidden sizes (e.g. 800,800) instead of the study's CNN")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    if args.graphs and device.type != "cuda":
        p.error("--graphs: CUDA graphs need --device cuda")
    sizes = args.sizes or ([1, 4, 16, 64, 256] if device.type == "cuda" else [1, 4, 16, 64])
    n = args.images or (55_000 if args.study else 16384 if device.type == "cuda" else 1024)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what the trainable does: fixed shapes
    print(f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{n} images/epoch, batch {BATCH}, student {WIDTHS[0]}/{WIDTHS[1]}, float32; {args.repeats} repeats; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if args.study:
        study(device, n, args.repeats)
        return 0
    if args.eval:
        evaluation_table(device, sizes, args.repeats)
        return 0
    d = synthetic(n, device)
    if args.mlp:
        mlp_table(device, d, sizes, args.mlp, args.repeats)
        return 0
    layouts = [True, False] if args.nchw else [True]
    print("\n| K | variant | s per pack-epoch | student epochs/s | speedup vs unpacked |\n| --- | --- | --- | --- | --- |", flush=True)
    for k in sizes:
        variants: list[tuple[str, Callable[[], float]]] = [("unpacked (1 student)", unpacked(d, device))]
        if args.bf16:
            variants.append(("unpacked (1 student), bf16 autocast", unpacked(d, device, "bfloat16")))
        for channels_last in layouts:
            suffix = "" if channels_last else ", NCHW"
            variants.append((f"shared{suffix}", packed(d, device, k, True, channels_last)))
            if k > 1:  # with one member there is only one data order: the shared path
                variants.append((f"per-member{suffix}", packed(d, device, k, False, channels_last)))
            if args.bf16:
                variants.append((f"shared{suffix}, bf16 autocast", packed(d, device, k, True, channels_last, "bfloat16")))
                if k > 1:
                    variants.append((f"per-member{suffix}, bf16 autocast", packed(d, device, k, False, channels_last, "bfloat16")))
        if args.fused:
            variants.append(("shared, fused Adam", packed(d, device, k, True, True, fused=True)))
            if k > 1:
                variants.append(("per-member, fused Adam", packed(d, device, k, False, True, fused=True)))
        if args.graphs:
            for shared in [True, False] if k > 1 else [True]:
                name = f"{'shared' if shared else 'per-member'}, NCHW, CUDA graph"
                try:
                    variants.append((name, graphed(d, device, k, shared)))
                except Exception as e:  # an experiment: a failure to capture is a result, not the end of the run
                    print(f"| {k} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | |", flush=True)
        seconds = interleaved([run for _, run in variants], args.repeats)
        base = 1 / seconds[0]
        for (name, _), s in zip(variants, seconds, strict=True):
            students = 1 if name.startswith("unpacked") else k
            print(f"| {k} | {name} | {s:.3f} | {students / s:.2f} | {students / s / base:.2f} |", flush=True)
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
