"""The figure of a sweep over distillation methods: test accuracy against each method's main knob
(:attr:`kd_tune.space.methods.Method.main_knob`: ``temperature`` for kd, ``nckd_weight`` for dkd, ``intra_weight`` for dist).

One panel per method; x: the main knob's values; y: the test accuracy (mean over seeds, 95 % CI as error bars) of the best
configuration at each value, selected among the method's configurations with that value that learn from the teacher
(kd's alpha = 1 is hard labels alone, the same at every T) as :func:`kd_tune.report.stats.best_config` selects (on
validation; the test set without a validation split); a line per variant of the method (``kd``, ``kd+ls``, ...); the
scratch student's mean as a dashed line (that of the method's best configuration's student, label noise and epochs).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kd_tune.report.configs import knob_values, learns_from_teacher, method_order, with_config_columns  # noqa: E402
from kd_tune.report.stats import select_row, selection_column  # noqa: E402
from kd_tune.space.methods import METHODS  # noqa: E402

DPI = 100
FIGURE = "accuracy_vs_method_knob.png"


def main_knob_points(summary: pd.DataFrame, select_on: str = "validation") -> pd.DataFrame:
    """The figure's points: per method, variant and value of the method's main knob, the selected configuration's summary
    row (``x``: the knob's value; ``method``, ``variant``, ``knob``, ``alpha``, ``temperature``, ``mean``, ``ci_low``,
    ``ci_high``, ``n``, ``selected_on``...)."""
    summary = with_config_columns(summary)
    students = summary[learns_from_teacher(summary)]
    if students.empty:
        return pd.DataFrame(columns=["method", "variant", "knob", "x", *summary.columns])
    values = knob_values(students)
    students = students.drop(columns=[c for c in values.columns if c not in ("method", "knobs") and c in students]).merge(
        values, on=["method", "knobs"], how="left")
    rows = []
    for method in method_order(students["method"]):
        if method not in METHODS:
            continue
        knob = METHODS[method].main_knob
        mine = students[students["method"] == method]
        for variant in method_order(mine["variant"]):
            here = mine[(mine["variant"] == variant) & mine[knob].notna()]
            for x, candidates in here.groupby(knob, sort=True):
                row = select_row(candidates, select_on)
                rows.append({**row.to_dict(), "knob": knob, "x": float(x),
                             "selected_on": "validation" if selection_column(candidates, select_on) == "val_mean" else "test"})
    return pd.DataFrame(rows)


def fig_accuracy_vs_main_knob(summary: pd.DataFrame, out: Path, select_on: str = "validation") -> Path | None:
    """See the module's docstring; None where no student learns from the teacher."""
    summary = with_config_columns(summary)
    points = main_knob_points(summary, select_on)
    if points.empty:
        return None
    methods = method_order(points["method"])
    scratch = summary[summary["role"] == "scratch"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.0 * len(methods), 4.2), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        mine = points[points["method"] == method]
        knob = str(mine["knob"].iloc[0])
        for variant in method_order(mine["variant"]):
            rows = mine[mine["variant"] == variant].sort_values("x")
            err = None
            if (rows["n"] >= 2).any():
                err = [100 * (rows["mean"] - rows["ci_low"]).fillna(0), 100 * (rows["ci_high"] - rows["mean"]).fillna(0)]
            ax.errorbar(rows["x"], 100 * rows["mean"], yerr=err, capsize=3, marker="o", label=variant)
        best = select_row(mine, select_on)
        base = scratch[(scratch["student"] == best["student"]) & (scratch["label_noise"] == best["label_noise"])
                       & (scratch["epochs"] == best["epochs"])]
        if len(base):
            ax.axhline(100 * float(base["mean"].iloc[0]), color="black", linestyle="--", linewidth=1,
                       label=f"scratch, {int(best['epochs'])} epochs")
        ax.set_title(f"{method}: best configuration per {knob}", fontsize=9)
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (%)")
    on = "validation" if (points["selected_on"] == "validation").all() else "the TEST set (no validation split: optimistic)"
    fig.suptitle(f"Test accuracy vs each method's main knob (at each value, the configuration selected on {on};\n"
                 "mean and 95 % CI over seeds; dashed: scratch)", fontsize=10)
    fig.tight_layout()
    path = out / FIGURE
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
