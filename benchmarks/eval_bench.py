"""Evaluation chunk size: seconds of one evaluation (kd_tune.train.predict_logits) per chunk size, per model width.

    python benchmarks/eval_bench.py                     # CPU, 1 thread (a 1-CPU trial), 15,000 images, ~1 min
    python benchmarks/eval_bench.py --threads 2 --widths 16,32 64,128 256,512
    python benchmarks/eval_bench.py --device cuda --chunks 128,512,2048,8192

PyTorch only. Every epoch of a trial evaluates its student on the validation and test images (5,000 + 10,000
for MNIST), and a teacher predicts on every training and test image once: that forward is what is timed here,
in chunks of each size, for each width. Synthetic images with MNIST's shape (the cost does not depend on the
pixels), channels_last as kd-tune's models are. The chunk sizes are interleaved (A B C A B C ...) after a
warm-up round; medians of the repeats. The row marked "default" is kd_tune.train.eval_batch(device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench import interleaved, timed  # noqa: E402  (benchmarks/, the script's own folder)

from kd_tune.distill.models.cnn import build_cnn  # noqa: E402
from kd_tune.distill.train import eval_batch, predict_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1, a 1-CPU trial)")
    parser.add_argument("--images", type=int, default=15000, help="images per evaluation (default 15,000: MNIST's validation + test)")
    parser.add_argument("--chunks", default="64,128,256,512,2048", help="chunk sizes, comma separated")
    parser.add_argument("--widths", nargs="+", default=["16,32", "64,128"], help="model widths (w1,w2), e.g. 16,32 (the student)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {name}; torch {torch.__version__}; {args.images} images 1x28x28; default chunk {eval_batch(device)}")
    x = torch.rand(args.images, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    for w in args.widths:
        widths = [int(v) for v in w.split(",")]
        model = build_cnn(widths, (1, 28, 28), 10, 0).to(device)

        def run(chunk: int, model: torch.nn.Module = model) -> object:
            return predict_logits(model, x, chunk).sum().item()  # a host sync: the GPU's work is inside the time

        seconds = interleaved([timed(lambda c=c: run(c)) for c in chunks], args.repeats)
        best = min(seconds)
        for c, s in zip(chunks, seconds, strict=True):
            mark = " (default)" if c == eval_batch(device) else ""
            print(f"widths {widths[0]}/{widths[1]}  chunk {c:>5}{mark:<10}  {s:7.3f} s  {s / best:5.2f}x the fastest")


if __name__ == "__main__":
    main()
