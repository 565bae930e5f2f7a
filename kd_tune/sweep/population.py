"""Population Based Training of alpha, T and a method's knobs: Ray Tune's ``PopulationBasedTraining`` and ``PB2``.

``scheduler: {name: pbt}`` (or ``pb2``) with ``search.algorithm: random`` trains a population of ``search.num_samples``
students, each started from a point drawn uniformly (seeded by ``search.seed``) from the grid's ranges or lists; every
``perturbation_interval`` epochs Ray's scheduler ranks them by the search metric, and a member in the bottom
``quantile_fraction`` continues from the checkpoint of one in the top (an exploit) with that member's values perturbed
(PBT: times 0.8 or 1.2, or resampled with ``resample_probability``; PB2: chosen by a GP bandit over the population's
progress). A population has no baselines: ``kd-tune replay`` trains the best member's schedule beside scratch students
of the same fresh seeds, which is the comparison that counts (:mod:`kd_tune.sweep.schedule_replay`).

What kd-tune adds to Ray's schedulers (:class:`PopulationMixin`):

- **A member keeps its identity.** Ray's exploit copies the donor's whole config; here only the mutable values (the
  ``pbt`` entry of the point, :data:`kd_tune.space.trials.MUTABLE`) are taken: the point itself (label, trial folder,
  MLflow params) stays the member's own, so params never change ("Changing param values is not allowed", ray#20473).
- **Values stay in their ranges.** PBT's perturbation multiplies by 1.2: alpha could leave [0, 1]. Values are clipped to
  the axis' range and rounded to 4 significant digits.
- **Fair clones.** A member clones a top member at its own epoch or beyond, never one behind it, nor at its last epoch.

The trainable records what it trains with per epoch (``epoch_alpha`` / ``epoch_T`` metrics) and, in each checkpoint,
its lineage (:mod:`kd_tune.space.lineage`): the exploits and the values of every epoch that shaped its weights.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.train._internal.session import _FutureTrainingResult
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from kd_tune.space.methods import METHODS
from kd_tune.space.schema import Axis, Range, SweepSpec
from kd_tune.space.trial_report import REPLAYED
from kd_tune.space.trials import MUTABLE, POINT, TrialConfig, TrialPoint

MODE = "max"  # as search.py's (which imports this module for its plan, so not imported from there)


def mutable_axes(spec: SweepSpec) -> dict[str, Axis]:
    """Each value the population mutates (``scheduler.mutate``) with its axis: alpha's and T's from the grid (or the one
    method entry's own), a knob's from that entry."""
    assert spec.scheduler is not None
    entry = spec.grid.methods()[0]
    alpha, temperature = entry.axes(spec.grid)
    axes: dict[str, Axis] = {"alpha": alpha, "temperature": temperature, **dict(entry.knobs)}
    return {name: axes[name] for name in spec.scheduler.mutate}


def _draw(rng: random.Random, axis: Axis) -> float:
    if isinstance(axis, Range):
        x = math.exp(rng.uniform(math.log(axis.low), math.log(axis.high))) if axis.log else rng.uniform(axis.low, axis.high)
        return _round(x)
    return axis[rng.randrange(len(axis))]


def _round(x: float) -> float:
    """4 significant digits: readable labels and params; PBT's steps of 20 % are far coarser."""
    return float(f"{x:.4g}")


def initial_population(spec: SweepSpec) -> list[TrialPoint]:
    """The population's first points: ``search.num_samples`` distinct draws (seeded by ``search.seed``), each with its
    mutable values under ``pbt``. Raises ValueError when the lists allow fewer distinct members."""
    g, s = spec.grid, spec.search
    rng = random.Random(s.seed)
    entry = g.methods()[0]
    alpha, temperature = entry.axes(g)
    points: dict[str, TrialPoint] = {}
    for _ in range(100 * s.num_samples):
        knobs = {k: (_draw(rng, v) if isinstance(v, Range) else v[rng.randrange(len(v))]) for k, v in entry.knobs}
        p = TrialPoint("student", _draw(rng, alpha), _draw(rng, temperature), g.epochs[rng.randrange(len(g.epochs))],
                       g.seed[rng.randrange(len(g.seed))], label_noise=spec.dataset.label_noise, method=entry.method, knobs=tuple(knobs.items()),
                       student=g.student[rng.randrange(len(g.student))] if g.student else "",
                       teacher=g.teacher[rng.randrange(len(g.teacher))] if g.teacher else "")
        points.setdefault(p.label, p)
        if len(points) == s.num_samples:
            break
    else:
        raise ValueError(f"the grid's lists give only {len(points)} distinct members for a population of {s.num_samples}")
    return list(points.values())


def member_config(point: TrialPoint, names: tuple[str, ...]) -> dict[str, Any]:
    """A member's point config with its mutable values (its own, to start with) under ``pbt``."""
    values = {"alpha": point.alpha, "temperature": point.temperature, **dict(point.knobs)}
    return {**point.as_config(), MUTABLE: {n: values[n] for n in names}}


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Every member as one grid-search value (fixed and seeded: a resumed or repeated sweep starts the same population)."""
    assert spec.scheduler is not None
    return {POINT: tune.grid_search([member_config(p, spec.scheduler.mutate) for p in initial_population(spec)])}


def _mutations(spec: SweepSpec) -> dict[str, Any]:
    """Ray's ``hyperparam_mutations`` (PBT: a distribution to resample from, or a list to step along) or ``hyperparam_bounds``
    (PB2: [low, high]), nested as the config is: ``{"point": {"pbt": {...}}}``."""
    assert spec.scheduler is not None
    out: dict[str, Any] = {}
    for name, axis in mutable_axes(spec).items():
        if spec.scheduler.name == "pb2":
            out[name] = [axis.low, axis.high] if isinstance(axis, Range) else [min(axis), max(axis)]
        elif isinstance(axis, Range):
            out[name] = tune.loguniform(axis.low, axis.high) if axis.log else tune.uniform(axis.low, axis.high)
        else:
            out[name] = list(axis)
    return {POINT: {MUTABLE: out}}


class Explore:
    """PBT's ``custom_explore_fn``: each perturbed value back into its axis' range, rounded (a plain class: Tune pickles it)."""

    def __init__(self, bounds: Mapping[str, tuple[float, float, bool]]) -> None:
        self.bounds = dict(bounds)
        """name -> (low, high, integer)."""

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        values = config[POINT][MUTABLE]
        for name, (low, high, integer) in self.bounds.items():
            if isinstance(values.get(name), int | float) and not isinstance(values[name], bool):
                x = min(high, max(low, float(values[name])))
                values[name] = int(round(x)) if integer else _round(x)
        return config


def _bounds(spec: SweepSpec) -> dict[str, tuple[float, float, bool]]:
    entry = spec.grid.methods()[0]
    out = {}
    for name, axis in mutable_axes(spec).items():
        low, high = (axis.low, axis.high) if isinstance(axis, Range) else (min(axis), max(axis))
        integer = name in METHODS[entry.method].knob_names and METHODS[entry.method].knob(name).kind == "int"
        out[name] = (float(low), float(high), integer)
    return out


class PopulationMixin:
    """Ray's PBT or PB2, for the population only (see the module's docstring)."""

    _trial_state: dict[Trial, Any]

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if result.get(REPLAYED):
            # A replayed epoch (re-reported after a restart) was trained before: exploiting on it would send the member
            # back to retrain what its run has recorded.
            return str(TrialScheduler.CONTINUE)
        return str(super().on_trial_result(tune_controller, trial, result))  # type: ignore[misc]

    def _exploit(self, tune_controller: Any, trial: Trial, trial_to_clone: Trial) -> None:
        # Async PBT ranks a member against donors that may not have trained as far: on a few CPUs the population takes
        # turns. Cloning a donor behind the member would send it back in time: it would train again epochs its run has
        # logged, and the run would then show the metrics of weights it no longer has. So the donor is one of the top
        # members at the member's epoch or beyond (Ray drew one at random from all of them); none such: no exploit.
        # Nor at a member's last epoch, where the clone would only replace the weights it ends with.
        at = int(self._trial_state[trial].last_train_time or 0)
        if at >= TrialConfig.decode(trial.config).epochs:
            return
        _, upper = self._quantiles()  # type: ignore[attr-defined]
        ahead = [t for t in upper if t is not trial and self._epoch(t) >= at and self._checkpoint_of(t) is not None]
        if not ahead:
            return
        donor = trial_to_clone if trial_to_clone in ahead else random.choice(ahead)
        super()._exploit(tune_controller, trial, donor)  # type: ignore[misc]

    def _checkpoint_of(self, trial: Trial) -> Any:
        """A top member's kept checkpoint, a save still under way resolved first (as Ray's own exploit does for the donor
        it drew: ``_checkpoint_or_exploit``); None when it has none."""
        state = self._trial_state[trial]
        if isinstance(state.last_checkpoint, _FutureTrainingResult):
            result = state.last_checkpoint.resolve()
            state.last_checkpoint, state.last_result = (result.checkpoint, result.metrics) if result else (None, state.last_result)
        return state.last_checkpoint

    def _epoch(self, trial: Trial) -> int:
        """The epoch of the member's last ranked result (what its kept checkpoint holds, or later)."""
        return int((self._trial_state[trial].last_result or {}).get("epoch", 0) or 0)

    def _get_new_config(self, trial: Trial, trial_to_clone: Trial) -> tuple[dict[str, Any], dict[str, Any]]:
        explored, operations = super()._get_new_config(trial, trial_to_clone)  # type: ignore[misc]
        own = copy.deepcopy(trial.config)
        own[POINT][MUTABLE] = explored[POINT][MUTABLE]  # the donor's values, explored; the member's own point
        return own, operations


