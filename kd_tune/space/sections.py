"""The model sections of a space: the teacher's and the student's (an architecture and its arguments, how it trains)
and a pre-trained teacher's source. Plain Python, like the rest of the spec."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from kd_tune.space.architectures import FAMILIES, is_factory, packs


@dataclass(frozen=True)
class ModelSpec:
    """An architecture and its arguments (:mod:`kd_tune.space.architectures`; the network itself is built by
    ``kd_tune.distill.models``). In YAML the arguments stand beside ``arch`` in the model's section (``arch: mlp,
    hidden: [800, 800]``); a user's own factory (``arch: "package.module:function"``) takes them under ``args``."""

    arch: str = "cnn"
    args: tuple[tuple[str, Any], ...] = (("widths", (16, 32)),)
    """The factory's keyword arguments (defaults filled in), as sorted (name, value) pairs: hashable, like the spec."""

    def kwargs(self) -> dict[str, Any]:
        """The arguments as the factory takes them (lists for tuples: JSON- and checkpoint-friendly)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.args}

    @property
    def is_factory(self) -> bool:
        """A user's own ``package.module:function``, not an architecture of the registry."""
        return is_factory(self.arch)

    @property
    def packs(self) -> bool:
        """Whether students of this architecture train packed (several per trial as one model)."""
        return packs(self.arch)

    def describe(self) -> str:
        """e.g. ``mlp(hidden=800x800, dropout=0)``."""
        def show(v: Any) -> str:
            return "x".join(map(str, v)) if isinstance(v, tuple | list) else f"{v:g}" if isinstance(v, float) else str(v)

        return f"{self.arch}({', '.join(f'{k}={show(v)}' for k, v in self.args)})" if self.args else self.arch


def model_spec(arch: str, **args: Any) -> ModelSpec:
    """A :class:`ModelSpec` of a registry family with its defaults filled in (what the YAML parser makes)."""
    family = FAMILIES[arch]
    full = {k: default for k, (_, default) in family.args.items()} | {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return ModelSpec(arch, tuple(sorted(full.items())))


AUGMENTATIONS = ("none", "shift", "crop_flip")
"""Training-time augmentations (``kd_tune.distill.augment``): none, random shifts (digits), random crops + flips (CIFAR)."""
MODEL_URI_SCHEMES = ("models:/", "runs:/")
PRETRAINED_ALLOWED = ("a kd-tune model or checkpoint file (student.pt, teacher.pt, state.pt), a teacher kd-tune cached "
                      "(<storage>/_teachers/<key>/teacher.pt, or that folder), a torch.export file (.pt2) or an MLflow model URI "
                      "(models:/..., runs:/...)")
CACHED_TEACHER = "teacher.pt"
"""The weights file in a cached teacher's folder (``kd_tune.sweep.teacher_cache.TeacherCache``)."""


def is_model_uri(source: str) -> bool:
    """An MLflow model URI rather than a file path."""
    return source.startswith(MODEL_URI_SCHEMES)


class _Modelled:
    """What a section that names a model (``model``: a :class:`ModelSpec`) says of it."""

    model: ModelSpec

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def arch_args(self) -> dict[str, Any]:
        return self.model.kwargs()

    @property
    def widths(self) -> tuple[int, ...]:
        """A ``cnn``'s filters (what the study's log lines show)."""
        return tuple(dict(self.model.args).get("widths", ()))


@dataclass(frozen=True)
class TeacherSpec(_Modelled):
    """The big network trained once (and cached), or loaded pre-trained, whose logits the students learn from."""

    model: ModelSpec = field(default_factory=lambda: model_spec("cnn", widths=(256, 512)))
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    ensemble: int = 1
    """Number of teachers (seeds seed, seed + 1, ...) whose logits are averaged; each is cached on its own."""
    ensemble_weights: tuple[float, ...] = ()
    """Each member's weight in the ensemble's logit average (normalized to sum 1); empty: equal weights. The members
    are the same networks whatever their weights (cached once), so ``grid.teacher`` entries that differ only here
    make the weights an axis of the sweep."""
    clean: bool = False
    """Train the teacher on the clean labels even when the students see noisy ones (label noise)."""
    augment: str = "none"
    """The teacher's training augmentation: ``none``, ``shift`` (random translations, for digits) or ``crop_flip``
    (random crops of the zero-padded image and horizontal flips, for CIFAR-shaped data). Part of the cache key."""
    augment_pad: int = 2
    """Pixels of the shift or of the crop's padding (2 for 28 x 28 digits, 4 for 32 x 32 CIFAR images)."""
    source: str | None = None
    """``teacher.from``: a pre-trained teacher instead of one trained here: a kd-tune model or checkpoint file, an MLflow
    model URI (``models:/...``, ``runs:/...``) or a ``torch.export`` file (``.pt2``). Its logits are cached by the file's digest."""

    def members(self) -> list[TeacherSpec]:
        """One single-teacher spec per member of the ensemble."""
        # `clean` only chooses which labels a member learns from (the sweep passes those in), so it
        # is no part of a member's identity: the clean teacher is the noise-free one, cached once.
        return [replace(self, seed=self.seed + i, ensemble=1, clean=False, ensemble_weights=()) for i in range(self.ensemble)]

    def weights(self) -> tuple[float, ...]:
        """The members' weights in the logit average, normalized to sum 1 (equal without ``ensemble_weights``)."""
        raw = self.ensemble_weights or (1.0,) * self.ensemble
        return tuple(w / sum(raw) for w in raw)


@dataclass(frozen=True)
class StudentSpec(_Modelled):
    """The small network every trial trains."""

    model: ModelSpec = field(default_factory=ModelSpec)
    lr: float = 1e-3
    batch_size: int = 128
    precision: str = "float32"
    """The training step's arithmetic: ``float32`` (the default; reproducible) or ``bfloat16`` (autocast: the forward's
    convolutions and matmuls, and so their gradients, in bfloat16; weights, Adam and every evaluation float32). Faster
    only where the hardware has bfloat16 units; results differ from float32 ones, so it is a param of every run."""
    augment: str = "none"
    """What the student's training batches go through: ``none`` (the default: the teacher's logits cached once, on the
    plain images), ``shift`` or ``crop_flip`` (as the teacher's ``augment``): then the teacher runs live, on each
    augmented batch (``kd_tune.distill.online``). Seeded by (seed, epoch): resume and epoch sharing stay exact."""
    augment_pad: int = 2
    """Pixels of the shift or of the crop's padding (default: 4 for images of 32 pixels or more, else 2)."""

    @property
    def online(self) -> bool:
        """Whether this student's teacher runs live (its batches are augmented)."""
        return self.augment != "none"


PRECISIONS = ("float32", "bfloat16")


def section_params(spec: Any) -> dict[str, Any]:
    """A section's values as flat params: a model's ``arch`` and its arguments in place of ``model``; a pre-trained
    teacher's ``from`` alone (nothing else of it applies)."""
    if isinstance(spec, TeacherSpec) and spec.source is not None:
        return {"from": spec.source}
    values = {f.name: getattr(spec, f.name) for f in fields(spec)}
    model = values.pop("model", None)
    if isinstance(values.get("source", ""), type(None)):
        values.pop("source")
    if model is None:
        return values
    return {"arch": model.arch, **dict(model.args), **values}
