"""kd_tune.distill.optim.Adam against torch.optim.Adam: the same updates bit for bit, the same state_dict, each
loading the other's; and the reason it exists: a fresh process that trains with it never imports torch._dynamo."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import torch

from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.optim import Adam

LR = 3e-3


def _model(seed: int = 0) -> torch.nn.Module:
    return build_cnn((3, 5), (1, 12, 12), 10, seed)


def _steps(model: torch.nn.Module, opt: Adam | torch.optim.Adam, n: int, start: int = 0) -> None:
    """n steps of cross-entropy on batches drawn from (start + step); the last layer's bias is frozen on odd steps
    (a parameter without a gradient is skipped, its moments left alone)."""
    last = list(model.parameters())[-1]
    for k in range(start, start + n):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if k % 2:
            last.grad = None
        opt.step()


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, t in a["state"][i].items():
            u = b["state"][i][key]
            assert (t.dtype, t.device, t.shape) == (u.dtype, u.device, u.shape) and torch.equal(t, u), (i, key)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_the_same_updates_and_state_as_torch_adam() -> None:
    ours_model, torch_model = _model(), _model()
    ours, theirs = Adam(ours_model.parameters(), LR), torch.optim.Adam(torch_model.parameters(), lr=LR)
    _same_state(ours.state_dict(), theirs.state_dict())  # before any step: no state, the same group
    _steps(ours_model, ours, 7)
    _steps(torch_model, theirs, 7)
    _same_weights(ours_model, torch_model)
    _same_state(ours.state_dict(), theirs.state_dict())
    # the last bias, frozen on odd steps, took 4 of the 7 steps; every parameter moved
    steps = [float(s["step"]) for s in ours.state_dict()["state"].values()]
    assert steps == [7.0] * (len(steps) - 1) + [4.0]
    assert all(not torch.equal(p, q) for p, q in zip(ours_model.parameters(), _model().parameters(), strict=True))


@pytest.mark.parametrize("first", ["ours", "torch"])
def test_each_resumes_from_the_others_state(first: str) -> None:
    """A checkpoint written by one (through torch.save / torch.load(weights_only=True), as checkpoint.py does)
    continues in the other exactly as an uninterrupted run of either."""
    make = {"ours": lambda m: Adam(m.parameters(), LR), "torch": lambda m: torch.optim.Adam(m.parameters(), lr=LR)}
    second = "torch" if first == "ours" else "ours"
    whole = _model()
    opt = make[first](whole)
    _steps(whole, opt, 6)

    part = _model()
    opt1 = make[first](part)
    _steps(part, opt1, 3)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "optimizer": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=1)  # other weights, replaced by the checkpoint's
    resumed.load_state_dict(saved["model"])
    opt2 = make[second](resumed)
    opt2.load_state_dict(saved["optimizer"])
    _steps(resumed, opt2, 3, start=3)
    _same_weights(whole, resumed)
    _same_state(opt.state_dict(), opt2.state_dict())


def test_loading_another_optimizers_state_is_refused() -> None:
    model = _model()
    other = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0.01)
    _steps(model, other, 1)
    with pytest.raises(ValueError, match=r"settings \{'weight_decay': 0.01\}: allowed only torch.optim.Adam's defaults"):
        Adam(model.parameters(), LR).load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="optimizer state for 6 parameters, this one has 2"):
        Adam(list(model.parameters())[:2], LR).load_state_dict(Adam(model.parameters(), LR).state_dict())
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([], LR)


def test_a_fresh_process_trains_without_importing_dynamo() -> None:
    """The point of the class: torch.optim's Optimizer imports torch._dynamo (1.7-2.3 CPU-s) at its first use, in
    every trial worker. A fresh interpreter that trains a student one epoch with the loop's optimizer must not."""
    code = (
        "import sys, torch\n"
        "from kd_tune.distill.models.cnn import build_cnn\n"
        "from kd_tune.distill.train import TensorData, make_optimizer, train\n"
        "m = build_cnn((3, 5), (1, 12, 12), 10, 0)\n"
        "x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))\n"
        "train(m, make_optimizer(m, 1e-3), TensorData(x, y, x, y), epochs=1, batch_size=16, seed=0)\n"
        "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
