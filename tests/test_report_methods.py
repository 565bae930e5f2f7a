"""The report of a sweep whose grid has a method axis (kd, dkd, dist and their knobs): configurations kept apart, the
per-method section, the figure against each method's main knob and the importance of the swept axes.

The frames are made by hand, shaped as ``load_runs`` makes them, with three seeds. Each configuration's test accuracy is the
scratch student's of the same seed plus differences chosen here, so that the selections and the paired gains are known
by construction: the expected numbers below are worked out from those differences, not by the code under test.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from kd_tune.report.configs import method_columns
from kd_tune.report.importance import MIN_RUNS, importance, importance_markdown, importance_table
from kd_tune.report.method_figures import fig_accuracy_vs_main_knob, main_knob_points
from kd_tune.report.methods import methods_markdown, per_variant
from kd_tune.report.report import make_report
from kd_tune.report.stats import _baseline, best_config, gains_over_scratch, summarize
from kd_tune.tracking.tags import TAG_PARENT, TAG_ROLE, TAG_SWEEP, TAG_TRIAL

T_975_DF2 = 4.302652729749464  # Student's t, 97.5th percentile, 2 degrees of freedom (three seeds; tables)
SEEDS = (0, 1, 2)
SCRATCH = {0: 0.80, 1: 0.84, 2: 0.82}
"""The scratch student's test accuracy per seed: seed effects (4 points) far larger than the gains."""
_ids = itertools.count()
# Gains equal on every seed up to rounding (0.86 - 0.80 and 0.90 - 0.84): SciPy's t-test warns of their near-zero spread.
pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")


def _rows(method: str, alpha: float, temperature: float | None, diffs: tuple[float, float, float], val: float, role: str = "student",
          epochs: int = 5, **knobs: Any) -> list[dict[str, Any]]:
    """One configuration's three runs (a row per seed, as ``load_runs`` gives them): test accuracy = scratch's of the
    seed + ``diffs[seed]``, validation accuracy ``val`` on every seed. ``knobs``: the method's, as MLflow's param strings."""
    rows = []
    for seed in SEEDS:
        params = pd.DataFrame([{"method": method, **{k: str(v) for k, v in knobs.items()}}])
        config = method_columns(params).iloc[0].to_dict()
        rows.append({"run_id": f"r{next(_ids)}", "role": role, "alpha": alpha, "temperature": math.nan if temperature is None else temperature,
                     "epochs": epochs, "seed": seed, "label_noise": 0.0, "status": "FINISHED", "normalize": False, "val_size": 100,
                     "train_size": "1000", "algorithm": "grid", "trial_id": f"t{next(_ids)}", "stopped_at": pd.NA, "student": "", "teacher": "",
                     **config, "test_acc": SCRATCH[seed] + diffs[seed], "val_acc": val, "test_loss": 0.3, "train_hard_loss": 0.2,
                     "train_distill_loss": 0.1})
    return rows


