"""``kd-tune replay SWEEP``: a population sweep's best schedule, trained again from scratch with fresh seeds.

PBT's winner owes its accuracy to its schedule *and* to the luck of the population (the weights it cloned were the best
of several draws). Replaying the winner's alpha and T of every epoch as a fixed schedule (``table`` schedules,
:mod:`kd_tune.space.schedules`) with seeds the population never used, beside the sweep's scratch baselines of the same
seeds, tells the two apart (ray#9178: the winning schedule is otherwise hard to reproduce).

The member is selected on validation (its last epoch's ``val_acc``; ``test_acc`` where the sweep has no validation
split), from the newest checkpoint of each member in the sweep's storage, whose lineage (:mod:`kd_tune.space.lineage`)
holds the values of every epoch that trained its final weights, inherited through each exploit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kd_tune.errors import UsageError
from kd_tune.space.lineage import Lineage
from kd_tune.space.schema import MethodEntry, SearchSpec, SweepSpec
from kd_tune.space.trials import TrialConfig, TrialPoint
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.trial_state import newest_persisted

FRESH_SEED = 1000
"""Replays use seeds from here on (above the population's): a member's seed is never reused."""


@dataclass(frozen=True)
class Member:
    """A population member as its newest checkpoint left it."""

    label: str
    folder: str
    epoch: int
    score: float
    """Its selection metric at its last epoch (``metric``)."""
    metric: str
    lineage: Lineage


def members(storage: Storage, sweep: str) -> list[Member]:
    """Every member of a population sweep with a lineage in its newest checkpoint, best first (selected on validation; a tie:
    the first label)."""
    out = []
    for folder in storage.list_dirs(sweep):
        state = newest_persisted(storage, f"{sweep}/{folder}")
        if state is None or not state.get("history") or not (lineage := Lineage.from_config(state.get("lineage"))).epochs:
            continue  # a baseline, or a member before its first epoch
        last = state["history"][-1]
        metric = "val_acc" if "val_acc" in last else "test_acc"
        out.append(Member(str(state.get("label", folder)), folder, int(state["epoch"]), float(last[metric]), metric, lineage))
    return sorted(out, key=lambda m: (-m.score, m.label))


def replay_spec(spec: SweepSpec, storage: Storage, sweep: str, *, member: str | None = None, seeds: int | list[int] = 3,
                name: str | None = None) -> tuple[SweepSpec, Member]:
    """The grid sweep that replays ``member`` (default: the best, selected on validation) of the population sweep ``sweep``:
    its alpha and T of every epoch as table schedules, each of ``seeds`` (a count of fresh seeds, or the seeds), beside
    scratch students of those seeds (the paired baseline). Raises UsageError for a sweep without a population, an unknown member, or mutated knobs."""
    if spec.scheduler is None or not spec.scheduler.population:
        raise UsageError(f"sweep {sweep!r} has no population to replay (its scheduler is {spec.scheduler.name if spec.scheduler else 'none'}; "
                         "replay needs scheduler pbt or pb2)")
    found = members(storage, sweep)
    if not found:
        raise UsageError(f"sweep {sweep!r} has no member checkpoint with a lineage yet (run or resume it first)")
    if member is not None:
        matches = [m for m in found if m.label == member]
        if not matches:
            raise UsageError(f"--member {member!r}: not a member of sweep {sweep!r}; its members: {', '.join(m.label for m in found)}")
        chosen = matches[0]
    else:
        chosen = found[0]
    if chosen.lineage.knobs:
        raise UsageError(f"member {chosen.label} changed the knobs {sorted({k for _, ks in chosen.lineage.knobs for k, _ in ks})} during "
                         "training: a replay fixes alpha and T only (mutate alpha and temperature to replay)")
    if chosen.epoch < max(spec.grid.epochs):
        raise UsageError(f"member {chosen.label} has trained {chosen.epoch} of its {max(spec.grid.epochs)} epochs: resume sweep {sweep!r} first")
    seed_list = list(range(FRESH_SEED + max(spec.grid.seed), FRESH_SEED + max(spec.grid.seed) + seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise UsageError("--seeds: at least one seed")
    alpha, temperature = chosen.lineage.schedules()
    point = _point_of(spec, storage, sweep, chosen)
    grid = replace(spec.grid, alpha=(), temperature=(), alpha_schedules=(alpha,), temperature_schedules=(temperature,), epochs=(chosen.epoch,),
                   seed=tuple(seed_list), student=(point.student,) if spec.grid.student else (), teacher=(point.teacher,) if spec.grid.teacher else (),
                   method=(MethodEntry(point.method, tuple((k, (v,)) for k, v in point.knobs)),) if spec.grid.method else ())
    out = replace(spec, name=name or f"{spec.name}-replay", grid=grid, search=SearchSpec(), scheduler=None, baselines=("scratch",),
                  student_variants=tuple((n, s) for n, s in spec.student_variants if n == point.student),
                  teacher_variants=tuple((n, t) for n, t in spec.teacher_variants if n == point.teacher))
    return out, chosen


def _point_of(spec: SweepSpec, storage: Storage, sweep: str, member: Member) -> TrialPoint:
    """The member's point (its student, teacher, method and knobs), from the trial's params file that Tune wrote."""
    import json

    params = json.loads(storage.read_text(f"{sweep}/{member.folder}", "params.json"))
    return TrialConfig.decode(params).point
