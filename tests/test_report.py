from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from kd_tune.cli.app import main
from kd_tune.report.stats import (
    best_config,
    gains_over_scratch,
    holm,
    paired_interval,
    paired_p,
    summarize,
    t_interval,
    welch_interval,
    welch_p,
)
from kd_tune.space.options import SweepOptions
from kd_tune.sweep.start import run_sweep
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.tracking.tags import TAG_ROLE

from .conftest import FIXTURE_DATA, tiny_space

T_975_DF1 = 12.706204736174707  # Student's t, 97.5th percentile, 1 degree of freedom (tables)
T_975_DF2 = 4.302652729749464


def test_t_interval_by_hand() -> None:
    mean, lo, hi, n = t_interval(pd.Series([0.90, 0.94]))
    sd = statistics.stdev([0.90, 0.94])
    assert n == 2 and mean == pytest.approx(0.92)
    assert hi - mean == pytest.approx(T_975_DF1 * sd / math.sqrt(2))
    assert lo == pytest.approx(2 * mean - hi)
    mean, lo, hi, n = t_interval(pd.Series([0.5]))
    assert n == 1 and mean == 0.5 and math.isnan(lo) and math.isnan(hi)


def test_welch_interval_by_hand() -> None:
    a, b = pd.Series([0.95, 0.97, 0.96]), pd.Series([0.90, 0.92, 0.91])
    diff, lo, hi = welch_interval(a, b)
    assert diff == pytest.approx(0.05)
    # equal variances and sizes: Welch's df = 2 * (n - 1) = 4... with s^2 = 1e-4 on each side
    se = math.sqrt(1e-4 / 3 + 1e-4 / 3)
    from scipy import stats

    assert hi - diff == pytest.approx(float(stats.t.ppf(0.975, 4)) * se)
    assert lo is not None and lo > 0  # the gain is real
    assert welch_interval(pd.Series([0.9]), b)[1] is None


def test_summary_groups_over_seeds() -> None:
    runs = pd.DataFrame({
        "run_id": list("abcd"), "role": ["student"] * 3 + ["scratch"], "alpha": [0.5, 0.5, 0.5, 1.0],
        "temperature": [3.0, 3.0, 3.0, math.nan], "epochs": [2, 2, 2, 2], "seed": [0, 1, 2, 0], "status": ["FINISHED"] * 4,
        "test_acc": [0.91, 0.93, 0.95, 0.90], "test_loss": [0.3] * 4, "teacher_agreement": [0.9] * 4,
        "test_macro_precision": [0.9] * 4, "test_macro_recall": [0.9] * 4, "test_macro_f1": [0.9] * 4, "test_ece": [0.05] * 4,
        "train_loss": [0.2] * 4, "train_hard_loss": [0.2] * 4, "train_distill_loss": [0.1] * 4, "label_noise": [0.0] * 4,
        "val_acc": [0.9] * 4,
    })
    s = summarize(runs)
    student = s[s["role"] == "student"].iloc[0]
    assert student["n"] == 3 and student["mean"] == pytest.approx(0.93)
    assert student["ci_high"] - student["mean"] == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert s[s["role"] == "scratch"].iloc[0]["n"] == 1


def _runs(rows: list[tuple[str, float, int, float, float]]) -> pd.DataFrame:
    """(role, alpha, seed, test_acc, val_acc) rows of one temperature and epochs value."""
    return pd.DataFrame([{"run_id": f"r{i}", "role": role, "alpha": alpha, "temperature": math.nan if role == "scratch" else 3.0,
                          "epochs": 2, "seed": seed, "status": "FINISHED", "label_noise": 0.0, "test_acc": acc, "val_acc": val,
                          "test_loss": 0.3, "train_hard_loss": 0.2, "train_distill_loss": 0.1}
                         for i, (role, alpha, seed, acc, val) in enumerate(rows)])