def _frame(*configs: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([row for rows in configs for row in rows])


def _scratch(val: float = 0.81) -> list[dict[str, Any]]:
    return _rows("kd", 1.0, None, (0.0, 0.0, 0.0), val, role="scratch")


def _sweep() -> pd.DataFrame:
    """kd, kd+ls, dkd (two nckd_weight values) and dist over the same scratch baseline; the differences are chosen so
    that each variant's selection on validation differs from what the test set would pick."""
    return _frame(
        _scratch(),
        _rows("kd", 0.5, 4.0, (0.01, 0.02, 0.03), 0.85),  # kd's best on validation
        _rows("kd", 0.5, 2.0, (0.05, 0.05, 0.05), 0.80),  # better on test, worse on validation: not selected
        _rows("kd", 1.0, 4.0, (0.0, 0.0, 0.0), 0.82),  # hard labels alone
        _rows("kd", 0.5, 2.0, (0.015, 0.015, 0.03), 0.855, standardize=True),  # kd+ls
        _rows("dkd", 1.0, 4.0, (0.02, 0.03, 0.04), 0.87),  # dkd's defaults (nckd_weight 8): dkd's best
        _rows("dkd", 1.0, 4.0, (0.06, 0.06, 0.06), 0.86, nckd_weight=2.0),  # better on test, worse on validation
        _rows("dist", 1.0, 4.0, (-0.01, 0.0, 0.005), 0.84),
    )


def _ci(diffs: list[float]) -> tuple[float, float]:
    half = T_975_DF2 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def test_param_strings_are_read_back_into_method_knob_and_variant_columns() -> None:
    raw = pd.DataFrame([
        {"method": None},  # a run logged before methods were an axis: kd with its defaults
        {"method": "dkd", "nckd_weight": "2.0", "warmup": "5", "standardize": "False"},
        {"method": "kd", "divergence": "skew_kl", "skew": "0.2", "standardize": "True"},
        {"method": "kd", "divergence": "reverse_kl", "standardize": "False", "skew": None},
        {"method": "dist", "inter_weight": "2.0", "intra_weight": "1.0"},
    ])
    cols = method_columns(raw)
    assert list(cols["method"]) == ["kd", "dkd", "kd", "kd", "dist"]
    assert list(cols["knobs"]) == ["divergence=forward_kl, standardize=False",
                                   "tckd_weight=1, nckd_weight=2, warmup=5, standardize=False",
                                   "divergence=skew_kl, skew=0.2, standardize=True",
                                   "divergence=reverse_kl, standardize=False",
                                   "inter_weight=2, intra_weight=1"]
    assert list(cols["variant"]) == ["kd", "dkd", "kd+skew_kl+ls", "kd+reverse_kl", "dist"]
    # Typed: numbers numeric, booleans bool, names str; a knob the run's method lacks (or that does not apply) is missing.
    assert cols.at[1, "nckd_weight"] == 2.0 and cols.at[1, "warmup"] == 5 and cols.at[1, "tckd_weight"] == 1.0
    assert cols.at[2, "standardize"] is True and cols.at[1, "standardize"] is False and cols.at[2, "skew"] == 0.2
    assert cols.at[0, "divergence"] == "forward_kl" and cols.at[4, "divergence"] is None and cols.at[4, "standardize"] is None
    assert math.isnan(cols.at[0, "skew"]) and math.isnan(cols.at[0, "nckd_weight"]) and math.isnan(cols.at[3, "skew"])
    assert pd.isna(cols.at[0, "warmup"]) and cols.at[4, "inter_weight"] == 2.0


def test_kd_and_dkd_with_the_same_alpha_and_temperature_are_not_merged() -> None:
    runs = _frame(_scratch(), _rows("kd", 1.0, 4.0, (0.0, 0.0, 0.0), 0.82), _rows("dkd", 1.0, 4.0, (0.02, 0.03, 0.04), 0.87),
                  _rows("dkd", 1.0, 4.0, (0.06, 0.06, 0.06), 0.86, nckd_weight=2.0))
    summary = summarize(runs)
    students = summary[summary["role"] == "student"].set_index("knobs")
    assert len(students) == 3 and set(students["n"]) == {3}  # three configurations of 3 seeds each, not one of 9
    mean_s = statistics.mean(SCRATCH.values())
    assert students.loc["divergence=forward_kl, standardize=False", "mean"] == pytest.approx(mean_s)
    assert students.loc["tckd_weight=1, nckd_weight=8, warmup=20, standardize=False", "mean"] == pytest.approx(mean_s + 0.03)
    assert students.loc["tckd_weight=1, nckd_weight=2, warmup=20, standardize=False", "mean"] == pytest.approx(mean_s + 0.06)
    assert list(students["method"]) == ["dkd", "dkd", "kd"] and list(students["variant"]) == ["dkd", "dkd", "kd"]
    # dkd's alpha = 1 learns from the teacher, so it has a gain over scratch; kd's alpha = 1 (hard labels alone) has none.
    gains = gains_over_scratch(runs)
    assert sorted(gains["method"]) == ["dkd", "dkd"]
    assert sorted(gains["gain"]) == [pytest.approx(0.03), pytest.approx(0.06)]
    # The best distilled configuration (learns from the teacher) is dkd's, though its alpha is 1.
    distilled = best_config(runs, summary, gains, distilled_only=True)
    assert distilled is not None and (distilled.method, distilled.alpha) == ("dkd", 1.0)
    assert distilled.knobs == "tckd_weight=1, nckd_weight=8, warmup=20, standardize=False"  # validation 0.87 over 0.86
    assert distilled.gain == pytest.approx(0.03) and distilled.gain_n == 3


def test_the_alpha_1_fallback_baseline_takes_kd_students_only() -> None:
    # No scratch runs: kd's alpha = 1 students (hard labels alone) stand in. dkd's alpha = 1 distills and must not:
    # with them, the baseline of each seed would be the mean of S and S + 0.05, and kd's gain 0.02 - 0.025.
    runs = _frame(_rows("kd", 1.0, 4.0, (0.0, 0.0, 0.0), 0.82), _rows("dkd", 1.0, 4.0, (0.05, 0.05, 0.05), 0.83),
                  _rows("kd", 0.5, 4.0, (0.01, 0.02, 0.03), 0.85))
    base = _baseline(runs, 0.0, 5, 4.0)
    assert set(base["method"]) == {"kd"} and len(base) == 3 and sorted(base["test_acc"]) == sorted(SCRATCH.values())
    gains = gains_over_scratch(runs).set_index("method")
    assert gains.loc["kd", "gain"] == pytest.approx(0.02) and gains.loc["kd", "n"] == 3
    lo, hi = _ci([0.01, 0.02, 0.03])
    assert (gains.loc["kd", "ci_low"], gains.loc["kd", "ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert gains.loc["dkd", "gain"] == pytest.approx(0.05) and gains.loc["dkd", "positive"] == 3


def test_each_variants_best_is_selected_on_validation_with_its_paired_gains() -> None:
    table = per_variant(_sweep(), summarize(_sweep()), gains_over_scratch(_sweep())).set_index("variant")
    assert list(table.index) == ["kd", "dist", "dkd", "kd+ls"]  # kd, the reference, first
    mean_s = statistics.mean(SCRATCH.values())
    # kd: alpha 0.5, T 4 (validation 0.85 over 0.82 and 0.80), though T 2 is better on test.
    kd = table.loc["kd"]
    assert (kd["alpha"], kd["temperature"], kd["val_mean"], kd["n"]) == (0.5, 4.0, 0.85, 3)
    assert kd["test_mean"] == pytest.approx(mean_s + 0.02)
    assert kd["gain_scratch"] == pytest.approx(0.02) and kd["gain_scratch_n"] == 3
    assert (kd["gain_scratch_ci_low"], kd["gain_scratch_ci_high"]) == tuple(pytest.approx(v) for v in _ci([0.01, 0.02, 0.03]))
    assert math.isnan(kd["gain_kd"]) and kd["selected_on"] == "validation"
    # dkd: its defaults (validation 0.87 over nckd_weight 2's 0.86), though nckd_weight 2 is better on test.
    dkd = table.loc["dkd"]
    assert dkd["knobs"] == "tckd_weight=1, nckd_weight=8, warmup=20, standardize=False" and dkd["alpha"] == 1.0
    assert dkd["test_mean"] == pytest.approx(mean_s + 0.03) and dkd["gain_scratch"] == pytest.approx(0.03)
    # Over the best kd, per seed: (0.02, 0.03, 0.04) - (0.01, 0.02, 0.03) = 0.01 on each seed: no spread, the interval is the point.
    assert dkd["gain_kd"] == pytest.approx(0.01) and dkd["gain_kd_n"] == 3 and dkd["gain_kd_positive"] == 3
    assert dkd["gain_kd_ci_low"] == pytest.approx(0.01) and dkd["gain_kd_ci_high"] == pytest.approx(0.01)
    # dist: (-0.01, 0, 0.005) over scratch; minus kd's (0.01, 0.02, 0.03): (-0.02, -0.02, -0.025).
    dist = table.loc["dist"]
    assert dist["gain_scratch"] == pytest.approx(statistics.mean([-0.01, 0.0, 0.005]))
    assert dist["gain_kd"] == pytest.approx(statistics.mean([-0.02, -0.02, -0.025])) and dist["gain_kd_positive"] == 0
    assert (dist["gain_kd_ci_low"], dist["gain_kd_ci_high"]) == tuple(pytest.approx(v) for v in _ci([-0.02, -0.02, -0.025]))
    # kd+ls: (0.015, 0.015, 0.03) - (0.01, 0.02, 0.03) = (0.005, -0.005, 0).
    ls = table.loc["kd+ls"]
    assert (ls["alpha"], ls["temperature"], ls["knobs"]) == (0.5, 2.0, "divergence=forward_kl, standardize=True")
    assert ls["gain_kd"] == pytest.approx(0.0, abs=1e-12) and ls["gain_kd_positive"] == 1
    md = methods_markdown(table.reset_index())
    assert "selected on validation: the highest mean validation accuracy over seeds" in md
    assert "| kd | divergence=forward_kl, standardize=False | 0.5 | 4 | 5 | 3 | 85.00 |" in md and "| reference |" in md
    assert "+1.00 [+1.00, +1.00], positive 3/3" in md


def test_without_a_validation_split_each_variant_is_selected_on_test_and_the_table_says_so() -> None:
    runs = _sweep().assign(val_acc=math.nan, val_size=0)
    table = per_variant(runs, summarize(runs), gains_over_scratch(runs), select_on="test").set_index("variant")
    assert table.loc["kd", "temperature"] == 2.0 and table.loc["kd", "gain_scratch"] == pytest.approx(0.05)  # the test set's pick
    assert table.loc["dkd", "knobs"] == "tckd_weight=1, nckd_weight=2, warmup=20, standardize=False"
    assert table.loc["dkd", "gain_kd"] == pytest.approx(0.01) and set(table["selected_on"]) == {"test"}
    md = methods_markdown(table.reset_index())
    assert "selected on the TEST set (no validation split)" in md and "val acc %" not in md


def test_accuracy_against_each_methods_main_knob(tmp_path: Path) -> None:
    runs = _sweep()
    points = main_knob_points(summarize(runs))
    dkd = points[points["method"] == "dkd"].set_index("x")
    assert set(dkd["knob"]) == {"nckd_weight"} and sorted(dkd.index) == [2.0, 8.0]  # one point per value of dkd's main knob
    mean_s = statistics.mean(SCRATCH.values())
    assert dkd.loc[2.0, "mean"] == pytest.approx(mean_s + 0.06) and dkd.loc[8.0, "mean"] == pytest.approx(mean_s + 0.03)
    kd = points[(points["method"] == "kd") & (points["variant"] == "kd")].set_index("x")
    # kd's main knob is T; its alpha = 1 (hard labels alone, the same at every T) is no candidate: at T 4 it is alpha 0.5.
    assert set(kd["knob"]) == {"temperature"} and sorted(kd.index) == [2.0, 4.0] and kd.loc[4.0, "alpha"] == 0.5
    assert set(points.loc[points["method"] == "kd", "variant"]) == {"kd", "kd+ls"}  # a line per variant of the method
    path = fig_accuracy_vs_main_knob(summarize(runs), tmp_path)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _importance_runs(seed: int = 0) -> pd.DataFrame:
    """val = f(alpha) + tiny noise, with a temperature axis that does nothing, over 3 seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for alpha, temperature in itertools.product((0.0, 0.25, 0.5, 0.75, 1.0), (1.0, 4.0)):
        for row in _rows("kd", alpha, temperature, (0.0, 0.0, 0.0), 0.0):
            rows.append({**row, "val_acc": 0.6 + 0.3 * alpha ** 2 + float(rng.normal(0.0, 1e-4))})
    return pd.DataFrame(rows)


def test_importance_ranks_the_axis_that_determines_the_value_far_above_one_that_does_not() -> None:
    results = importance(_importance_runs())
    assert [r.scope for r in results] == ["all methods"]  # one method without knobs of its own: no second, identical scope
    found = results[0].importances
    assert set(found) == {"alpha", "temperature", "seed"} and results[0].metric == "val_acc" and results[0].runs == 30
    assert found["alpha"] > 0.9 and found["temperature"] < 0.05 and found["seed"] < 0.05
    assert found["alpha"] > 20 * max(found["temperature"], found["seed"])
    assert importance(_importance_runs()) == results  # seeded: the same runs give the same numbers
    table = importance_table(results)
    assert list(table["axis"]) == ["alpha", *sorted(["temperature", "seed"], key=lambda a: (-found[a], a))]
    assert "| all methods (30 runs) | alpha |" in importance_markdown(results)


def test_importance_within_a_method_includes_its_own_knobs() -> None:
    # dkd's nckd_weight determines the value, its alpha does nothing; kd's runs are alpha 0.5 at two temperatures.
    rows = []
    for nckd, alpha in itertools.product((1.0, 2.0, 4.0, 8.0), (0.5, 1.0)):
        rows += [{**r, "val_acc": 0.5 + 0.05 * nckd + 1e-4 * r["seed"]} for r in _rows("dkd", alpha, 4.0, (0, 0, 0), 0.0, nckd_weight=nckd)]
    for temperature in (2.0, 4.0):
        rows += [{**r, "val_acc": 0.6} for r in _rows("kd", 0.5, temperature, (0, 0, 0), 0.0)]
    results = {r.scope: r for r in importance(pd.DataFrame(rows))}
    assert set(results) == {"all methods", "dkd", "kd"}
    assert results["kd"].importances == {} and "6 finished student runs, fewer than 8" in results["kd"].reason  # said, not estimated
    dkd = results["dkd"].importances
    assert set(dkd) == {"alpha", "nckd_weight", "seed"} and dkd["nckd_weight"] > 0.9 and dkd["alpha"] < 0.05
    assert set(results["all methods"].importances) == {"method", "alpha", "temperature", "seed"}


def test_with_too_few_runs_or_nothing_varying_importance_is_not_estimated() -> None:
    few = _importance_runs().iloc[: MIN_RUNS - 1]
    results = importance(few)
    assert results[0].importances == {} and "7 finished student runs, fewer than 8" in results[0].reason
    md = importance_markdown(results)
    assert "Importance (all methods): cannot be estimated: 7 finished student runs, fewer than 8." in md and "| alpha |" not in md
    assert importance_table(results).empty
    flat = pd.DataFrame(_rows("kd", 0.5, 4.0, (0, 0, 0), 0.8) * 3)  # 9 runs of one configuration: only seed varies
    results = importance(flat)
    assert results[0].importances == {} and results[0].reason == "no swept axis varies over its runs"
    # Without a validation split, the test accuracy, and the report says so.
    assert "TEST accuracy" in importance_markdown(importance(_importance_runs().assign(val_acc=math.nan)))


def test_report_of_a_sweep_over_methods_from_mlflow(tmp_path: Path) -> None:
    """load_runs reads the method and knobs back from the runs' params (a run without a method param is kd's), and the
    report shows each method apart, its per-method section, the figure and the importances."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("methods")
    parent = client.create_run(exp, tags={TAG_ROLE: "sweep", TAG_SWEEP: "methods"}).info.run_id
    for i, row in enumerate(_sweep().to_dict("records")):
        params = {"alpha": row["alpha"], "temperature": row["temperature"] if row["role"] == "student" else None, "epochs": row["epochs"],
                  "seed": row["seed"], "label_noise": 0.0, "dataset.normalize": False, "dataset.val_size": 100, "dataset.train_size": 1000}
        if i >= 3:  # the first scratch runs are from before methods were an axis: no method, no knobs
            params |= {"method": row["method"]} | {k: row[k] for k in ("divergence", "standardize", "skew", "tckd_weight", "nckd_weight",
                                                                          "warmup", "inter_weight", "intra_weight") if row[k] is not None and not pd.isna(row[k])}
        run = client.create_run(exp, tags={TAG_PARENT: parent, TAG_ROLE: row["role"], TAG_TRIAL: f"t{i}"})
        run_id = run.info.run_id
        for k, v in params.items():
            client.log_param(run_id, k, str(v))
        for metric in ("test_acc", "val_acc", "test_loss", "train_hard_loss", "train_distill_loss"):
            client.log_metric(run_id, metric, float(row[metric]), step=int(row["epochs"]))
        client.set_terminated(run_id)
    report = make_report("methods", uri, tmp_path / "out")
    runs = report.runs
    assert set(runs.loc[runs["role"] == "scratch", "knobs"]) == {"divergence=forward_kl, standardize=False"}
    assert sorted(runs.loc[runs["role"] == "student", "variant"].unique()) == ["dist", "dkd", "kd", "kd+ls"]
    assert sorted(runs["nckd_weight"].dropna().unique()) == [2.0, 8.0] and set(runs["warmup"].dropna()) == {20}
    names = {f.name for f in report.files}
    assert {"methods.csv", "importance.csv", "accuracy_vs_method_knob.png", "summary.md"} <= names
    md = report.markdown()
    assert "| role | method | knobs | alpha | temperature | epochs |" in md  # the summary shows which method each row is
    assert "| dkd | tckd_weight=1, nckd_weight=2, warmup=20, standardize=False | 1 | 4 | 5 |" in md
    assert "Per method (each variant's best configuration, selected on validation" in md
    assert "Importance of each swept axis" in md
    assert "Best configuration: method dkd (tckd_weight=1, nckd_weight=8, warmup=20, standardize=False), alpha = 1, T = 4" in md
    assert "Best distilled configuration (learns from the teacher" not in md  # the best configuration distills already: one line
    methods = pd.read_csv(tmp_path / "out" / "methods.csv").set_index("variant")
    assert methods.loc["dkd", "gain_kd"] == pytest.approx(0.01)
