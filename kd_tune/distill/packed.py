"""Packed students: K students of ``SeedCNN`` as one wide model. Plain PyTorch, like train.py.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd_tune.distill.models.cnn import SeedCNN, build_cnn

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


def channels_last_on(device: torch.device | str) -> bool:
    """The faster activation layout of a pack on ``device``: channels_last on a CPU (the stride-1 max-pool,
    1.6-2.9x), NCHW on a GPU (H100, K = 64: 38-39x one student against 29-31x channels_last; benchmarks/RESULTS.md)."""
    return torch.device(device).type == "cpu"


def build_pack(
    widths: Sequence[int], in_shape: tuple[int, int, int], num_classes: int, seeds: Sequence[int], channels_last: bool = True
) -> PackedCNN:
    """A pack whose member k starts exactly as ``build_cnn(widths, in_shape, num_classes, seeds[k])``."""
    state_dicts = [build_cnn(tuple(widths), in_shape, num_classes, s).state_dict() for s in seeds]
    return PackedCNN.from_state_dicts(state_dicts, widths, in_shape, num_classes, channels_last)
