"""Searches beyond the grid: the students' alpha and T sampled by Ray Tune, scratch baselines first, early stopping.

A search is one ``tune.Tuner`` (one experiment folder, so ``status``, ``report`` and ``resume`` treat it
like a grid) whose search algorithm is :class:`BaselinesFirst`: it hands out the sweep's fixed scratch
baselines (one per epochs value and seed, epoch-shared like a grid's) first, then ``num_samples``
students suggested by Optuna through Ray's ``OptunaSearch`` behind a ``ConcurrencyLimiter``:

- ``random``: Optuna's ``RandomSampler(seed)``, uniform / log-uniform over each range
  (``tune.uniform`` / ``tune.loguniform`` in the param space), a uniform choice over each list;
- ``optuna``: Optuna's ``TPESampler(seed)``, with the constant liar for trials still running
  (``max_concurrent`` > 1) and a few random start-up trials scaled to the budget.

Both go through ``OptunaSearch`` so that a seeded sampler and its whole state (the study, the RNG,
the trials still running) are saved with Tune's experiment state and come back with
``Tuner.restore``: a resumed search continues the same sequence of suggestions and its total stays
``num_samples``. Early stopping is Ray's ASHA on the search metric per epoch, for the searched
students only (:class:`StudentsASHA`): a baseline is never compared with them, nor stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from kd_tune.space.methods import METHODS
from kd_tune.space.schema import Axis, Range, SweepSpec
from kd_tune.space.trial_report import TrialReport
from kd_tune.space.trials import POINT, TrialConfig, TrialPoint, encode_point

MODE = "max"


def domain(axis: Axis | tuple[int, ...] | tuple[str, ...]) -> Any:
    """One axis of the search space in Ray Tune's terms: a range, a choice, or a fixed value."""
    if isinstance(axis, Range):
        return tune.loguniform(axis.low, axis.high) if axis.log else tune.uniform(axis.low, axis.high)
    return axis[0] if len(axis) == 1 else tune.choice(list(axis))


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The searched students' trial config: a :class:`~kd_tune.space.trials.TrialPoint` under ``point``, as a grid trial's.
    Empty with a ``grid.method`` axis: then the searcher's own :class:`MethodSpace` samples every value."""
    if spec.grid.method:
        return {}
    g = spec.grid
    return {POINT: {"role": "student", "alpha": domain(g.alpha), "temperature": domain(g.temperature), "epochs": domain(g.epochs),
                    "seed": domain(g.seed), "label_noise": spec.dataset.label_noise,
                    # the grid.student / grid.teacher axes, searched as categorical choices
                    "student": domain(g.student) if g.student else "", "teacher": domain(g.teacher) if g.teacher else ""}}


class MethodSpace:
    """Optuna's define-by-run space of a search over methods (``grid.method``): the method first, then the alpha and T
    axes and the knobs of that method alone (conditional parameters), then the shared axes; returns the trial's config.

    Parameters that every method shares keep one name (``alpha``, ``temperature``, ``epochs``, ...), so that Optuna
    learns across methods where the axis is the same; an entry's own alpha or T and its knobs are named after the entry
    (``dkd.nckd_weight``). A plain class, not a closure: OptunaSearch pickles it with its state for ``Tuner.restore``.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.grid, self.label_noise = spec.grid, spec.dataset.label_noise
        methods = [m.method for m in self.grid.method]
        self.names = [m if methods.count(m) == 1 else f"{m}.{methods[:i + 1].count(m)}" for i, m in enumerate(methods)]

    def __call__(self, trial: Any) -> dict[str, Any]:
        g = self.grid
        name = self.names[0] if len(self.names) == 1 else trial.suggest_categorical("method", self.names)
        entry = g.method[self.names.index(name)]
        alpha, temperature = entry.axes(g)
        point: dict[str, Any] = {
            "role": "student",
            "alpha": _suggest(trial, f"{name}.alpha" if entry.alpha is not None else "alpha", alpha),
            "temperature": _suggest(trial, f"{name}.temperature" if entry.temperature is not None else "temperature", temperature),
            "method": entry.method,
            "knobs": {knob: _suggest(trial, f"{name}.{knob}", axis, integer=METHODS[entry.method].knob(knob).kind == "int")
                      for knob, axis in entry.knobs},
            "epochs": _suggest(trial, "epochs", g.epochs), "seed": _suggest(trial, "seed", g.seed), "label_noise": self.label_noise,
            "student": _suggest(trial, "student", g.student) if g.student else "",
            "teacher": _suggest(trial, "teacher", g.teacher) if g.teacher else "",
        }
        # A knob that does not apply given the others (skew with forward_kl) was sampled for nothing: the point drops it.
        return {POINT: TrialPoint.from_config(point).as_config()}


def _suggest(trial: Any, name: str, axis: Any, integer: bool = False) -> Any:
    """One value of an axis from Optuna's trial: a range, a categorical choice, or (one value) the value itself."""
    if isinstance(axis, Range):
        if integer:
            return trial.suggest_int(name, int(axis.low), int(axis.high), log=axis.log)
        return trial.suggest_float(name, axis.low, axis.high, log=axis.log)
    return axis[0] if len(axis) == 1 else trial.suggest_categorical(name, list(axis))


