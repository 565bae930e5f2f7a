"""Packed students: K students of one architecture as one wide model (``cnn`` and ``mlp``). Plain PyTorch.

The study's student (16/32 filters, 20,490 parameters) is far too small to keep a GPU busy: one student's step is a
few dozen kernel launches on tiny tensors. Stacking K students' parameters turns K launch-bound steps into one step
of K-times-larger kernels:

    conv1:      one conv with K*w1 outputs on a shared batch [B, C, H, W] (all members see the same data order),
                or a grouped conv (groups=K over K*C input channels) on per-member batches [K, B, C, H, W]
    conv2:      a grouped conv (groups=K): member k's w2 filters see only member k's w1 channels
    classifier: a batched matmul with weight [K, classes, F]

The members share no parameter, so the sum of their losses gives each member exactly its own gradient, and Adam,
being elementwise, on the packed parameters is K independent Adams. A packed run differs from K separate runs of
``kd_tune.distill.train.train`` only by float reassociation inside the (grouped) convolutions and matmuls (see
tests/test_packed.py for the measured size of that). Member k's weights round-trip losslessly to an ordinary
``SeedCNN`` state dict (``state_dicts``, ``from_state_dicts``), so a pack's checkpoint holds ordinary students.

An ``mlp`` pack (:class:`PackedMLP`) is the same idea with batched matmuls: layer l of member k is ``W_l[k]``. Which
architectures pack, and how: :data:`PACKS` (:func:`pack_from_state_dicts`); the others train one student per trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_tune.distill.models import build
from kd_tune.distill.models.cnn import SeedCNN, build_cnn
from kd_tune.distill.models.mlp import MLP

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    """What a pack copies from SeedCNN, read off a weightless instance so that the two cannot drift apart."""

    names: tuple[str, str, str]
    """The (conv1, conv2, linear) module names: the keys of a SeedCNN state dict."""
    pads: tuple[tuple[int, ...], ...]
    """TF-"same" paddings (left, right, top, bottom): before conv1, before the max-pool, before conv2."""
    features: int
    """The classifier's input size, w2 * H/4 * W/4."""

    @classmethod
    def of(cls, widths: Sequence[int], in_shape: tuple[int, int, int], num_classes: int) -> _Layout:
        with torch.device("meta"):
            template = SeedCNN(tuple(widths), in_shape, num_classes)
        conv1, conv2, fc = (n for n, m in template.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))
        pad1, pad_pool, pad2 = (tuple(m.padding) for m in template.modules() if isinstance(m, nn.ZeroPad2d | nn.ReplicationPad2d))
        linear = template.get_submodule(fc)
        assert isinstance(linear, nn.Linear)
        return cls((conv1, conv2, fc), (pad1, pad_pool, pad2), linear.in_features)


