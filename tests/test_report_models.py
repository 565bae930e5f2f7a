"""The study's two claims' tables (kd_tune.report.best_alpha) on a hand-made runs frame, with values worked out by hand.

The accuracies are exact binary fractions, so that the tie below is an exact one: the rule "ties go to the larger alpha"
is what decides it, not rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from kd_tune.report.best_alpha import best_alpha, pareto
from kd_tune.report.best_alpha_figures import fig_best_alpha, fig_pareto

T_975_1DF = 12.706204736174707  # Student's t, 97.5 % quantile, 1 degree of freedom (two seeds)


def _run(student: str, role: str, alpha: float, seed: int, val: float, test: float, params: int = 100) -> dict[str, object]:
    return {"status": "FINISHED", "role": role, "student": student, "teacher": "strong" if role == "student" else "",  # as report.runs writes it
            "label_noise": 0.0, "epochs": 5, "alpha": alpha, "temperature": 4.0 if role == "student" else math.nan, "seed": seed,
            "val_acc": val, "test_acc": test, "student_arch": "mlp", "student_parameters": params,
            "teacher_acc": 0.99 if role == "student" else math.nan}


def _runs() -> pd.DataFrame:
    return pd.DataFrame([
        _run("small", "student", 0.5, 0, 0.5, 0.5), _run("small", "student", 0.9, 0, 0.75, 0.625), _run("small", "scratch", 1.0, 0, 0.625, 0.5),
        _run("small", "student", 0.5, 1, 0.875, 0.75), _run("small", "student", 0.9, 1, 0.625, 0.75), _run("small", "scratch", 1.0, 1, 0.5, 0.25),
        _run("big", "scratch", 1.0, 0, 0.5, 0.25, params=1000), _run("big", "scratch", 1.0, 1, 0.5, 0.25, params=1000),
        {**_run("small", "student", 0.1, 0, 1.0, 1.0), "status": "FAILED"},  # not finished: never selected
    ])


def test_best_alpha_selects_per_seed_on_validation_breaks_ties_to_the_larger_alpha_and_pairs_the_gain() -> None:
    table = best_alpha(_runs())
    assert len(table) == 1  # "big" has no distilled runs: no row
    row = table.iloc[0]
    # Seed 0: alpha 0.9 (val 0.75 over scratch 0.625 and alpha 0.5's 0.5); seed 1: alpha 0.5 (0.875).
    assert row["best_alpha_mean"] == pytest.approx(0.7) and row["n_seeds"] == 2
    half_width = T_975_1DF * 0.2  # sd of (0.9, 0.5) is 0.2 * sqrt(2); over sqrt(2) seeds: 0.2
    assert (row["best_alpha_ci_low"], row["best_alpha_ci_high"]) == (pytest.approx(0.7 - half_width), pytest.approx(0.7 + half_width))
    # Seed-mean validation: alpha 0.5 and 0.9 both 0.6875, an exact tie: the larger alpha is chosen.
    assert (row["alpha"], row["temperature"], row["val_mean"]) == (0.9, 4.0, 0.6875)
    assert row["test_mean"] == 0.6875  # (0.625 + 0.75) / 2, on test
    # Paired by seed against scratch: 0.625 - 0.5 and 0.75 - 0.25.
    assert row["gain"] == pytest.approx(0.3125) and row["gain_n"] == 2
    assert (row["teacher_acc"], row["student_parameters"], row["selected_on"]) == (0.99, 100, "validation")


def test_pareto_takes_each_kinds_best_on_validation_and_marks_the_front() -> None:
    front = pareto(_runs()).set_index(["student", "kind"])
    assert set(front.index) == {("small", "scratch"), ("small", "distilled"), ("big", "scratch")}
    assert front.loc[("small", "distilled"), "alpha"] == 0.9 and front.loc[("small", "distilled"), "test_mean"] == 0.6875
    assert front.loc[("small", "scratch"), "test_mean"] == 0.375
    # The bigger student from scratch (0.25) does worse than the smaller one (0.375): off the front.
    assert bool(front.loc[("small", "scratch"), "on_front"]) and bool(front.loc[("small", "distilled"), "on_front"])
    assert not bool(front.loc[("big", "scratch"), "on_front"])


def test_the_two_claims_figures_are_written(tmp_path: Path) -> None:
    runs = _runs()
    paths = [fig_best_alpha(best_alpha(runs), "teacher_acc", "student", tmp_path, "best_alpha_vs_teacher.png"),
             fig_best_alpha(best_alpha(runs), "student_parameters", "teacher", tmp_path, "best_alpha_vs_student.png"),
             fig_pareto(pareto(runs), tmp_path)]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