def sampler(spec: SweepSpec) -> Any:
    """The seeded Optuna sampler of a search (the same file gives the same suggestions)."""
    import optuna

    s = spec.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    # Optuna's default of 10 random start-up trials would leave TPE little of a small budget.
    startup = max(3, min(10, s.num_samples // 3))
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup, constant_liar=s.max_concurrent > 1)


def make_searcher(spec: SweepSpec) -> BaselinesFirst:
    """The baselines, then ``num_samples`` students from OptunaSearch, at most ``max_concurrent`` of them unfinished."""
    from ray.tune.search.optuna import OptunaSearch  # imports optuna: only for a search

    inner = OptunaSearch(space=MethodSpace(spec) if spec.grid.method else None, metric=spec.search.metric, mode=MODE, sampler=sampler(spec))
    limited = ConcurrencyLimiter(inner, max_concurrent=spec.search.max_concurrent)
    return BaselinesFirst(limited, [encode_point(t) for t in spec.trials()])


def make_scheduler(spec: SweepSpec) -> TrialScheduler | None:
    """ASHA on the search metric, one step per epoch, up to the largest epochs value; None without a scheduler."""
    if spec.scheduler is None:
        return None
    return StudentsASHA(time_attr="epoch", metric=spec.search.metric, mode=MODE, max_t=max(spec.grid.epochs),
                        grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)


def tune_config(spec: SweepSpec, **kw: Any) -> tune.TuneConfig:
    """Tune's config for a search: its search algorithm, scheduler and total number of trials."""
    searcher = make_searcher(spec)
    return tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(spec), num_samples=len(searcher.baselines) + spec.search.num_samples,
                           **kw)


def is_baseline(config: Mapping[str, Any]) -> bool:
    return TrialConfig.decode(config).is_baseline


class BaselinesFirst(Searcher):
    """A Ray Tune searcher that first hands out fixed configurations (the scratch baselines), then
    delegates to ``searcher``; the baselines' results never reach it.

    Tune saves a searcher chain by walking ``.searcher`` (each wrapper's :meth:`get_state`, the base
    searcher's own file), so the baselines not handed out yet and the trials that got one come back
    with ``Tuner.restore`` together with Optuna's study.
    """

    def __init__(self, searcher: Searcher, baselines: list[dict[str, Any]]) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.baselines = list(baselines)
        self.pending = list(baselines)
        self.baseline_trials: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        return bool(self.searcher.set_search_properties(metric, mode, config, **spec))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.pending:
            self.baseline_trials.add(trial_id)
            return self.pending.pop(0)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self.baseline_trials and self.metric in result:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.baseline_trials:
            return
        if result is not None and TrialReport.decode(result).diverged:
            result, error = None, True  # diverged: a failed trial for the searcher, not a score
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:
        return {"baselines": list(self.baselines), "pending": list(self.pending), "baseline_trials": set(self.baseline_trials)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.baselines, self.pending, self.baseline_trials = list(state["baselines"]), list(state["pending"]), set(state["baseline_trials"])

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


class StudentsASHA(ASHAScheduler):
    """Ray's ASHA for the searched students only: the baselines train their epochs, outside the rungs."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not is_baseline(trial.config):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if is_baseline(trial.config) or trial.trial_id not in self._trial_info:
            return str(TrialScheduler.CONTINUE)
        return str(super().on_trial_result(tune_controller, trial, result))

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)


def describe(spec: SweepSpec) -> list[str]:
    """What ``kd-tune plan`` says of a search: the sampler, the budget, the ranges, the scheduler."""
    s, g = spec.search, spec.grid
    if spec.scheduler is not None and spec.scheduler.population:
        from kd_tune.sweep.population import describe as describe_population

        return describe_population(spec)

    def show(axis: Axis | tuple[int, ...] | tuple[str, ...]) -> str:
        if isinstance(axis, Range):
            return axis.show()
        values = [v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else f"{v:g}" for v in axis]
        if not values:
            return "(each method's own)"
        return "{" + ", ".join(values) + "}" if len(values) > 1 else values[0]

    how = "Optuna TPE" if s.algorithm == "optuna" else "uniform random sampling (Optuna's RandomSampler)"
    lines = [f"search: {s.algorithm} ({how}, seed {s.seed}), {s.num_samples} student trials, at most {s.max_concurrent} unfinished at once, "
             f"maximizing {s.metric}",
             f"  alpha {show(g.alpha)}, T {show(g.temperature)}, epochs {show(g.epochs)}, seed {show(g.seed)}"
             + (f", student {show(g.student)}" if g.student else "") + (f", teacher {show(g.teacher)}" if g.teacher else "")]
    for entry in g.method:
        own = [f"{k} {show(v)}" for k, v in (("alpha", entry.alpha), ("T", entry.temperature)) if v is not None]
        knobs = [f"{k} {show(v)}" for k, v in entry.knobs]
        lines.append(f"  method {entry.method}: " + (", ".join(own + knobs) or "its defaults") + " (sampled when this method is)")
    if spec.scheduler is None:
        lines.append("  scheduler: none (every trial trains its epochs)")
    else:
        sc = spec.scheduler
        lines.append(f"  scheduler: {sc.name} on {s.metric} per epoch, grace period {sc.grace_period}, reduction factor {sc.reduction_factor}, "
                     f"max {max(g.epochs)} epochs (students only; baselines are never stopped)")
    return lines
