"""Packed students: K students of ``SeedCNN`` trained as one wide model. Plain PyTorch, like train.py.

The study's student (16/32 filters, 20,490 parameters) is far too small to keep a GPU busy: one
student's step is a few dozen kernel launches on tiny tensors. Stacking K students' parameters
turns K launch-bound steps into one step of K-times-larger kernels:

    conv1:      one conv with K*w1 outputs on a shared batch [B, C, H, W] (all members see the same
                data order), or a grouped conv (groups=K over K*C input channels) on per-member
                batches [K, B, C, H, W]
    conv2:      a grouped conv (groups=K): member k's w2 filters see only member k's w1 channels
    classifier: a batched matmul with weight [K, classes, F]

The members share no parameter, so the sum of their losses gives each member exactly its own
gradient, and Adam, being elementwise, on the packed parameters is K independent Adams. A packed run
differs from K separate runs of ``kd_tune.train.train`` only by float reassociation inside the
(grouped) convolutions and matmuls (see tests/test_packed.py for the measured size of that).

Member k's weights round-trip losslessly to an ordinary ``SeedCNN`` state dict (``state_dicts``,
``from_state_dicts``), so a packed trial's checkpoint can be one student's checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kd_tune.errors import DivergedError
from kd_tune.losses import KDLossTerms
from kd_tune.models import SeedCNN, build_model
from kd_tune.train import (
    EpochMetrics,
    Evaluation,
    TensorData,
    epoch_order,
    eval_batch,
    evaluations,
    predict_logits,
    step_precision,
    validations,
)

EVAL_STUDENT_IMAGES = 32768
"""Images times members per evaluation forward of a pack: bounds its activations (the 16/32 student's first
convolution alone gives 12.5 KB per image, 0.4 GB per chunk)."""

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
    Activations are channels_last by default, like ``build_model``'s: the stride-1 max-pool on the
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
        """Every member's ordinary ``SeedCNN`` state dict: ``build_model(...).load_state_dict(sd)`` takes each."""
        return [self.member_state_dict(k) for k in range(self.k)]

    def member(self, k: int) -> SeedCNN:
        """Member k as a stand-alone ``SeedCNN`` (a copy, laid out as ``build_model``'s); the global RNG is untouched."""
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
    """A pack whose member k starts exactly as ``build_model(widths, in_shape, num_classes, seeds[k])``."""
    state_dicts = [build_model(tuple(widths), in_shape, num_classes, s).state_dict() for s in seeds]
    return PackedCNN.from_state_dicts(state_dicts, widths, in_shape, num_classes, channels_last)


def pack_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    has_teacher: torch.Tensor | None = None,
) -> KDLossTerms:
    r"""``kd_tune.losses.kd_loss_terms`` for each member of a pack: terms of shape [K], each its member's batch mean.

    For member k with logits z_k [B, classes], labels y_k, teacher logits t_k, alpha_k and T_k (Hinton et al. 2015):

    .. math::
        hard_k = \frac{1}{B} \sum_b CE(z_{kb}, y_{kb}), \quad
        distill_k = \frac{T_k^2}{B} \sum_b KL(softmax(t_{kb} / T_k) \,\|\, softmax(z_{kb} / T_k)) \\
        total_k = hard_k \text{ if } \alpha_k = 1, \text{ else } \alpha_k \, hard_k + (1 - \alpha_k) \, distill_k

    with KL on log-space targets. A member without a teacher (``has_teacher`` False; all of them when
    ``teacher_logits`` is None) has distill_k = 0 exactly, whatever its row of ``teacher_logits`` holds.
    Shapes: logits [K, B, classes], labels [K, B], alpha / temperature / has_teacher [K].
    Train on ``total.sum()``: members share no parameter, so each one's gradient is its own.
    """
    k, b, classes = student_logits.shape
    hard = F.cross_entropy(student_logits.reshape(k * b, classes), labels.reshape(k * b), reduction="none").view(k, b).mean(1)
    if teacher_logits is None:
        distill = torch.zeros_like(hard)
    else:
        has = torch.ones(k, dtype=torch.bool, device=hard.device) if has_teacher is None else has_teacher
        # A member whose total ignores the distillation term must get no gradient through it: the term's
        # backward would multiply a zero by whatever the teacher holds, and 0 * NaN is NaN.
        used = (has & (alpha != 1))[:, None, None]
        z = torch.where(used, student_logits, student_logits.detach())
        t = torch.where(has[:, None, None], teacher_logits, 0.0)
        temp = temperature[:, None, None]
        kl = F.kl_div(F.log_softmax(z / temp, dim=-1), F.log_softmax(t / temp, dim=-1), reduction="none", log_target=True)
        distill = torch.where(has, kl.sum(-1).mean(1) * temperature**2, 0.0)
    total = torch.where(alpha == 1, hard, alpha * hard + (1 - alpha) * distill)
    return KDLossTerms(hard, distill, total)


