"""Searches beyond the grid: the keys and their bad values, seeded suggestions, ASHA in a real sweep, kill and resume."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_tune.cli.app import main
from kd_tune.errors import SpaceError
from kd_tune.space.parse import parse_space, space_to_yaml
from kd_tune.space.schema import Range
from kd_tune.sweep.state.storage import resolve_storage

from .conftest import DELETE, FIXTURE_DATA, tiny_space, with_key


def search_space(**overrides: Any) -> dict[str, Any]:
    """A valid optuna search over alpha and T with ASHA, tiny models."""
    space = tiny_space(
        search={"algorithm": "optuna", "num_samples": 6, "metric": "val_acc", "max_concurrent": 2, "seed": 0},
        grid={"alpha": {"low": 0.0, "high": 1.0}, "temperature": {"low": 1.0, "high": 20.0, "log": True}, "epochs": [4], "seed": [0]},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        baselines=["scratch"],
    )
    space.update(overrides)
    return space


def test_search_keys_parse_and_round_trip() -> None:
    spec = parse_space(search_space(), "s.yaml")
    assert spec.is_search and spec.search.num_samples == 6 and spec.search.metric == "val_acc"
    assert spec.grid.alpha == Range(0.0, 1.0) and spec.grid.temperature == Range(1.0, 20.0, log=True)
    assert spec.scheduler is not None and (spec.scheduler.grace_period, spec.scheduler.reduction_factor) == (1, 2)
    assert [t.label for t in spec.trials()] == ["scratch-e4-s0"]  # the baselines; the students are sampled
    assert spec.planned_rows() == 7 and spec.student_epochs() == 4 + 6 * 4
    assert parse_space(yaml.safe_load(space_to_yaml(spec)), "stored") == spec
    # Lists stay allowed (a categorical choice); without a validation split the metric is test_acc.
    listed = parse_space(search_space(grid={"alpha": [0.1, 0.9], "epochs": [2, 4]}, dataset={"name": "mnist", "train_size": 1000, "val_size": 0},
                                      search={"algorithm": "random", "num_samples": 3}), "l.yaml")
    assert listed.grid.alpha == (0.1, 0.9) and listed.search.metric == "test_acc" and listed.search.max_concurrent == 4
    grid = parse_space(tiny_space(), "g.yaml")
    assert not grid.is_search and grid.scheduler is None and "search.algorithm" not in grid.flat_params()


GRID = tiny_space()

BAD = [
    # (space, key to change, value, key named in the error, words of the allowed values)
    (GRID, "search", {"algorithm": "bayes"}, "search.algorithm", "one of grid, random, optuna"),
    (GRID, "search", {"algorithm": "grid", "num_samples": 5}, "search.num_samples", "only with search.algorithm random or optuna"),
    (GRID, "search", {"algorithm": "optuna", "bogus": 1}, "search.bogus", "known keys of 'search'"),
    (GRID, "search", [1], "search", "a mapping"),
    (GRID, "grid.alpha", {"low": 0.0, "high": 1.0}, "grid.alpha", "a range {low, high} needs search.algorithm random or optuna"),
    (GRID, "scheduler", {"name": "asha"}, "scheduler", "no scheduler with search.algorithm grid"),
    (search_space(), "search.num_samples", DELETE, "search.num_samples", "required with search.algorithm optuna"),
    (search_space(), "search.num_samples", 0, "search.num_samples", "an integer in [1, 10000]"),
    (search_space(), "search.num_samples", 2.5, "search.num_samples", "an integer in [1, 10000]"),
    (search_space(), "search.metric", "val_loss", "search.metric", "one of val_acc, test_acc"),
    (search_space(), "search.metric", "test_acc", "search.metric", "val_acc (a validation split exists"),
    (search_space(), "search.max_concurrent", 0, "search.max_concurrent", "an integer in [1, 1024]"),
    (search_space(), "search.seed", -1, "search.seed", "an integer in [0, 4294967295]"),
    (search_space(), "search.seed", "zero", "search.seed", "an integer in [0, 4294967295]"),
    (search_space(), "grid.alpha", {"low": 0.0, "high": 1.5}, "grid.alpha.high", "a number in [0, 1]"),
    (search_space(), "grid.alpha", {"low": 0.5, "high": 0.5}, "grid.alpha.high", "a number above grid.alpha.low (0.5)"),
    (search_space(), "grid.alpha", {"low": 0.0, "high": 1.0, "log": True}, "grid.alpha.low", "a number in (0, 1]"),
    (search_space(), "grid.alpha", {"low": 0.2}, "grid.alpha.high", "required"),
    (search_space(), "grid.alpha", {"low": 0.2, "high": 0.4, "step": 0.1}, "grid.alpha.step", "known keys of 'grid.alpha': low, high, log"),
    (search_space(), "grid.temperature", {"low": 0.0, "high": 20.0}, "grid.temperature.low", "a number in (0, inf]"),
    (search_space(), "grid.temperature", {"low": 1.0, "high": 20.0, "log": "yes"}, "grid.temperature.log", "true (sample log-uniformly)"),
    (search_space(), "grid.label_noise", [0.0, 0.2], "grid.label_noise", "no label-noise axis with search.algorithm optuna"),
    (search_space(), "grid", {"alpha": [0.5], "epochs": [4]}, "grid", "at least one of grid.alpha, grid.temperature"),
    (search_space(), "scheduler.name", "hyperband", "scheduler.name", "one of asha"),
    (search_space(), "scheduler.grace_period", 4, "scheduler.grace_period", "an integer in [1, 3]"),
    (search_space(), "scheduler.grace_period", 0, "scheduler.grace_period", "an integer in [1, 3]"),
    (search_space(), "scheduler.reduction_factor", 1, "scheduler.reduction_factor", "an integer in [2, 100]"),
    (search_space(), "scheduler.bogus", 1, "scheduler.bogus", "known keys of 'scheduler'"),
    (search_space(), "grid.epochs", [1], "scheduler", "too short to stop a trial early"),
]


@pytest.mark.parametrize("space,key,value,named,allowed", BAD, ids=[f"{b[1]}={b[2]!r}" for b in BAD])
def test_bad_search_values_name_file_key_value_and_allowed(space: dict[str, Any], key: str, value: Any, named: str, allowed: str) -> None:
    with pytest.raises(SpaceError) as err:
        parse_space(with_key(space, key, value), "spaces/bad.yaml")
    msg = str(err.value)
    assert msg.startswith("spaces/bad.yaml: ") and f"key '{named}'" in msg and allowed in msg and "\n" not in msg, msg


def test_cli_refuses_a_bad_search_key_with_one_line_and_writes_nothing(write_space: Callable[..., Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    bad = write_space(with_key(search_space(), "scheduler.grace_period", 9), "bad.yaml")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["sweep", str(bad), "--storage", str(tmp_path / "store"), "--data-dir", str(FIXTURE_DATA)], ["plan", str(bad)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "key 'scheduler.grace_period': bad value 9; allowed: an integer in [1, 3]" in err[0]  # the error: one line
        assert err[1:] == [f"(see 'kd-tune {args[0]} --help')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no storage folder, no mlflow.db


def test_plan_describes_a_search(write_space: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(write_space(search_space()))]) == 0
    out = capsys.readouterr().out
    assert "a search: 6 student trials sampled by Ray Tune, plus 1 baseline trials" in out
    assert "alpha [0, 1], T [1, 20] log, epochs 4, seed 0" in out
    assert "scheduler: asha on val_acc per epoch, grace period 1, reduction factor 2, max 4 epochs" in out
    assert "student epochs: at most 28" in out


def _suggestions(space: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Drive the sweep's own searcher as Tune would: suggest while it gives configs, complete the oldest
    trial with a score that depends on its config (the searcher's whole input), until n trials."""
    from kd_tune.sweep import search

    spec = parse_space(space, "s.yaml")
    searcher = search.make_searcher(spec)
    assert searcher.set_search_properties(None, None, search.param_space(spec))
    out: list[dict[str, Any]] = []
    live: list[tuple[str, dict[str, Any]]] = []
    while len(out) < n:
        config = searcher.suggest(f"t{len(out)}")
        if config is None:  # the concurrency limit: finish the oldest trial first
            tid, c = live.pop(0)
            p = c["point"]
            score = 1.0 - (p["alpha"] - 0.3) ** 2 - 0.01 * (p["temperature"] - 4.0) ** 2 if p["role"] == "student" else 0.5
            searcher.on_trial_complete(tid, {"val_acc": score, "epoch": 4, "training_iteration": 4})
            continue
        config = {"point": {"role": "student", **config["point"]}}  # what Tune merges in from the param space
        live.append((f"t{len(out)}", config))
        out.append(config)
    return out


