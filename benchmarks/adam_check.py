"""kd-tune's Adam (kd_tune/distill/optim.py) against torch.optim.Adam on a device: the same weights and state, bit for
bit, after a number of steps of the study's student and of a pack of 16 (tests/test_optim.py checks the CPU; on CUDA
both pick the ``foreach`` kernel themselves, which this checks). PyTorch alone: it runs on a bare GPU machine.

    python benchmarks/adam_check.py --device cuda     # part of benchmarks/gpu_session.sh
    python benchmarks/adam_check.py --device cpu

Exit status 1 when any tensor differs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from kd_tune.distill.models.cnn import build_cnn  # noqa: E402
from kd_tune.distill.optim import Adam  # noqa: E402
from kd_tune.distill.packed import build_pack  # noqa: E402


def check(name: str, make: Callable[[], torch.nn.Module], device: torch.device, steps: int) -> bool:
    models = [make().to(device) for _ in range(2)]
    opts = [Adam(models[0].parameters(), 1e-3), torch.optim.Adam(models[1].parameters(), lr=1e-3)]
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (64,), generator=g).to(device)
        for m, o in zip(models, opts, strict=True):
            o.zero_grad(set_to_none=True)
            out = m(x)
            torch.nn.functional.cross_entropy(out.reshape(-1, 10), y.repeat(out.numel() // (10 * 64))).backward()
            o.step()
    same = all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True))
    a, b = opts[0].state_dict(), opts[1].state_dict()
    same &= a["param_groups"] == b["param_groups"]
    same &= all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    print(f"{name}: {steps} steps on {device}: {'identical' if same else 'DIFFERENT'}")
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    device = torch.device(a.device)
    ok = check("student 16/32", lambda: build_cnn((16, 32), (1, 28, 28), 10, 0), device, a.steps)
    ok &= check("pack of 16", lambda: build_pack((16, 32), (1, 28, 28), 10, list(range(16))), device, a.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