@dataclass(frozen=True)
class Member:
    """One student of a pack: what ``kd_tune.train.train`` takes as arguments, plus which data rows it trains on."""

    seed: int
    """Fixes the member's epoch orders (``epoch_order``); its initial weights come from the pack given to ``train_pack``."""
    epochs: int
    alpha: float = 1.0
    temperature: float = 1.0
    labels: int = 0
    """Row of ``PackData.train_labels`` (e.g. one row per label-noise level)."""
    teacher: int | None = None
    """Row of ``PackData.teacher_train`` to distill from; None trains on hard labels alone (scratch)."""
    teacher_test: int | None = None
    """Row of ``PackData.teacher_test`` for the teacher-agreement metric; None reports no agreement."""


@dataclass(frozen=True)
class PackData:
    """The pack's data, resident on its device: ``TensorData`` with stacks where members may differ."""

    train_x: torch.Tensor
    """Normalized images [N, C, H, W], as ``TensorData.train_x``."""
    train_labels: torch.Tensor
    """[L, N] int64: L label sets (label-noise levels)."""
    test_x: torch.Tensor
    test_y: torch.Tensor
    teacher_train: torch.Tensor | None = None
    """[L', N, classes]: teachers' logits on train_x."""
    teacher_test: torch.Tensor | None = None
    """[L'', N_test, classes]: teachers' logits on test_x."""
    val_x: torch.Tensor | None = None
    """Validation images (None: no validation split), shared by every member, as ``TensorData.val_x``."""
    val_y: torch.Tensor | None = None

    def member_data(self, member: Member) -> TensorData:
        """What ``kd_tune.train.train`` would get for this member alone."""
        return TensorData(
            self.train_x,
            self.train_labels[member.labels],
            self.test_x,
            self.test_y,
            None if member.teacher is None or self.teacher_train is None else self.teacher_train[member.teacher],
            None if member.teacher_test is None or self.teacher_test is None else self.teacher_test[member.teacher_test],
            self.val_x,
            self.val_y,
        )


@torch.no_grad()
def pack_logits(model: PackedCNN, images: Sequence[torch.Tensor], rows: Sequence[int], packed: bool | None = None) -> list[torch.Tensor]:
    """Logits [len(rows), N, classes] of members ``rows`` on each image set [N, C, H, W] of ``images``.

    ``packed``: one packed forward per chunk of images (every member's logits at once), else each member as a
    stand-alone ``SeedCNN`` (copied once for all the image sets). None: packed except on a CPU, where a packed
    forward was 0.4-1.0x as fast as the members one by one in chunks of 2,048 images and 0.5-1.3x in the current chunks of
    128 (K = 1 ... 16, 1 thread, two runs; ``benchmarks/pack_bench.py --eval``, RESULTS.md); on a GPU a student's
    forward is launch-bound, as its step is.
    """
    if packed is None:
        packed = images[0].device.type != "cpu"
    if not packed:
        students = [model.member(i) for i in rows]
        return [torch.stack([predict_logits(student, x) for student in students]) for x in images]
    # Chunks of eval_batch() images for one student, fewer for a wide pack: K * chunk activations stay bounded.
    chunk = max(1, min(eval_batch(images[0].device), EVAL_STUDENT_IMAGES // model.k))
    was_training = model.training
    model.eval()
    out = [torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)], dim=1)[list(rows)] for x in images]
    model.train(was_training)
    return out


