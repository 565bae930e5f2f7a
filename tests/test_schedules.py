"""alpha and T that change during training: the schedules' values per epoch (worked out by hand), how grid files give them
and how epoch sharing treats them, training with them, a trial's lineage, and the population's scheduler (PBT, PB2) as
configured from a file. The sweeps themselves: test_population.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kd_tune.cli.app import main
from kd_tune.data import split as data_split
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.train import TensorData, make_optimizer, train, train_epoch
from kd_tune.errors import SpaceError
from kd_tune.space.lineage import Exploit, Lineage
from kd_tune.space.parse import parse_space, space_to_yaml
from kd_tune.space.schedules import Schedule, value_at
from kd_tune.space.trials import MUTABLE, POINT, TrialPoint

from .conftest import FIXTURE_DATA, tiny_space

# --- values per epoch ---------------------------------------------------------------------------------


def _values(s: Schedule, epochs: int) -> list[float]:
    return [s.at(e, epochs) for e in range(1, epochs + 1)]


@pytest.mark.parametrize(("schedule", "epochs", "expected"), [
    # linear over 5 epochs: start at the first, end at the fifth, then held
    (Schedule("linear", 0.0, 0.8, over=5), 6, [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]),
    # two warm-up epochs held at the start, then the same ramp
    (Schedule("linear", 0.0, 0.8, over=5, warmup=2), 8, [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 0.8]),
    # half a cosine from 1 to 0 over 3 epochs: (1 + cos(0)) / 2, (1 + cos(pi/2)) / 2, (1 + cos(pi)) / 2
    (Schedule("cosine", 1.0, 0.0, over=3), 3, [1.0, 0.5, 0.0]),
    # cosine from 8 to 2 over 5: 2 + 6 * (1 + cos(pi * p)) / 2 at p = 0, 1/4, 1/2, 3/4, 1
    (Schedule("cosine", 8.0, 2.0, over=5), 5, [8.0, 2 + 3 * (1 + math.sqrt(0.5)), 5.0, 2 + 3 * (1 - math.sqrt(0.5)), 2.0]),
    # 2 steps over 6 epochs: three plateaus of two epochs each
    (Schedule("step", 0.9, 0.3, over=6, steps=2), 6, [0.9, 0.9, 0.6, 0.6, 0.3, 0.3]),
    # without `over` the ramp spans the trial's epochs: a 3-epoch and a 5-epoch trial differ
    (Schedule("linear", 0.0, 0.8), 3, [0.0, 0.4, 0.8]),
    (Schedule("linear", 0.0, 0.8), 5, [0.0, 0.2, 0.4, 0.6, 0.8]),
    (Schedule("constant", 0.3), 3, [0.3, 0.3, 0.3]),
    # a table: one value per epoch, then its last
    (Schedule("table", 0.5, values=(0.5, 0.25, 0.75)), 5, [0.5, 0.25, 0.75, 0.75, 0.75]),
])
def test_a_schedules_value_at_each_epoch(schedule: Schedule, epochs: int, expected: list[float]) -> None:
    assert _values(schedule, epochs) == pytest.approx(expected, abs=1e-12)


def test_a_schedule_over_fixed_epochs_is_the_same_whatever_the_trials_length() -> None:
    shared = Schedule("cosine", 0.9, 0.1, over=4)
    assert shared.shareable and _values(shared, 10)[:3] == _values(shared, 3)
    spanning = Schedule("cosine", 0.9, 0.1)
    assert not spanning.shareable and _values(spanning, 10)[:3] != _values(spanning, 3)
    assert value_at(0.4, 7, 10) == 0.4 and value_at(shared, 4, 10) == pytest.approx(0.1)


def test_a_schedule_round_trips_and_names_itself() -> None:
    for s in (Schedule("linear", 0.0, 0.7, over=20, warmup=2), Schedule("step", 0.9, 0.1, steps=3), Schedule("table", 1.0, values=(1.0, 0.5))):
        assert Schedule.from_config(s.as_config()) == s
    assert Schedule("linear", 0.0, 0.7, over=20, warmup=2).tag() == "lin0to0.7o20w2"
    assert Schedule("linear", 0.0, 0.7, over=20, warmup=2).text() == "linear 0 -> 0.7 over 20 epochs after 2 warm-up epochs"
    assert Schedule("cosine", 8.0, 2.0).text() == "cosine 8 -> 2 over the trial's epochs"
    table = Schedule("table", 1.0, values=(1.0, 0.5))
    assert table.tag() == f"tbl{table.digest()}" and table.digest() != Schedule("table", 1.0, values=(1.0, 0.25)).digest()
    with pytest.raises(ValueError, match="needs an end value"):
        Schedule("linear", 0.0)


# --- in a grid file -----------------------------------------------------------------------------------


def _space(alpha: list[Any], temperature: list[Any] | None = None, **grid: Any) -> dict[str, Any]:
    return tiny_space(grid={"alpha": alpha, "temperature": temperature or [3.0], "epochs": [2, 4], "seed": [0], **grid},
                      baselines=["scratch"])


def test_schedules_are_values_of_the_alpha_and_temperature_axes() -> None:
    spec = parse_space(_space([0.5, {"shape": "linear", "start": 0.0, "end": 0.7, "over": 4}, {"shape": "cosine", "start": 0.9, "end": 0.1}],
                              [3.0, {"shape": "step", "start": 8.0, "end": 2.0, "steps": 1, "over": 2}]), "s.yaml")
    labels = {t.label: t.milestones for t in spec.trials()}
    # A schedule over fixed epochs is shared like a constant; one over each trial's epochs is a trial per epochs value.
    assert labels == {
        "a0.5-T3-e2+4-s0": (2, 4), "a0.5-Tstep8to2k1o2-e2+4-s0": (2, 4),
        "alin0to0.7o4-T3-e2+4-s0": (2, 4), "alin0to0.7o4-Tstep8to2k1o2-e2+4-s0": (2, 4),
        "acos0.9to0.1-T3-e2-s0": (2,), "acos0.9to0.1-T3-e4-s0": (4,),
        "acos0.9to0.1-Tstep8to2k1o2-e2-s0": (2,), "acos0.9to0.1-Tstep8to2k1o2-e4-s0": (4,),
        "scratch-e2+4-s0": (2, 4),
    }
    scheduled = next(t for t in spec.trials() if t.label.startswith("alin"))
    assert scheduled.alpha == 0.0 and scheduled.alpha_schedule == Schedule("linear", 0.0, 0.7, over=4) and scheduled.scheduled
    # its MLflow params: alpha (the start) and the schedule as one line; a constant point's params are as before
    assert scheduled.grid_config()["alpha_schedule"] == "linear 0 -> 0.7 over 4 epochs"
    assert "alpha_schedule" not in next(t for t in spec.trials() if t.label.startswith("a0.5-T3")).grid_config()
    assert TrialPoint.from_config(scheduled.as_config()) == scheduled
    # alpha 1 is the scratch student only as a constant
    assert spec.repeated_trainings() == []
    # stored beside the sweep and read back for a resume
    import yaml

    assert parse_space(yaml.safe_load(space_to_yaml(spec)), "stored").grid == spec.grid


@pytest.mark.parametrize(("alpha", "key", "allowed"), [
    ([{"shape": "linear", "start": 0.0}], "grid.alpha[0].end", "required for a linear schedule"),
    ([{"shape": "linear", "start": 0.0, "end": 1.5}], "grid.alpha[0].end", "a number in [0, 1]"),
    ([0.5, {"shape": "spiral", "start": 0.0, "end": 1.0}], "grid.alpha[1].shape", "one of constant, linear, cosine, step, table"),
    ([{"shape": "linear", "start": 0.0, "end": 1.0, "over": 0}], "grid.alpha[0].over", "an integer >= 1"),
    ([{"shape": "cosine", "start": 0.0, "end": 1.0, "steps": 2}], "grid.alpha[0].steps", "a key of a cosine schedule"),
    ([{"shape": "step", "start": 0.0, "end": 1.0, "steps": 4, "over": 4}], "grid.alpha[0].steps", "fewer steps than the ramp's 4 epochs"),
    ([{"shape": "table", "values": [0.5, 2.0]}], "grid.alpha[0].values[1]", "a number in [0, 1]"),
])
def test_a_bad_schedule_gets_one_line_naming_its_key(alpha: list[Any], key: str, allowed: str) -> None:
    with pytest.raises(SpaceError) as e:
        parse_space(_space(alpha), "s.yaml")
    assert e.value.key == key and allowed in str(e.value) and "\n" not in str(e.value)


def test_a_schedule_needs_a_grid() -> None:
    space = tiny_space(search={"algorithm": "random", "num_samples": 2}, grid={"alpha": [0.5, {"shape": "linear", "start": 0.0, "end": 1.0}],
                                                                               "epochs": [2]})
    with pytest.raises(SpaceError, match="schedules are grid values"):
        parse_space(space, "s.yaml")


# --- training with a schedule ---------------------------------------------------------------------------


def test_training_with_a_schedule_is_training_each_epoch_with_its_value() -> None:
    split = data_split.prepare("mnist", 300, 0.0, 0, FIXTURE_DATA)
    teacher = torch.randn(split.train_x.shape[0], 10, generator=torch.Generator().manual_seed(0)) * 3
    data = TensorData.from_split(split, "cpu", teacher, None)
    scheduled = build_cnn((4, 8), split.info.shape, 10, 0)
    train(scheduled, make_optimizer(scheduled, 3e-3), data, epochs=3, batch_size=64, seed=0,
          alpha=Schedule("linear", 0.0, 0.7, over=3), temperature=Schedule("step", 6.0, 2.0, over=3, steps=1))
    by_hand = build_cnn((4, 8), split.info.shape, 10, 0)
    optimizer = make_optimizer(by_hand, 3e-3)
    # linear: 0, 0.7 / 2, 0.7; one step over 3 epochs: p = 0, 1/2, 1 and plateaus of 1.5 epochs, the second from p = 1/2
    for epoch, (alpha, temperature) in enumerate([(0.0, 6.0), (0.35, 2.0), (0.7, 2.0)], start=1):
        train_epoch(by_hand, optimizer, data, epoch, 64, 0, alpha, temperature)
    for a, b in zip(scheduled.state_dict().values(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- lineage --------------------------------------------------------------------------------------------


def test_a_lineage_records_each_epoch_and_each_exploit() -> None:
    donor = Lineage().trained(1, 0.5, 4.0).trained(2, 0.5, 4.0)
    member = donor.exploited(Exploit(2, "a0.5-T4-e4-s0", "t1", "a0.9-T2-e4-s0")).trained(3, 0.6, 3.2).trained(4, 0.6, 3.2)
    assert member.exploits[0].text() == "epoch 2: a0.9-T2-e4-s0 cloned a0.5-T4-e4-s0"
    assert member.epochs == ((1, 0.5, 4.0), (2, 0.5, 4.0), (3, 0.6, 3.2), (4, 0.6, 3.2))
    assert Lineage.from_config(member.as_config()) == member
    alpha, temperature = member.schedules()
    assert _values(alpha, 4) == [0.5, 0.5, 0.6, 0.6] and _values(temperature, 4) == [4.0, 4.0, 3.2, 3.2]
    # an epoch trained again (a restart recomputes it) replaces its entry
    assert member.trained(3, 0.7, 3.0).epochs[2:] == ((3, 0.7, 3.0),)


# --- the population's scheduler, from a file ----------------------------------------------------------


def pbt_space(**scheduler: Any) -> dict[str, Any]:
    return tiny_space(search={"algorithm": "random", "num_samples": 4, "seed": 0},
                      grid={"alpha": {"low": 0.0, "high": 1.0}, "temperature": {"low": 1.0, "high": 8.0}, "epochs": [4], "seed": [0]},
                      scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, **scheduler})


def test_a_population_from_a_file() -> None:
    from kd_tune.sweep.population import Explore, initial_population, make_scheduler, param_space

    spec = parse_space(pbt_space(), "p.yaml")
    assert spec.scheduler is not None and spec.scheduler.population and spec.scheduler.mutate == ("alpha", "temperature")
    members = initial_population(spec)
    assert members == initial_population(spec)  # seeded
    assert len({m.label for m in members}) == 4 and all(0 <= m.alpha <= 1 and 1 <= (m.temperature or 0) <= 8 for m in members)
    configs = param_space(spec)[POINT]["grid_search"]
    assert [c["role"] for c in configs] == ["student"] * 4
    assert all(c[MUTABLE] == {"alpha": c["alpha"], "temperature": c["temperature"]} for c in configs)  # each starts with its own
    # Ray's exploit would copy the donor's whole config: the member keeps its own point, with the donor's values explored
    scheduler = make_scheduler(spec)
    own, donor = {POINT: configs[0]}, {POINT: configs[1]}
    new, _ = scheduler._get_new_config(SimpleNamespace(config=own), SimpleNamespace(config=donor))  # type: ignore[arg-type]
    assert {k: v for k, v in new[POINT].items() if k != MUTABLE} == {k: v for k, v in configs[0].items() if k != MUTABLE}
    assert 0 <= new[POINT][MUTABLE]["alpha"] <= 1 and 1 <= new[POINT][MUTABLE]["temperature"] <= 8
    # PBT's x1.2 would leave [0, 1]: explored values are clipped into their axis and rounded
    explore = Explore({"alpha": (0.0, 1.0, False), "temperature": (1.0, 8.0, False)})
    assert explore({POINT: {MUTABLE: {"alpha": 1.14, "temperature": 3.123456}}})[POINT][MUTABLE] == {"alpha": 1.0, "temperature": 3.123}
    assert spec.flat_params()["scheduler.perturbation_interval"] == 1 and "scheduler.grace_period" not in spec.flat_params()


@pytest.mark.parametrize(("change", "key", "allowed"), [
    ({"search": {"algorithm": "optuna", "num_samples": 4}}, "search.algorithm", "random with scheduler pbt"),
    ({"search": {"algorithm": "random", "num_samples": 1}}, "search.num_samples", "at least 2 with scheduler pbt"),
    ({"grid": {"alpha": {"low": 0.0, "high": 1.0}, "epochs": [2, 4]}}, "grid.epochs", "one value with scheduler pbt"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 4}}, "scheduler.perturbation_interval", "an integer in [1, 3]"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.6}}, "scheduler.quantile_fraction", "a number in (0, 0.5]"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 1, "mutate": ["lr"]}}, "scheduler.mutate[0]", "one of alpha, temperature"),
    ({"grid": {"alpha": {"low": 0.0, "high": 1.0}, "temperature": [4.0], "epochs": [4]},
      "scheduler": {"name": "pbt", "perturbation_interval": 1, "mutate": ["temperature"]}}, "scheduler.mutate[0]", "a range {low, high} or several"),
    ({"scheduler": {"name": "pb2", "perturbation_interval": 1, "resample_probability": 0.5}}, "scheduler.resample_probability", "known keys"),
    ({"baselines": ["scratch"]}, "baselines", "none with scheduler pbt (a population is its members alone"),
])
def test_a_bad_population_gets_one_line_naming_its_key(change: dict[str, Any], key: str, allowed: str) -> None:
    space = pbt_space()
    space.update(change)
    with pytest.raises(SpaceError) as e:
        parse_space(space, "p.yaml")
    assert e.value.key == key and allowed in str(e.value)


def test_plan_says_what_a_population_will_run(write_space: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(write_space(pbt_space()))]) == 0
    out = capsys.readouterr().out
    assert "population: 4 students (pbt, first values drawn uniformly with seed 0), 4 epochs each" in out
    assert "every 1 epochs the bottom 50% exploit the top 50%" in out and "mutating alpha [0, 1], temperature [1, 8]" in out
    assert "as the scheduler stops trials" not in out  # PBT stops no trial: every member trains its epochs


def test_a_report_keeps_a_schedule_apart_from_the_constant_it_starts_at() -> None:
    """alpha 0.1 and a schedule from 0.1 share the param alpha: their knobs key (what every grouping keys on) differs."""
    import pandas as pd

    from kd_tune.report.configs import config_label, method_columns

    params = pd.DataFrame({"method": ["kd", "kd", "kd", "kd"], "role": ["student"] * 3 + ["scratch"],
                           "alpha_schedule": [None, "linear 0.1 -> 0.7 over 10 epochs", None, None],
                           "scheduler.name": [None, None, "pbt", "pbt"]})
    columns = method_columns(params)
    assert columns["knobs"].tolist() == [
        "divergence=forward_kl, standardize=False",
        "divergence=forward_kl, standardize=False, alpha_schedule=linear 0.1 -> 0.7 over 10 epochs",
        "divergence=forward_kl, standardize=False, population=pbt",
        "divergence=forward_kl, standardize=False",  # a population sweep's scratch baseline is plain scratch
    ]
    assert config_label("kd", columns["knobs"][1]) == "kd alpha linear 0.1 -> 0.7 over 10 epochs"
    assert config_label("kd", columns["knobs"][2]) == "kd (pbt)"
    table = Schedule("table", 0.5, values=(0.5, 0.25))
    assert "," not in table.text()  # a knobs key splits on ", "