class MembersPBT(PopulationMixin, PopulationBasedTraining):
    """Ray's PopulationBasedTraining for the population (:class:`PopulationMixin`)."""


class MembersPB2(PopulationMixin, PB2):
    """Ray's PB2 for the population (:class:`PopulationMixin`)."""


def make_scheduler(spec: SweepSpec) -> PopulationBasedTraining:
    """PBT or PB2 on the search metric, one step per epoch, perturbing every ``perturbation_interval`` epochs."""
    sc = spec.scheduler
    assert sc is not None
    # Asynchronous (Ray's default): synchronous PBT did not resume from a killed driver here (Ray 2.60: the restored
    # members stayed paused); _exploit keeps the clones fair instead.
    common: dict[str, Any] = {"time_attr": "epoch", "metric": spec.search.metric, "mode": MODE, "perturbation_interval": sc.perturbation_interval,
                              "quantile_fraction": sc.quantile_fraction, "custom_explore_fn": Explore(_bounds(spec))}
    if sc.name == "pb2":
        return MembersPB2(hyperparam_bounds=_mutations(spec), **common)
    return MembersPBT(hyperparam_mutations=_mutations(spec), resample_probability=sc.resample_probability, **common)


def tune_config(spec: SweepSpec, **kw: Any) -> tune.TuneConfig:
    """Tune's config for a population sweep: every trial fixed in the param space, the scheduler doing the rest."""
    return tune.TuneConfig(scheduler=make_scheduler(spec), num_samples=1, **kw)


