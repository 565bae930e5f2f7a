"""The figures of a sweep over students and teachers (PNG, matplotlib without a display): accuracy vs alpha per
student and teacher, the best alpha against the teacher's accuracy and against the student's size, and the Pareto
view of student size against test accuracy, distilled and from scratch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kd_tune.report.configs import CONFIG_KEYS, config_label, with_config_columns  # noqa: E402

DPI = 100


def _yerr(rows: pd.DataFrame, mean: str, lo: str, hi: str, scale: float = 1.0) -> list[pd.Series] | None:
    if rows[lo].isna().all():
        return None
    return [scale * (rows[mean] - rows[lo]).fillna(0), scale * (rows[hi] - rows[mean]).fillna(0)]


def _name(name: str, what: str) -> str:
    return name or what


def _configs(frame: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """``frame``'s rows per (method, knobs), in the report's order (one group without a method axis)."""
    return [(key, rows) for key, rows in frame.groupby(CONFIG_KEYS, sort=True)]


def fig_accuracy_vs_alpha_by_model(summary: pd.DataFrame, out: Path) -> Path:
    """A panel per (teacher, student): test accuracy vs alpha, a line per epochs value (and per method and knobs, where
    those vary) at the panel's best temperature (on the seed-mean validation accuracy), the student's scratch baseline dashed."""
    summary = with_config_columns(summary)
    students, scratch = summary[summary["role"] == "student"], summary[summary["role"] == "scratch"]
    several = students[CONFIG_KEYS].drop_duplicates().shape[0] > 1
    students = students[students["label_noise"] == students["label_noise"].min()]
    teachers, names = sorted(students["teacher"].unique()), sorted(students["student"].unique())
    width = 6.5 if several else 4.5  # several methods: room for a legend line per method and knob setting
    fig, axes = plt.subplots(len(teachers), len(names), figsize=(width * len(names), 3.5 * len(teachers)), squeeze=False, sharey=True)
    for i, teacher in enumerate(teachers):
        for j, student in enumerate(names):
            ax, here = axes[i][j], students[(students["teacher"] == teacher) & (students["student"] == student)]
            if here.empty:
                continue
            column = "val_mean" if here["val_mean"].notna().any() else "mean"
            temps = []
            for (method, knobs), mine in _configs(here):
                temp = mine.groupby("temperature")[column].mean().idxmax()
                temps.append(temp)
                for epochs, rows in mine[mine["temperature"] == temp].groupby("epochs"):
                    rows = rows.sort_values("alpha")
                    which = f"{config_label(method, knobs)}, T {temp:g}, " if several else ""
                    line = ax.errorbar(rows["alpha"], 100 * rows["mean"], yerr=_yerr(rows, "mean", "ci_low", "ci_high", 100), capsize=3,
                                       marker="o", label=f"{which}{epochs} epochs")
                    base = scratch[(scratch["student"] == student) & (scratch["epochs"] == epochs) & (scratch["label_noise"] == rows["label_noise"].min())]
                    if len(base):
                        ax.axhline(100 * base["mean"].iloc[0], linestyle="--", color=line[0].get_color(), alpha=0.7)
            shown_t = "" if several else f", T {temps[0]:g}"
            ax.set_title(f"student {_name(student, 'student')}, teacher {_name(teacher, 'teacher')}{shown_t}", fontsize=9)
            ax.set_xlabel("alpha (weight of the hard labels)")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.legend(fontsize=7)
    fig.suptitle("Test accuracy vs alpha per student and teacher (mean over seeds, 95 % CI; dashed: scratch)")
    fig.tight_layout()
    path = out / "accuracy_vs_alpha_by_model.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fig_best_alpha(table: pd.DataFrame, x: str, lines: str, out: Path, name: str) -> Path:
    """The best alpha (its mean over seeds, each seed's selected on validation, with its 95 % interval) against ``x``
    (``teacher_acc`` or ``student_parameters``), a line per ``lines`` value (students or teachers; and per method and knobs
    where those vary), a panel per epochs."""
    table = with_config_columns(table)
    table = table[table["label_noise"] == table["label_noise"].min()]
    several = table[CONFIG_KEYS].drop_duplicates().shape[0] > 1
    epochs = sorted(table["epochs"].unique())
    fig, axes = plt.subplots(1, len(epochs), figsize=(5.5 * len(epochs), 4.0), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], epochs, strict=True):
        for (key, method, knobs), rows in table[table["epochs"] == e].groupby([lines, *CONFIG_KEYS]):
            rows = rows.sort_values(x)
            ax.errorbar(rows[x] * (100 if x == "teacher_acc" else 1), rows["best_alpha_mean"],
                        yerr=_yerr(rows, "best_alpha_mean", "best_alpha_ci_low", "best_alpha_ci_high"), capsize=3, marker="o",
                        label=f"{lines} {_name(str(key), lines)}" + (f", {config_label(method, knobs)}" if several else ""))
        if x == "student_parameters":
            ax.set_xscale("log")
        ax.set_xlabel("teacher test accuracy (%)" if x == "teacher_acc" else "student parameters")
        ax.set_title(f"{e} epochs", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best alpha (selected on validation)")
    # Two short lines: one line overran the figure (and was cut) when the sweep has a single epochs panel.
    fig.suptitle("Best alpha (each seed's, selected on validation)\nmean and 95 % CI over seeds; 1 = no distillation", fontsize=10)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fig_pareto(table: pd.DataFrame, out: Path) -> Path:
    """Student size against test accuracy: each student's best scratch and best distilled configuration (selected on
    validation), 95 % CIs over seeds; the front of each kind joined."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for kind, marker in (("scratch", "s"), ("distilled", "o")):
        rows = table[table["kind"] == kind].sort_values("student_parameters")
        if rows.empty:
            continue
        line = ax.errorbar(rows["student_parameters"], 100 * rows["test_mean"], yerr=_yerr(rows, "test_mean", "test_ci_low", "test_ci_high", 100),
                           capsize=3, marker=marker, linestyle="none", label=kind)
        front = rows[rows["on_front"]]
        ax.plot(front["student_parameters"], 100 * front["test_mean"], color=line[0].get_color(), alpha=0.5)
        for _, r in rows.iterrows():
            ax.annotate(str(r["student"]) or str(r["student_arch"]), (r["student_parameters"], 100 * r["test_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Best scratch and best distilled configuration per student", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def has_model_axes(runs: pd.DataFrame) -> bool:
    """Whether the sweep has a student or a teacher axis (the figures above are its figures)."""
    return bool((runs["student"] != "").any() or (runs["teacher"] != "").any())
