"""The optimizer: Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015), exactly as
``torch.optim.Adam`` computes it with its defaults, without ``torch.optim.Optimizer``'s machinery.

Why not ``torch.optim.Adam`` itself: ``Optimizer`` wraps ``add_param_group``, ``zero_grad`` and ``step`` so that
TorchDynamo leaves them alone, and the first call imports ``torch._dynamo``: 1.7-2.3 CPU-s in a fresh process,
more than a small trial's training. Every trial worker, teacher task and pre-trained-logits task is a fresh
process. This class calls the same functional kernel, ``torch.optim.adam.adam``, with the same arguments, so its
updates are bit for bit the same as ``torch.optim.Adam``'s. That includes the choice of kernel, which the kernel
makes itself: a loop on the CPU, ``foreach`` for CUDA parameters. Its ``state_dict`` has ``torch.optim.Adam``'s format,
so either one can load the other's. ``tests/test_optim.py`` checks all of this against ``torch.optim.Adam``.

Update per parameter p with gradient g at step t (lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, no weight decay):
    m_t = beta1 m_{t-1} + (1 - beta1) g,   v_t = beta2 v_{t-1} + (1 - beta2) g^2
    p  -= lr (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch.optim.adam import adam

DEFAULTS: dict[str, Any] = {
    "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
    "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": False,
}
"""``torch.optim.Adam``'s defaults; with ``lr`` and ``params`` they are its ``param_groups[0]``."""


class Optimizer(Protocol):
    """What the training loops ask of an optimizer: :class:`Adam`, or any ``torch.optim`` optimizer."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Adam:
    """Constant-lr Adam over one group of parameters: ``torch.optim.Adam(params, lr=lr)``'s updates and state."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if any(torch.is_complex(p) for p in self.params):
            raise ValueError("complex parameters: not supported by kd_tune.distill.optim.Adam")
        self.lr = float(lr)
        # Per parameter: step (a CPU scalar, as torch keeps it), exp_avg, exp_avg_sq; made at its first step.
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            s = self.state.get(i)
            if s is None:
                s = self.state[i] = {"step": torch.tensor(0.0, dtype=_step_dtype()),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(s["exp_avg"])
            exp_avg_sqs.append(s["exp_avg_sq"])
            steps.append(s["step"])
        # The kernel's own defaults for the rest (capturable, differentiable, fused off; foreach chosen from the
        # parameters' device): what torch.optim.Adam passes with its defaults. (Complex parameters: not supported.)
        d = DEFAULTS
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=d["foreach"], amsgrad=d["amsgrad"], beta1=d["betas"][0],
             beta2=d["betas"][1], lr=self.lr, weight_decay=d["weight_decay"], eps=d["eps"], maximize=d["maximize"])

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam.state_dict()``'s format: state by parameter index, one param group."""
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [{"lr": self.lr, **DEFAULTS, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this class's or ``torch.optim.Adam``'s state (one group of as many parameters; its defaults)."""
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {len(group['params'])} parameters, this one has {len(self.params)}")
        # betas may come back from a checkpoint as a list; a torch older than a setting has no key for it
        settings = {k: tuple(group[k]) if k == "betas" else group.get(k, v) for k, v in DEFAULTS.items()}
        unlike = {k: v for k, v in settings.items() if v != DEFAULTS[k]}
        if unlike:
            raise ValueError(f"optimizer state with settings {unlike}: allowed only torch.optim.Adam's defaults {DEFAULTS}")
        self.lr = float(group["lr"])
        index = {pid: i for i, pid in enumerate(group["params"])}
        self.state = {}
        for pid, s in state_dict["state"].items():
            p = self.params[index[pid]]
            # As torch.optim does: moments move to their parameter's device and dtype, the step stays a CPU scalar.
            self.state[index[pid]] = {k: v if k == "step" else v.to(device=p.device, dtype=p.dtype) for k, v in s.items()}


def _step_dtype() -> torch.dtype:
    # torch.optim's _get_scalar_dtype(): the step counts in float64 only under a float64 default dtype
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
