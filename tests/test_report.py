from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from kd_tune.cli import main
from kd_tune.options import SweepOptions
from kd_tune.report import summarize, t_interval, welch_interval
from kd_tune.sweep import run_sweep
from kd_tune.tracking import TAG_ROLE

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
    })
    s = summarize(runs)
    student = s[s["role"] == "student"].iloc[0]
    assert student["n"] == 3 and student["mean"] == pytest.approx(0.93)
    assert student["ci_high"] - student["mean"] == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert s[s["role"] == "scratch"].iloc[0]["n"] == 1


@pytest.mark.integration
def test_report_of_a_real_sweep(write_space: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tiny_space(name="rep", grid={"alpha": [0.0, 1.0], "temperature": [2.0, 4.0], "epochs": [1, 2], "seed": [0, 1]},
                       baselines=["scratch"])
    outcome = run_sweep(write_space(space), SweepOptions(storage=str(tmp_path / "store"), data_dir=str(FIXTURE_DATA), tracking_uri=uri,
                                                         quiet=True), log=lambda s: None)
    assert outcome.ok and outcome.total == 20

    out = tmp_path / "figures"
    assert main(["report", "rep", "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
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

    expected = {"accuracy_vs_alpha.png": (1357, 500), "loss_vs_alpha.png": (800, 500), "heatmap_alpha_temperature.png": (800, 500),
                "learning_curves.png": (800, 500), "confusion_matrix.png": (600, 500)}
    for name, size in expected.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
            assert len(set(im.convert("L").getdata())) > 10  # drawn on, not blank
    exp = client.get_experiment_by_name("rep")
    assert exp is not None
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags[TAG_ROLE] == "sweep"][0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {f"report/{n}" for n in [*expected, "runs.csv", "summary.csv", "summary.md"]}


def test_report_of_unknown_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("other")
    assert main(["report", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no sweep named 'nope' in the MLflow store" in err and "allowed: other" in err
    assert not (tmp_path / "r").exists()