def test_paired_gain_by_hand() -> None:
    # Seed effects are large (0.90 vs 0.96), the gain is steady: pairing sees it, Welch would not.
    runs = _runs([("student", 0.5, 0, 0.905, 0.9), ("student", 0.5, 1, 0.934, 0.9), ("student", 0.5, 2, 0.9645, 0.9),
                  ("scratch", 1.0, 0, 0.900, 0.9), ("scratch", 1.0, 1, 0.930, 0.9), ("scratch", 1.0, 2, 0.960, 0.9)])
    g = gains_over_scratch(runs).iloc[0]
    diffs = [0.005, 0.004, 0.0045]
    half = T_975_DF2 * statistics.stdev(diffs) / math.sqrt(3)
    assert g["test"] == "paired t" and g["n"] == 3 and g["positive"] == 3
    assert g["gain"] == pytest.approx(statistics.mean(diffs))
    assert g["ci_low"] == pytest.approx(statistics.mean(diffs) - half) and g["ci_high"] == pytest.approx(statistics.mean(diffs) + half)
    assert g["ci_low"] > 0
    welch = welch_interval(pd.Series([0.905, 0.934, 0.9645]), pd.Series([0.900, 0.930, 0.960]))
    assert welch[1] is not None and welch[1] < 0 < g["ci_low"]  # unpaired: the interval includes zero
    # A seed on one side only is dropped from the pairs.
    mean, lo, hi, n, positive = paired_interval(pd.Series({0: 0.91, 1: 0.92, 5: 0.99}), pd.Series({0: 0.90, 1: 0.93}))
    assert (n, positive) == (2, 1) and mean == pytest.approx(0.0)
    # Its p-value: t = mean / (sd / sqrt(n)) on n - 1 degrees of freedom, two-sided; one configuration, so Holm leaves it.
    from scipy import stats

    t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert g["p"] == pytest.approx(2 * float(stats.t.sf(t, 2))) and g["p"] < 0.05 and g["p_holm"] == g["p"]


def test_p_values_and_holm_by_hand() -> None:
    # Holm (1979) on p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    # 0.04 x 1 = 0.04 -> 0.06 (never below the one before); nan is no test and stays out of m.
    adjusted = holm(pd.Series([0.01, 0.04, 0.03, 0.005, math.nan], index=list("abcde")))
    assert adjusted[list("abcd")].tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted["e"])
    assert holm(pd.Series([0.5, 0.9])).tolist() == pytest.approx([1.0, 1.0])  # capped at 1
    # Fewer than 2 pairs: no test. Equal differences: no spread, so 0 if they are not zero, 1 if they are.
    assert math.isnan(paired_p(pd.Series({0: 0.9}), pd.Series({0: 0.8})))
    assert paired_p(pd.Series({0: 0.91, 1: 0.92}), pd.Series({0: 0.90, 1: 0.91})) == 0.0
    assert paired_p(pd.Series({0: 0.9, 1: 0.8}), pd.Series({0: 0.9, 1: 0.8})) == 1.0
    # Welch by hand: equal variances 1e-4 and sizes 3, so df = 4 and t = 0.05 / sqrt(2e-4 / 3).
    from scipy import stats

    t = 0.05 / math.sqrt(2e-4 / 3)
    assert welch_p(pd.Series([0.95, 0.97, 0.96]), pd.Series([0.90, 0.92, 0.91])) == pytest.approx(2 * float(stats.t.sf(t, 4)))
    assert math.isnan(welch_p(pd.Series([0.9]), pd.Series([0.8, 0.85])))
    assert welch_p(pd.Series([0.9, 0.9]), pd.Series([0.8, 0.8])) == 0.0 and welch_p(pd.Series([0.9, 0.9]), pd.Series([0.9, 0.9])) == 1.0


def test_selection_is_made_on_validation_and_reported_on_test() -> None:
    # alpha 0.5 looks best on test, alpha 0 on validation: the report must pick alpha 0 and show its test accuracy.
    runs = _runs([("student", 0.0, 0, 0.950, 0.980), ("student", 0.0, 1, 0.952, 0.982),
                  ("student", 0.5, 0, 0.970, 0.960), ("student", 0.5, 1, 0.972, 0.962),
                  ("scratch", 1.0, 0, 0.940, 0.950), ("scratch", 1.0, 1, 0.944, 0.950)])
    summary, gains = summarize(runs), gains_over_scratch(runs)
    best = best_config(runs, summary, gains)
    assert best is not None and best.alpha == 0.0
    assert best.mean == pytest.approx(0.951) and best.val_mean == pytest.approx(0.981)
    assert best.gain == pytest.approx(0.009) and best.gain_n == 2 and best.gain_positive == 2
    on_test = best_config(runs, summary, gains, select_on="test")
    assert on_test is not None and on_test.alpha == 0.5  # what selecting on the test set would (optimistically) have said


