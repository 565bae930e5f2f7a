"""The distillation methods a sweep can compare, and each one's own knobs: what ``grid.method`` selects from.

A method is a loss of the distill layer's registry (:mod:`kd_tune.distill.losses`, where each is a small pure function
with its formula and citation); this module holds what a search-space file may say of it, in plain Python (no torch),
so that a space is validated before anything starts. ``tests/test_losses.py`` checks that the two registries name the
same methods and knobs.

Every method shares two axes of the grid: ``alpha``, the weight of the hard-label cross-entropy, and ``temperature``.
What weights the distillation term is the method's: ``kd`` keeps Hinton's convex combination (``1 - alpha``, the
study's convention, so ``alpha = 1`` is training from scratch); ``dkd`` and ``dist`` weight their terms with their own
knobs, as their papers do (with ``alpha = 1``, their papers' cross-entropy weight, as the default a researcher starts
from). A trial's knobs are all the method's knobs that apply, defaults filled in (:func:`canonical_knobs`): what its
run's params and the report show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Knobs = tuple[tuple[str, Any], ...]
"""A trial's knob values, in the method's order: ``(("nckd_weight", 8.0), ("warmup", 20), ...)``."""


@dataclass(frozen=True)
class Knob:
    """One hyperparameter of a method."""

    name: str
    default: float | int | bool | str
    doc: str
    tag: str
    """What the knob adds to a trial's label when it is not the default (``nckd_weight: 2`` -> ``-nw2``)."""
    low: float = 0.0
    high: float = float("inf")
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    """A categorical knob's values (then ``choice_tags`` gives each one's label tag)."""
    choice_tags: tuple[str, ...] = ()
    applies: Callable[[Mapping[str, Any]], bool] | None = None
    """Whether the knob means anything given the others (``skew`` only with a skewed divergence); None: always."""

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        return type(self.default).__name__  # bool, int, float

    def allowed(self) -> str:
        """What the knob accepts, as an error message says it."""
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "bool":
            return "true or false"
        lo, hi = ("(" if self.lo_open else "[") + f"{self.low:g}", f"{self.high:g}" + (")" if self.hi_open else "]")
        return f"{'an integer' if self.kind == 'int' else 'a number'} in {lo}, {hi}"

    def tag_of(self, value: Any) -> str:
        """The label tag of a non-default value."""
        if self.kind == "choice":
            return self.choice_tags[self.choices.index(value)]
        if self.kind == "bool":
            return self.tag if value else f"no{self.tag}"
        return f"{self.tag}{value:g}"


@dataclass(frozen=True)
class Method:
    """A distillation method: its registered name, its knobs and where it comes from."""

    name: str
    citation: str
    knobs: tuple[Knob, ...]
    main_knob: str
    """The knob the report plots accuracy against (``temperature`` or ``alpha`` where the method's own matter less)."""
    distill_weight: str
    """How the distillation term is weighted, in words (for ``kd-tune plan`` and the docs)."""

    def knob(self, name: str) -> Knob:
        return next(k for k in self.knobs if k.name == name)

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)


STANDARDIZE = Knob("standardize", False, "z-score both logits over the classes before the temperature softmax (Sun et al., CVPR 2024, "
                   "'Logit Standardization in Knowledge Distillation'); the temperature is then their base temperature (2 in "
                   "their CIFAR-100 KD setting)", "ls")