def test_seeded_optuna_search_gives_the_same_suggestions_twice() -> None:
    space = search_space(search={"algorithm": "optuna", "num_samples": 14, "max_concurrent": 2, "seed": 7})
    first, second = _suggestions(space, 15), _suggestions(space, 15)
    assert first[0]["point"]["role"] == "scratch" and all(c["point"]["role"] == "student" for c in first[1:])  # baselines first
    assert first == second
    assert len({c["point"]["alpha"] for c in first[1:]}) == 14  # continuous: 14 distinct alphas
    other = _suggestions({**space, "search": {**space["search"], "seed": 8}}, 15)
    assert [c["point"]["alpha"] for c in other[1:]] != [c["point"]["alpha"] for c in first[1:]]
    random = _suggestions({**space, "search": {**space["search"], "algorithm": "random"}}, 15)
    assert random == _suggestions({**space, "search": {**space["search"], "algorithm": "random"}}, 15)
    for c in first[1:] + random[1:]:
        assert 0.0 <= c["point"]["alpha"] <= 1.0 and 1.0 <= c["point"]["temperature"] <= 20.0


@pytest.mark.integration
def test_asha_stops_trials_and_their_runs_are_tagged(write_space: Callable[..., Path], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from kd_tune.report.report import make_report
    from kd_tune.space.options import SweepOptions
    from kd_tune.sweep.results import sweep_status
    from kd_tune.sweep.start import run_sweep
    from kd_tune.tracking.tags import EVERY_RUN_METRICS, TAG_ROLE, TAG_TRIAL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = search_space(name="asha", search={"algorithm": "optuna", "num_samples": 5, "max_concurrent": 2, "seed": 0},
                         grid={"alpha": {"low": 0.0, "high": 1.0}, "temperature": {"low": 1.0, "high": 20.0, "log": True}, "epochs": [3]})
    opts = SweepOptions(storage=str(tmp_path / "store"), data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True)
    outcome = run_sweep(write_space(space), resolve_storage(opts.storage), opts, log=lambda s: None)
    assert outcome.ok and outcome.total == 6, outcome.table
    assert set(outcome.table["status"]) == {"finished", "stopped early"}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("asha")
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags[TAG_ROLE] in ("student", "scratch")]
    students = [r for r in runs if r.data.tags[TAG_ROLE] == "student"]
    assert len(runs) == 6 and len(students) == 5 and len({r.data.tags[TAG_TRIAL] for r in runs}) == 6
    stopped = [r for r in students if r.data.tags.get("kd_tune.stopped_early") == "true"]
    assert 1 <= len(stopped) < 5, [r.data.tags for r in students]  # ASHA stopped some, never the first to reach each rung
    for r in runs:
        assert r.info.status == "FINISHED"
        last = int(r.data.tags.get("kd_tune.stopped_at_epoch", r.data.params["epochs"]))
        assert last < 3 if r in stopped else last == 3
        for metric in EVERY_RUN_METRICS:
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, metric)) == list(range(1, last + 1)), (metric, r.info.run_name)
        assert [a.path for a in client.list_artifacts(r.info.run_id, "model")] == ["model/student.pt"]  # from its last checkpoint
    assert len({r.data.params["alpha"] for r in students}) == 5 and all(r.data.params["search.algorithm"] == "optuna" for r in runs)
    status = sweep_status("asha", resolve_storage(str(tmp_path / "store")))
    assert status.counts["stopped early"] == len(stopped) and status.counts["finished"] == 6 - len(stopped)
    assert "to continue" not in status.format()

    report = make_report("asha", uri, tmp_path / "report")
    names = {f.name for f in report.files}
    assert {"search_accuracy_vs_alpha_T.png", "search_alpha_temperature.png", "search_best_so_far.png", "summary.md"} <= names
    assert f"{len(stopped)} stopped early by the scheduler" in report.markdown()
    assert report.best is not None and report.best.run_id not in {r.info.run_id for r in stopped}  # selection: full trials only, on validation