def evaluate_pack(
    model: PackedCNN, data: PackData, members: Sequence[Member], which: Sequence[int], packed: bool | None = None
) -> dict[int, tuple[Evaluation, tuple[float | None, float | None]]]:
    """What ``evaluate`` and ``validate`` of ``kd_tune.train`` give member k alone, for each k in ``which``: the
    members' logits (``pack_logits``, ``packed`` as there) scored all at once, so that a GPU syncs a few times
    per epoch instead of a few times per member."""
    if not which:
        return {}
    rows = list(which)
    teachers = [None if members[i].teacher_test is None or data.teacher_test is None else data.teacher_test[members[i].teacher_test]
                for i in rows]
    vals: list[tuple[float | None, float | None]]
    if data.val_x is None or data.val_y is None:
        (test,) = pack_logits(model, [data.test_x], rows, packed)
        vals = [(None, None)] * len(rows)
    else:
        test, val = pack_logits(model, [data.test_x, data.val_x], rows, packed)
        vals = validations(val, data.val_y)
    tests = evaluations(test, data.test_y, teachers)
    return {i: (ev, val) for i, ev, val in zip(rows, tests, vals, strict=True)}


@dataclass
class PackResult:
    history: list[list[EpochMetrics]]
    """history[k]: member k's epochs, as ``kd_tune.train.train`` returns them (none after it diverged)."""
    diverged: dict[int, DivergedError] = field(default_factory=dict)
    """Members whose epoch-mean loss was NaN or infinite, with that epoch and loss."""


def _check(model: PackedCNN, data: PackData, members: Sequence[Member]) -> int:
    if len(members) != model.k:
        raise ValueError(f"{len(members)} members for a pack of {model.k}")
    epochs = {m.epochs for m in members}
    if len(epochs) != 1:
        raise ValueError(f"all members of a pack train the same number of epochs, got {sorted(epochs)}")
    for i, m in enumerate(members):
        if not 0 <= m.labels < data.train_labels.shape[0]:
            raise ValueError(f"member {i}: labels row {m.labels} of {data.train_labels.shape[0]}")
        if m.teacher is not None and (data.teacher_train is None or not 0 <= m.teacher < data.teacher_train.shape[0]):
            raise ValueError(f"member {i}: teacher row {m.teacher} but teacher_train is {None if data.teacher_train is None else tuple(data.teacher_train.shape)}")
        if m.teacher_test is not None and (data.teacher_test is None or not 0 <= m.teacher_test < data.teacher_test.shape[0]):
            raise ValueError(f"member {i}: teacher_test row {m.teacher_test} but teacher_test is {None if data.teacher_test is None else tuple(data.teacher_test.shape)}")
    return epochs.pop()