DIVERGENCES = ("forward_kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl")
SKEWED = ("skew_kl", "skew_reverse_kl")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "kd", "Hinton, Vinyals & Dean (2015), 'Distilling the Knowledge in a Neural Network', arXiv:1503.02531",
            (
                Knob("divergence", "forward_kl",
                     "how the student's softened distribution is compared with the teacher's: forward_kl KL(p_t || p_s) (Hinton's), "
                     "reverse_kl KL(p_s || p_t) (MiniLLM, Gu et al., ICLR 2024), js (Jensen-Shannon), skew_kl KL(p_t || l p_t + "
                     "(1 - l) p_s) and skew_reverse_kl KL(p_s || l p_s + (1 - l) p_t) (DistiLLM, Ko et al., ICML 2024)",
                     "div", choices=DIVERGENCES, choice_tags=("fkl", "rkl", "js", "skl", "srkl")),
                Knob("skew", 0.1, "the skew l of skew_kl and skew_reverse_kl (DistiLLM's default 0.1)", "sk", low=0.0, high=1.0,
                     lo_open=True, hi_open=True, applies=lambda k: k.get("divergence") in SKEWED),
                STANDARDIZE,
            ),
            main_knob="temperature",
            distill_weight="1 - alpha (Hinton's convex combination: alpha = 1 is training from scratch)",
        ),
        Method(
            "dkd", "Zhao, Cui, Song, Qiu & Liang (2022), 'Decoupled Knowledge Distillation', CVPR 2022",
            (
                Knob("tckd_weight", 1.0, "the weight of the target-class term TCKD (the paper's alpha; its default 1.0)", "tw"),
                Knob("nckd_weight", 8.0, "the weight of the non-target-class term NCKD (the paper's beta; 8.0 in its CIFAR-100 "
                     "resnet32x4 -> resnet8x4 setting, the knob to tune per pair)", "nw"),
                Knob("warmup", 20, "epochs over which the distillation terms' weight ramps up linearly, min(epoch / warmup, 1) "
                     "(the paper's 20 of 240 epochs); 0 = none", "wu", high=10_000),
                STANDARDIZE,
            ),
            main_knob="nckd_weight",
            distill_weight="its own: min(epoch / warmup, 1) * (tckd_weight * TCKD + nckd_weight * NCKD)",
        ),
        Method(
            "dist", "Huang, You, Wang, Qian & Xu (2022), 'Knowledge Distillation from A Stronger Teacher', NeurIPS 2022",
            (
                Knob("inter_weight", 1.0, "the weight of the inter-class relation, 1 - Pearson(p_s, p_t) per image (the paper's beta: "
                     "1 on ImageNet, 2 on CIFAR-100)", "bw"),
                Knob("intra_weight", 1.0, "the weight of the intra-class relation, 1 - Pearson over the batch per class (the paper's "
                     "gamma: 1 on ImageNet, 2 on CIFAR-100)", "gw"),
            ),
            main_knob="intra_weight",
            distill_weight="its own: T^2 * (inter_weight * inter + intra_weight * intra)",
        ),
    )
}
DEFAULT_METHOD = "kd"
METHOD_KEYS = ("method", "alpha", "temperature")
"""The keys of a ``grid.method`` entry besides its method's knobs: its method, and its own alpha and T axes."""


def applicable(method: Method, values: Mapping[str, Any]) -> tuple[Knob, ...]:
    """The method's knobs that mean something given ``values`` (a knob's ``applies``)."""
    return tuple(k for k in method.knobs if k.applies is None or k.applies(values))


def canonical_knobs(method: str, given: Mapping[str, Any] | Knobs = ()) -> Knobs:
    """Every knob of ``method`` that applies, in the method's order: ``given``'s value, else the default."""
    m = METHODS[method]
    values = {k.name: k.default for k in m.knobs} | dict(given)
    return tuple((k.name, values[k.name]) for k in applicable(m, values))


def changed_knobs(method: str, knobs: Knobs) -> Knobs:
    """The knobs whose value is not the method's default (what a label and the results table show)."""
    m = METHODS[method]
    return tuple((name, v) for name, v in knobs if v != m.knob(name).default)


def method_label(method: str, knobs: Knobs) -> str:
    """The label part of a method and its knobs: ``""`` for ``kd`` with its defaults (labels of sweeps before methods
    were an axis stay as they were), else the method and each knob that is not its default, e.g. ``dkd-nw2-wu5-``."""
    m = METHODS[method]
    tags = [m.knob(name).tag_of(v) for name, v in changed_knobs(method, knobs)]
    if method == DEFAULT_METHOD and not tags:
        return ""
    return "-".join([method, *tags]) + "-"


def variant(method: str, knobs: Knobs) -> str:
    """The method as a report compares it: its name and its categorical knobs that are not the default
    (``kd``, ``kd+ls``, ``kd+reverse_kl``, ``dkd+ls``); the numeric knobs are what the report tunes within it."""
    m = METHODS[method]
    parts = [method]
    for name, v in knobs:
        k = m.knob(name)
        if k.kind == "choice" and v != k.default:
            parts.append(str(v))
        elif k.kind == "bool" and v != k.default:
            parts.append(k.tag if v else f"no{k.tag}")
    return "+".join(parts)


ALL_KNOBS: tuple[str, ...] = tuple(dict.fromkeys(k.name for m in METHODS.values() for k in m.knobs))
"""Every knob name of every method (a results table's knob columns, in this order)."""
