"""Population Based Training in real sweeps (real Ray, real sqlite MLflow store, the CLI in a subprocess): what each member
trained with per epoch is a metric and its params never change, each exploit is recorded (a tag per exploit, the lineage
in ``schedule.json``), ``kd-tune replay`` trains the best member's schedule again exactly, and a SIGKILLed population
resumes with a clean record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kd_tune.space.lineage import Lineage
from kd_tune.tracking.tags import EPOCH_METRICS, SCHEDULE_ARTIFACT, TAG_EXPLOIT, TAG_ROLE

from .conftest import tiny_space
from .helpers import Sweep, kill_tree

pytestmark = pytest.mark.integration

EPOCHS = 6  # 5 decision points: a member's fair donor (one that has trained as far) comes at some of them
POPULATION = 4


def population_space(**overrides: Any) -> dict[str, Any]:
    space = tiny_space(name="study", search={"algorithm": "random", "num_samples": POPULATION, "seed": 0},
                       grid={"alpha": {"low": 0.0, "high": 1.0}, "temperature": {"low": 1.0, "high": 8.0}, "epochs": [EPOCHS], "seed": [0]},
                       scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.5})
    space.update(overrides)
    return space


def lineage_of(sweep: Sweep, run: Any) -> Lineage:
    path = sweep.client.download_artifacts(run.info.run_id, SCHEDULE_ARTIFACT, str(sweep.folder / "artifacts" / run.info.run_id))
    return Lineage.from_config(json.loads(Path(path).read_text()))


def history(sweep: Sweep, run: Any, metric: str) -> dict[int, float]:
    points = sweep.client.get_metric_history(run.info.run_id, metric)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), (metric, run.info.run_name, steps)  # each step once
    return {m.step: m.value for m in points}


def exploit_tags(run: Any) -> dict[int, str]:
    return {int(k.removeprefix(TAG_EXPLOIT)): v for k, v in run.data.tags.items() if k.startswith(TAG_EXPLOIT)}


def check_population(sweep: Sweep, name: str = "study") -> list[Any]:
    """Every member's record: params as drawn, metrics per epoch once each, exploits as tags matching the lineage, and
    after its last exploit the lineage's values are the run's own epoch_alpha / epoch_T. Returns the members' runs."""
    from kd_tune.space.parse import load_space_text
    from kd_tune.sweep.population import initial_population

    spec = load_space_text((sweep.storage / name / "kd_tune_space.yaml").read_text(), "stored")
    drawn = {p.label: p for p in initial_population(spec)}
    runs = sweep.child_runs(name)
    members = [r for r in runs if r.data.tags.get(TAG_ROLE) == "student"]
    assert sorted(r.info.run_name for r in members) == sorted(drawn)  # one run per member
    assert len(runs) == len(members)  # a population has no baselines (its replay does)
    for r in members:
        assert r.info.status == "FINISHED"
        p = drawn[r.info.run_name]
        assert (float(r.data.params["alpha"]), float(r.data.params["temperature"])) == (p.alpha, p.temperature)  # never changed
        for metric in EPOCH_METRICS:
            if metric not in ("teacher_agreement",):
                assert sorted(history(sweep, r, metric)) == list(range(1, EPOCHS + 1)), (metric, r.info.run_name)
        alpha, temperature = history(sweep, r, "epoch_alpha"), history(sweep, r, "epoch_T")
        assert (alpha[1], temperature[1]) == (p.alpha, p.temperature)  # a member starts with its own values
        lineage = lineage_of(sweep, r)
        assert [e for e, _, _ in lineage.epochs] == list(range(1, EPOCHS + 1))
        assert exploit_tags(r) == {x.epoch: x.text() for x in lineage.exploits}
        # the chain behind its final weights: each clone between two members, the last one its own
        assert all(x.donor in drawn and x.member in drawn and x.donor != x.member for x in lineage.exploits), (r.info.run_name, lineage.exploits)
        assert not lineage.exploits or lineage.exploits[-1].member == r.info.run_name
        last = max((x.epoch for x in lineage.exploits), default=0)
        assert [(e, a, t) for e, a, t in lineage.epochs if e > last] == [(e, alpha[e], temperature[e]) for e in range(last + 1, EPOCHS + 1)]
        if not lineage.exploits:
            assert lineage.epochs == tuple((e, alpha[e], temperature[e]) for e in range(1, EPOCHS + 1))
    return members


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    folder = tmp_path_factory.mktemp("pbt")
    import yaml

    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(population_space()))
    sweep = Sweep(folder, space)
    done = sweep.run("sweep", str(space))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep


def test_mutations_are_metrics_params_never_change_and_each_exploit_is_recorded(population: Sweep) -> None:
    members = check_population(population)
    exploited = [r for r in members if exploit_tags(r)]
    # 4 members, the bottom half exploiting the top half at each of 5 decisions: some member took another's weights.
    assert exploited, "no exploit in the population"
    for r in exploited:
        lineage = lineage_of(population, r)
        assert "; ".join(x.text() for x in lineage.exploits) == r.data.tags["kd_tune.lineage"]  # the chain in one line
        # the epochs up to its own (last) exploit are its donor's: that donor's run logged them, as the lineage says
        own = lineage.exploits[-1]
        donor = next(d for d in members if d.info.run_name == own.donor)
        donor_alpha = history(population, donor, "epoch_alpha")
        if not lineage_of(population, donor).exploits or max(x.epoch for x in lineage_of(population, donor).exploits) < own.epoch:
            inherited = [x for x in lineage.exploits[:-1]]
            if not inherited:
                assert [a for e, a, _ in lineage.epochs if e <= own.epoch] == [donor_alpha[e] for e in range(1, own.epoch + 1)]


def test_replay_trains_the_best_members_schedule_again_exactly(population: Sweep) -> None:
    members = check_population(population)
    best = min(members, key=lambda r: (-r.data.metrics["val_acc"], r.info.run_name))  # selected on validation (a tie: the first label)
    done = population.run("replay", "study", "--seeds", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"replaying {best.info.run_name} of sweep 'study'" in done.stdout + done.stderr
    lineage = lineage_of(population, best)
    runs = population.child_runs("study-replay")
    students = [r for r in runs if r.data.tags.get(TAG_ROLE) == "student"]
    assert sorted(int(r.data.params["seed"]) for r in students) == [1000, 1001]  # fresh seeds
    assert sorted(int(r.data.params["seed"]) for r in runs if r.data.tags.get(TAG_ROLE) == "scratch") == [1000, 1001]  # paired baselines
    for r in students:
        assert r.data.params["alpha_schedule"].startswith(f"table of {EPOCHS} epochs")
        alpha, temperature = history(population, r, "epoch_alpha"), history(population, r, "epoch_T")
        assert [(e, alpha[e], temperature[e]) for e in range(1, EPOCHS + 1)] == list(lineage.epochs)  # exactly the winner's schedule


@pytest.mark.slow
def test_a_killed_population_resumes_with_a_clean_record(write_space: Callable[..., Path], tmp_path: Path) -> None:
    # ~1 s per epoch, so that the kill lands while members train and exploit
    space = population_space(dataset={"name": "mnist", "train_size": 1800, "val_size": 200},
                             student={"widths": [16, 32], "lr": 0.003, "batch_size": 16},
                             # alpha alone mutates here (T stays each member's first: the rest of a member's point)
                             scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "mutate": ["alpha"]})
    sweep = Sweep(tmp_path, write_space(space))
    proc = sweep.start("sweep", str(sweep.space))

    def mid_population(*_: object) -> bool:
        """Checkpoints on disk (each member persists one per epoch): a third of the population's epochs, none finished."""
        done = [len(list(t.glob("checkpoint_*"))) for t in sweep.dir.glob("a*")]
        return sum(done) >= POPULATION * EPOCHS // 3 and bool(done) and max(done) < EPOCHS

    sweep.wait_until(proc, mid_population)
    kill_tree(proc)
    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{POPULATION}/{POPULATION} grid points finished" in done.stdout
    try:
        for r in check_population(sweep):
            # what it trained itself (after its own last clone; before, a donor ahead of it trained the epochs between)
            own = max((x.epoch for x in lineage_of(sweep, r).exploits), default=0)
            assert {t for e, t in history(sweep, r, "epoch_T").items() if e > own} == {float(r.data.params["temperature"])}
    except AssertionError:
        for t in sorted(sweep.dir.glob("a*")):  # what each member's checkpoints hold, to tell what went wrong
            import torch

            for c in sorted(t.glob("checkpoint_*")):
                st = torch.load(c / "state.pt", weights_only=True)
                print(t.name, c.name, st["epoch"], st.get("label"), st.get("hyper"), st.get("lineage", {}).get("exploits"))
        print(done.stdout[-5000:])
        raise