@pytest.mark.integration
@pytest.mark.slow
def test_kill_and_resume_a_search(write_space: Callable[..., Path], tmp_path: Path) -> None:
    from ray import tune

    from kd_tune.tracking.tags import EVERY_RUN_METRICS, TAG_TRIAL

    from .helpers import Sweep, kill_tree

    samples = 4
    # ~1 s per epoch, so that the kill lands inside trials; ASHA on, so stopped trials are resumed too.
    space = search_space(name="study", dataset={"name": "mnist", "train_size": 1800, "val_size": 200},
                         student={"widths": [16, 32], "lr": 0.003, "batch_size": 16},
                         search={"algorithm": "optuna", "num_samples": samples, "max_concurrent": 2, "seed": 3},
                         grid={"alpha": {"low": 0.0, "high": 1.0}, "temperature": {"low": 1.0, "high": 20.0, "log": True}, "epochs": [3]})
    sweep = Sweep(tmp_path, write_space(space))

    # Mid-search: the searcher has suggested beyond the first two trials, and a trial is training.
    proc = sweep.start("sweep", str(sweep.space))
    sweep.wait_until(proc, lambda p, base: len(p) >= 3 and any(e and max(e) < 3 for e in p.values()))
    kill_tree(proc)
    done = sweep.run("resume", "study")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{samples + 1}/{samples + 1} grid points finished" in done.stdout

    trials = tune.ExperimentAnalysis(str(sweep.dir)).trials
    assert len(trials) == samples + 1  # the searcher's total survived the kills
    assert Counter(t.config["point"]["role"] for t in trials) == {"student": samples, "scratch": 1}
    runs = sweep.child_runs()  # active runs only: runs of trials lost with a killed driver are deleted
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == sorted(str(t.trial_id) for t in trials)  # one run per trial
    for r in runs:
        assert r.info.status == "FINISHED"
        last = int(r.data.tags.get("kd_tune.stopped_at_epoch", r.data.params["epochs"]))
        for metric in EVERY_RUN_METRICS:  # each step once
            assert sorted(m.step for m in sweep.client.get_metric_history(r.info.run_id, metric)) == list(range(1, last + 1)), (metric, r.info.run_name)
    st = sweep.run("status", "study")
    assert st.returncode == 0 and "to continue" not in st.stdout and "more search trials" not in st.stdout
    from mlflow.entities import ViewType

    exp = sweep.client.get_experiment_by_name("study")
    assert exp is not None
    deleted = sweep.client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert all(r.data.tags.get("kd_tune.discarded") for r in deleted)  # only runs of trials Ray lost, each saying so
    print(f"\nruns discarded on resume (trials created after Ray's last saved state): {len(deleted)}")


def test_runs_of_trials_ray_lost_are_discarded_on_resume(tmp_path: Path) -> None:
    """A killed driver can take trials Ray created after its last saved state with it; their runs go (soft delete, tagged why)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from kd_tune.tracking.runs import discard_forgotten_runs
    from kd_tune.tracking.tags import TAG_PARENT, TAG_TRIAL

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("s")
    parent = client.create_run(exp).info.run_id
    teacher = client.create_run(exp, tags={TAG_PARENT: parent}).info.run_id
    kept, lost = (client.create_run(exp, tags={TAG_PARENT: parent, TAG_TRIAL: t}).info.run_id for t in ("known", "lost"))
    assert discard_forgotten_runs(client, exp, parent, {"known"}) == 1
    assert {r.info.run_id for r in client.search_runs([exp])} == {parent, teacher, kept}
    (gone,) = client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)
    assert gone.info.run_id == lost and gone.info.status == "KILLED" and "Ray's last saved state" in gone.data.tags["kd_tune.discarded"]