class PackedCNN(nn.Module):
    """K ``SeedCNN(widths, in_shape, num_classes)`` students as one model; logits come out as [K, B, classes].

    Weights start at zero: fill them with :meth:`from_state_dicts` or :func:`build_pack`.
    Activations are channels_last by default, like ``build_cnn``'s: the stride-1 max-pool on the
    CPU is several times slower on NCHW tensors, for K*w1 channels as for w1 (benchmarks/pack_bench.py).
    """

    def __init__(
        self,
        k: int,
        widths: Sequence[int],
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        w1, w2 = widths
        c = in_shape[0]
        self.k, self.widths, self.in_shape, self.num_classes = k, (w1, w2), in_shape, num_classes
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layout = _Layout.of(widths, in_shape, num_classes)
        self.features = self.layout.features
        # empty(memory_format=...) sets channels_last strides even where C = 1 (.contiguous() would keep NCHW's,
        # equally valid then), and a conv follows its weight's layout: with NCHW strides the whole pack ran NCHW.
        self.conv1_weight = nn.Parameter(torch.empty(k * w1, c, 3, 3, memory_format=self.memory_format).zero_())
        self.conv1_bias = nn.Parameter(torch.zeros(k * w1))
        self.conv2_weight = nn.Parameter(torch.empty(k * w2, w1, 3, 3, memory_format=self.memory_format).zero_())
        self.conv2_bias = nn.Parameter(torch.zeros(k * w2))
        self.fc_weight = nn.Parameter(torch.zeros(k, num_classes, self.features))
        self.fc_bias = nn.Parameter(torch.zeros(k, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: a shared batch [B, C, H, W] or per-member batches [K, B, C, H, W]; returns logits [K, B, classes]."""
        c, h, w = self.in_shape
        if x.dim() == 5:
            if x.shape[0] != self.k:
                raise ValueError(f"per-member input has {x.shape[0]} members, the pack {self.k}")
            b = x.shape[1]
            # Member-major channels: member k's C input channels are group k of the grouped conv.
            x = x.transpose(0, 1).reshape(b, self.k * c, h, w)
            groups = self.k
        else:
            b, groups = x.shape[0], 1
        x = x.contiguous(memory_format=self.memory_format)
        pad1, pad_pool, pad2 = self.layout.pads
        x = F.conv2d(F.pad(x, pad1), self.conv1_weight, self.conv1_bias, stride=2, groups=groups)
        x = F.max_pool2d(F.pad(F.leaky_relu(x, 0.2), pad_pool, mode="replicate"), 2, stride=1)
        x = F.conv2d(F.pad(x, pad2), self.conv2_weight, self.conv2_bias, stride=2, groups=self.k)
        # reshape is logical: member k's features come out in nn.Flatten's (C, H, W) order whatever the layout.
        x = x.reshape(b, self.k, self.features)
        return torch.einsum("bkf,kcf->kbc", x, self.fc_weight) + self.fc_bias[:, None, :]

    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Sequence[StateDict],
        widths: Sequence[int],
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels_last: bool = True,
    ) -> PackedCNN:
        """A pack of the students whose ordinary ``SeedCNN`` state dicts are given (on their device)."""
        pack = cls(len(state_dicts), widths, in_shape, num_classes, channels_last)
        conv1, conv2, fc = pack.layout.names
        expected = {f"{n}.{p}" for n in pack.layout.names for p in ("weight", "bias")}
        for i, sd in enumerate(state_dicts):
            if set(sd) != expected:
                raise ValueError(f"state dict {i}: keys {sorted(sd)} are not SeedCNN's {sorted(expected)}")
        stacked = {
            "conv1_weight": torch.cat([sd[f"{conv1}.weight"] for sd in state_dicts]),
            "conv1_bias": torch.cat([sd[f"{conv1}.bias"] for sd in state_dicts]),
            "conv2_weight": torch.cat([sd[f"{conv2}.weight"] for sd in state_dicts]),
            "conv2_bias": torch.cat([sd[f"{conv2}.bias"] for sd in state_dicts]),
            "fc_weight": torch.stack([sd[f"{fc}.weight"] for sd in state_dicts]),
            "fc_bias": torch.stack([sd[f"{fc}.bias"] for sd in state_dicts]),
        }
        device = state_dicts[0][f"{conv1}.weight"].device
        pack.to(device)
        with torch.no_grad():
            for name, value in stacked.items():
                param = getattr(pack, name)
                if param.shape != value.shape:
                    raise ValueError(f"{name}: the state dicts give {tuple(value.shape)}, widths {widths} and shape {in_shape} need {tuple(param.shape)}")
                param.copy_(value)
        return pack

    def member_state_dict(self, k: int) -> StateDict:
        """Member k as an ordinary ``SeedCNN`` state dict (copies: a saved slice would drag the whole pack along)."""
        w1, w2 = self.widths
        conv1, conv2, fc = self.layout.names
        parts = {
            f"{conv1}.weight": self.conv1_weight[k * w1 : (k + 1) * w1],
            f"{conv1}.bias": self.conv1_bias[k * w1 : (k + 1) * w1],
            f"{conv2}.weight": self.conv2_weight[k * w2 : (k + 1) * w2],
            f"{conv2}.bias": self.conv2_bias[k * w2 : (k + 1) * w2],
            f"{fc}.weight": self.fc_weight[k],
            f"{fc}.bias": self.fc_bias[k],
        }
        return {name: t.detach().clone() for name, t in parts.items()}

    def state_dicts(self) -> list[StateDict]:
        """Every member's ordinary ``SeedCNN`` state dict: ``build_cnn(...).load_state_dict(sd)`` takes each."""
        return [self.member_state_dict(k) for k in range(self.k)]

    def member(self, k: int) -> SeedCNN:
        """Member k as a stand-alone ``SeedCNN`` (a copy, laid out as ``build_cnn``'s); the global RNG is untouched."""
        with torch.device("meta"):  # no random init: it would draw from the global RNG
            model = SeedCNN(self.widths, self.in_shape, self.num_classes)
        model = model.to_empty(device=self.fc_weight.device).to(memory_format=torch.channels_last)
        model.load_state_dict(self.member_state_dict(k))
        return model

    @classmethod
    def from_model_args(cls, margs: Mapping[str, Any], state_dicts: Sequence[StateDict], channels_last: bool = True) -> PackedCNN:
        return cls.from_state_dicts(state_dicts, margs["args"].get("widths", (16, 32)), tuple(margs["in_shape"]),
                                    int(margs["num_classes"]), channels_last)


def channels_last_on(device: torch.device | str) -> bool:
    """The faster activation layout of a pack on ``device``: channels_last on a CPU (the stride-1 max-pool), NCHW on a
    GPU (benchmarks/RESULTS.md: "packed students on a GPU", H100, and "packed students" on the CPU)."""
    return torch.device(device).type == "cpu"


def build_pack(
    widths: Sequence[int], in_shape: tuple[int, int, int], num_classes: int, seeds: Sequence[int], channels_last: bool = True
) -> PackedCNN:
    """A pack whose member k starts exactly as ``build_cnn(widths, in_shape, num_classes, seeds[k])``."""
    state_dicts = [build_cnn(tuple(widths), in_shape, num_classes, s).state_dict() for s in seeds]
    return PackedCNN.from_state_dicts(state_dicts, widths, in_shape, num_classes, channels_last)


class PackedMLP(nn.Module):
    """K ``MLP`` students with the same hidden sizes as one model: each layer a batched matmul over the members;
    logits come out as [K, B, classes]. Each member's dropout masks are its own (drawn for [K, B, units])."""

    def __init__(self, k: int, in_shape: tuple[int, int, int], num_classes: int, hidden: Sequence[int], dropout: float = 0.0,
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        self.k, self.in_shape, self.num_classes, self.hidden = k, in_shape, num_classes, tuple(hidden)
        self.dropout, self.input_dropout = dropout, input_dropout
        sizes = [math.prod(in_shape), *self.hidden, num_classes]
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(k, b, a)) for a, b in zip(sizes, sizes[1:], strict=False)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(k, b)) for b in sizes[1:]])
        with torch.device("meta"):  # the names of an MLP's Linear layers: the keys of its state dict
            template = MLP(in_shape, num_classes, self.hidden, dropout, input_dropout)
        self.names = [n for n, m in template.named_modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: a shared batch [B, C, H, W] or per-member batches [K, B, C, H, W]; returns logits [K, B, classes]."""
        h = x.flatten(2) if x.dim() == 5 else x.flatten(1)
        if h.dim() == 2 and (self.input_dropout == 0 or not self.training):
            h = torch.einsum("bf,kof->kbo", h, self.weights[0]) + self.biases[0][:, None, :]  # one shared batch: no copy per member
        else:
            h = h.expand(self.k, *h.shape) if h.dim() == 2 else h
            h = F.dropout(h, self.input_dropout, self.training)
            h = torch.baddbmm(self.biases[0][:, None, :], h, self.weights[0].transpose(1, 2))
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = F.dropout(F.relu(h), self.dropout, self.training)
            h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        return h

    @classmethod
    def from_model_args(cls, margs: Mapping[str, Any], state_dicts: Sequence[StateDict], channels_last: bool = True) -> PackedMLP:
        """A pack of the ``mlp`` students of ``margs`` whose ordinary state dicts are given (on their device)."""
        a = margs["args"]
        pack = cls(len(state_dicts), tuple(margs["in_shape"]), int(margs["num_classes"]), a.get("hidden", (800, 800)),
                   a.get("dropout", 0.0), a.get("input_dropout", 0.0))
        pack.to(next(iter(state_dicts[0].values())).device)
        with torch.no_grad():
            for i, name in enumerate(pack.names):
                pack.weights[i].copy_(torch.stack([sd[f"{name}.weight"] for sd in state_dicts]))
                pack.biases[i].copy_(torch.stack([sd[f"{name}.bias"] for sd in state_dicts]))
        return pack

    def member_state_dict(self, k: int) -> StateDict:
        """Member k as an ordinary ``MLP`` state dict (copies)."""
        out = {}
        for i, name in enumerate(self.names):
            out[f"{name}.weight"] = self.weights[i][k].detach().clone()
            out[f"{name}.bias"] = self.biases[i][k].detach().clone()
        return out


PackFactory = Callable[[Mapping[str, Any], Sequence[StateDict], bool], nn.Module]
PACKS: dict[str, PackFactory] = {"cnn": PackedCNN.from_model_args, "mlp": PackedMLP.from_model_args}
"""Architecture -> how K of its students become one packed model (the spec's ``Family.packs`` says the same)."""


def pack_from_state_dicts(margs: Mapping[str, Any], state_dicts: Sequence[StateDict], channels_last: bool = True) -> nn.Module:
    """The packed model of the students of ``margs`` (:func:`kd_tune.distill.models.model_args`) whose state dicts are given."""
    if margs["arch"] not in PACKS:
        raise ValueError(f"students of {margs['arch']!r} do not pack; allowed: {', '.join(PACKS)}")
    return PACKS[margs["arch"]](margs, state_dicts, channels_last)


def member_model(pack: nn.Module, margs: Mapping[str, Any], k: int) -> nn.Module:
    """Member k of a pack as a stand-alone model of ``margs`` (a copy); the global RNG is untouched."""
    model = build(margs, seed=0).to(next(pack.parameters()).device)
    model.load_state_dict(member_state_dict(pack, k))
    return model


def pack_size(pack: nn.Module) -> int:
    """K, the students of a packed model."""
    k = getattr(pack, "k", None)
    if not isinstance(k, int):
        raise TypeError(f"{type(pack).__name__} is not a packed model")
    return k


def member_state_dict(pack: nn.Module, k: int) -> StateDict:
    """Member k of a packed model as an ordinary state dict of its architecture (copies)."""
    if not isinstance(pack, PackedCNN | PackedMLP):
        raise TypeError(f"{type(pack).__name__} is not a packed model")
    return pack.member_state_dict(k)