def pack_epoch(
    model: PackedCNN,
    optimizer: torch.optim.Optimizer,
    data: PackData,
    members: Sequence[Member],
    epoch: int,
    batch_size: int,
    active: torch.Tensor | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Train the pack for epoch ``epoch`` (1-based); returns each member's summed (total, hard, distill) losses [K, 3], on the device.

    ``active`` [K] bool masks members out of the objective (a diverged member's NaN then reaches nothing).
    ``precision``: the forward's arithmetic, as in ``kd_tune.train.train``.
    """
    device = data.train_x.device
    k, n = len(members), data.train_x.shape[0]
    alpha = torch.tensor([m.alpha for m in members], device=device)
    temperature = torch.tensor([m.temperature for m in members], device=device)
    has_teacher = torch.tensor([m.teacher is not None for m in members], device=device)
    label_rows = torch.tensor([m.labels for m in members], device=device)[:, None]
    teacher_rows = torch.tensor([m.teacher or 0 for m in members], device=device)[:, None]
    use_teacher = data.teacher_train is not None and any(m.teacher is not None for m in members)
    active = torch.ones(k, dtype=torch.bool, device=device) if active is None else active
    seeds = sorted({m.seed for m in members})
    shared = len(seeds) == 1  # one data order for all: a plain first conv on one shared batch
    by_seed = {s: epoch_order(n, s, epoch) for s in seeds}
    orders = torch.stack([by_seed[m.seed] for m in members]).to(device)  # [K, N]
    sums = torch.zeros(k, 3, device=device)  # on the device: a .item() per step would stall a GPU
    for i in range(0, n, batch_size):
        idx = orders[:, i : i + batch_size]  # [K, B]
        # Gathered [B, K, ...] and viewed as [K, B, ...], the forward's transpose back is free.
        x = data.train_x[idx[0]] if shared else data.train_x[idx.t()].transpose(0, 1)
        with step_precision(device, precision):
            logits = model(x)
        teacher = data.teacher_train[teacher_rows, idx] if use_teacher and data.teacher_train is not None else None
        terms = pack_loss_terms(logits.float(), teacher, data.train_labels[label_rows, idx], alpha, temperature, has_teacher)
        optimizer.zero_grad(set_to_none=True)
        torch.where(active, terms.total, 0.0).sum().backward()
        optimizer.step()
        sums += torch.stack([terms.total, terms.hard, terms.distill], dim=1).detach() * idx.shape[1]
    return sums


def train_pack(
    model: PackedCNN,
    optimizer: torch.optim.Optimizer,
    data: PackData,
    members: Sequence[Member],
    *,
    batch_size: int,
    start_epoch: int = 0,
    exclude: Collection[int] = (),
    on_epoch: Callable[[int, EpochMetrics, Evaluation], None] | None = None,
    on_diverged: Callable[[int, DivergedError], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    precision: str = "float32",
) -> PackResult:
    """``kd_tune.train.train`` for K members at once, from the end of epoch ``start_epoch`` to the members' ``epochs``.

    Member k trains with seed, alpha, temperature and data rows ``members[k]``, from the weights it
    has in ``model``; ``optimizer`` is e.g. ``kd_tune.train.make_optimizer(model, lr)``. After each
    epoch ``on_epoch(k, metrics, evaluation)`` sees every member still training. A member whose
    epoch-mean loss is NaN or infinite is reported once (``on_diverged`` and ``PackResult.diverged``)
    and then masked out; the others go on unaffected. ``exclude``: members masked out from the start
    (e.g. diverged before a resume). ``epoch_seconds`` is the pack's epoch wall time split evenly over
    the members still training, so summing it over trials still gives the time spent. ``on_epoch_end(epoch)``
    comes after every member's ``on_epoch`` and ``on_diverged`` of that epoch (where a pack checkpoints).
    """
    epochs = _check(model, data, members)
    n, k = data.train_x.shape[0], len(members)
    active = [i not in exclude for i in range(k)]
    result = PackResult([[] for _ in range(k)])
    model.train()
    for epoch in range(start_epoch + 1, epochs + 1):
        if not any(active):
            break
        t0 = time.perf_counter()
        mask = torch.tensor(active, device=data.train_x.device)
        sums = pack_epoch(model, optimizer, data, members, epoch, batch_size, mask, precision)
        means = (sums / n).tolist()  # the one host sync of the epoch
        for i, (total, _, _) in enumerate(means):
            if active[i] and not math.isfinite(total):
                active[i] = False
                result.diverged[i] = DivergedError(epoch, total)
                if on_diverged is not None:
                    on_diverged(i, result.diverged[i])
        evaluations = evaluate_pack(model, data, members, [i for i in range(k) if active[i]])
        seconds = (time.perf_counter() - t0) / max(1, len(evaluations))
        for i, (ev, (val_acc, val_loss)) in evaluations.items():
            total, hard, distill = means[i]
            metrics = EpochMetrics(epoch, total, hard, distill, ev.acc, ev.loss, ev.teacher_agreement,
                                   ev.macro_precision, ev.macro_recall, ev.macro_f1, ev.ece, seconds, val_acc, val_loss)
            result.history[i].append(metrics)
            if on_epoch is not None:
                on_epoch(i, metrics, ev)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return result


__all__ = [
    "Member",
    "PackData",
    "PackResult",
    "PackedCNN",
    "build_pack",
    "channels_last_on",
    "evaluate_pack",
    "pack_epoch",
    "pack_logits",
    "pack_loss_terms",
    "train_pack",
]