def test_a_tie_in_the_selection_goes_to_the_larger_alpha() -> None:
    # alpha 0 and 0.5 tie exactly on validation (0.98 on both seeds); alpha 0 comes first in the summary. A tie is no
    # evidence for the teacher: the larger alpha is selected, as report.models' best alphas do.
    runs = _runs([("student", 0.0, 0, 0.950, 0.980), ("student", 0.0, 1, 0.952, 0.980),
                  ("student", 0.5, 0, 0.960, 0.980), ("student", 0.5, 1, 0.962, 0.980),
                  ("student", 1.0, 0, 0.940, 0.970), ("student", 1.0, 1, 0.942, 0.970),
                  ("scratch", 1.0, 0, 0.940, 0.950), ("scratch", 1.0, 1, 0.944, 0.950)])
    summary, gains = summarize(runs), gains_over_scratch(runs)
    assert list(summary[summary["role"] == "student"]["alpha"]) == [0.0, 0.5, 1.0]
    best = best_config(runs, summary, gains)
    assert best is not None and best.alpha == 0.5 and best.mean == pytest.approx(0.961)


@pytest.mark.integration
def test_report_of_a_real_sweep(write_space: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tiny_space(name="rep", grid={"alpha": [0.0, 1.0], "temperature": [2.0, 4.0], "epochs": [1, 2], "seed": [0, 1]},
                       baselines=["scratch"])
    outcome = run_sweep(write_space(space), resolve_storage(str(tmp_path / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri,
                                                         quiet=True), log=lambda s: None)
    assert outcome.ok and outcome.total == 20

    out = tmp_path / "figures"
    assert main(["report", "rep", "--out", str(out), "--tracking-uri", uri]) == 0
    printed, errors = capsys.readouterr()
    assert "Downloading artifacts" not in errors  # MLflow's progress bar for the confusion matrix's download: noise
    assert "| role | alpha | temperature | epochs | n | mean acc % | 95% CI % |" in printed
    assert "Best configuration: alpha = " in printed and "zero." in printed

    client = MlflowClient(uri)
    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == 20
    for _, row in csv.iterrows():
        run = client.get_run(row["run_id"])
        assert row["test_acc"] == pytest.approx(run.data.metrics["test_acc"])  # the CSV is MLflow's numbers
        assert int(row["epochs"]) == int(run.data.params["epochs"])
        assert row["test_macro_f1"] == pytest.approx(run.data.metrics["test_macro_f1"]) and 0 < row["test_macro_f1"] <= 1
        assert 0 <= row["test_ece"] <= 1
    summary = pd.read_csv(out / "summary.csv")
    one = summary[(summary["role"] == "student") & (summary["alpha"] == 0.0) & (summary["temperature"] == 2.0) & (summary["epochs"] == 2)].iloc[0]
    accs = csv[(csv["role"] == "student") & (csv["alpha"] == 0.0) & (csv["temperature"] == 2.0) & (csv["epochs"] == 2)]["test_acc"].tolist()
    assert one["n"] == 2 and one["mean"] == pytest.approx(statistics.mean(accs))
    assert one["ci_high"] - one["mean"] == pytest.approx(T_975_DF1 * statistics.stdev(accs) / math.sqrt(2))

    expected = {"accuracy_vs_alpha.png": (1357, 500), "gain_vs_alpha.png": (1357, 500), "loss_vs_alpha.png": (800, 500),
                "heatmap_alpha_temperature.png": (800, 500), "learning_curves.png": (800, 500), "confusion_matrix.png": (600, 500)}
    for name, size in expected.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
            assert len(set(im.convert("L").getdata())) > 10  # drawn on, not blank
    exp = client.get_experiment_by_name("rep")
    assert exp is not None
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags[TAG_ROLE] == "sweep"][0]
    # The sweep left the report's choice on its parent run, where the MLflow UI shows it.
    best_row = summary[(summary["role"] == "student")].sort_values("val_mean", ascending=False, kind="stable").iloc[0]
    assert parent.data.tags["kd_tune.selected_on"] == "validation"
    assert float(parent.data.tags["kd_tune.best.alpha"]) == best_row["alpha"] and int(parent.data.tags["kd_tune.best.epochs"]) == best_row["epochs"]
    assert parent.data.metrics["best_test_acc"] == pytest.approx(best_row["mean"]) and parent.data.metrics["best_n"] == 2
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best_row["val_mean"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {f"report/{n}" for n in [*expected, "runs.csv", "summary.csv", "gains.csv", "summary.md"]}
    # The protocol is stated, and the selection is made on the validation split the tiny space holds out.
    assert "Preprocessing: pixel / 255; training images: 1000; selection: the highest mean validation accuracy" in printed
    assert "(selected on validation accuracy " in printed and "paired t, positive on " in printed
    gains = pd.read_csv(out / "gains.csv")
    assert set(gains["test"]) == {"paired t"} and set(gains["n"]) == {2}
    assert parent.data.metrics["gains_tested"] == len(gains)
    assert parent.data.metrics["gains_holm_p_below_0.05"] == (gains["p_holm"] < 0.05).sum()
    assert (gains["p_holm"] >= gains["p"]).all() and gains["p_holm"].le(1).all()  # 2 seeds: a p-value per configuration
    assert f"p Holm: adjusted over the {len(gains)} configurations tested here" in printed


def test_report_of_unknown_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("other")
    assert main(["report", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no sweep named 'nope' in the MLflow store" in err and "allowed: other" in err
    assert not (tmp_path / "r").exists()


def test_results_table_takes_a_finished_trials_last_epoch_from_its_last_result_when_its_files_lack_it() -> None:
    """A driver killed after Ray saved a trial as finished but before the trial's result files got its last epochs:
    the table reads that epoch from the trial's last result (kept in Ray's state), for a trial and for a pack member."""
    from types import SimpleNamespace

    from kd_tune.space.trials import TrialPoint, encode_pack, encode_point
    from kd_tune.sweep.results import results_table

    point = TrialPoint("student", 0.5, 3.0, 5, 0, milestones=(3, 5))
    files = pd.DataFrame([{"epoch": e, "test_acc": 0.5 + e / 100, "test_loss": 1.0, "teacher_agreement": 0.9} for e in (1, 2, 3)])
    last = {"epoch": 5, "test_acc": 0.61, "test_loss": 0.8, "teacher_agreement": 0.95, "trial_id": "t1"}
    other = TrialPoint("student", 0.5, 3.0, 5, 1, milestones=(3, 5))  # a pack of two (a pack of one is one point's trial)
    pack_files = pd.concat([files.rename(columns=lambda c, p=p: f"members/{p.label}/{c}") for p in (point, other)], axis=1)
    trials = [SimpleNamespace(config=encode_point(point), metrics=last, metrics_dataframe=files, error=None, checkpoint=None),
              SimpleNamespace(config=encode_pack([point, other]), metrics={"epoch": 5, "members": {point.label: last, other.label: last},
                              "trial_id": "t2"}, metrics_dataframe=pack_files, error=None, checkpoint=None)]
    table = results_table(trials, {"t1", "t2"})  # type: ignore[arg-type]
    assert list(table["status"]) == ["finished"] * 6 and list(table["how"]) == ["restored"] * 6
    assert sorted(table["test_acc"]) == pytest.approx([0.53] * 3 + [0.61] * 3)  # epoch 3 from the files, epoch 5 from the last result
    stale = [SimpleNamespace(config=encode_point(point), metrics={**last, "epoch": 4}, metrics_dataframe=files, error=None, checkpoint=None)]
    # A last result of another epoch is not taken.
    assert list(results_table(stale)["status"]) == ["finished", "unfinished"]  # type: ignore[arg-type]