def describe(spec: SweepSpec) -> list[str]:
    """What ``kd-tune plan`` says of a population sweep."""
    sc, s, g = spec.scheduler, spec.search, spec.grid
    assert sc is not None
    how = ("PBT: a bottom member clones a top one's checkpoint and perturbs its values by x0.8 / x1.2 (resampled with "
           f"probability {sc.resample_probability:g})") if sc.name == "pbt" else \
        "PB2: a bottom member clones a top one's checkpoint; its new values come from a GP bandit over the population's progress"
    axes = ", ".join(f"{n} {a.show() if isinstance(a, Range) else '{' + ', '.join(f'{v:g}' for v in a) + '}'}" for n, a in mutable_axes(spec).items())
    members = initial_population(spec)
    return [f"population: {s.num_samples} students ({sc.name}, first values drawn uniformly with seed {s.seed}), {max(g.epochs)} epochs each, "
            f"maximizing {s.metric}",
            f"  every {sc.perturbation_interval} epochs the bottom {sc.quantile_fraction:.0%} exploit the top {sc.quantile_fraction:.0%}: {how}",
            f"  mutating {axes} (clipped to those ranges); each member's alpha and T per epoch are metrics (epoch_alpha, epoch_T)",
            "  first members: " + ", ".join(p.label for p in members[:6]) + (", ..." if len(members) > 6 else ""),
            "  kd-tune replay SWEEP trains the best member's schedule again from scratch with fresh seeds"]
