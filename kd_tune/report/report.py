"""Reports: the study's tables and figures, read back from MLflow.

``kd-tune report NAME`` reads every run of a sweep (``mlflow.search_runs`` -> pandas), writes a
tidy CSV (one row per grid point and seed), a summary table (mean, 95 % CI and n over seeds; the
best configuration and its paired gain over scratch training, see :mod:`kd_tune.report.stats`) and PNG
figures (:mod:`kd_tune.report.figures`), and logs all of them as artifacts of the sweep's parent run.
The best configuration is selected on the validation split and reported with its *test* accuracy;
a sweep without a validation split selects on the test set, and the report says that this is optimistic.

A sweep whose grid has a method axis (``grid.method``: kd, dkd, dist and their knobs) keeps each method and knob setting
apart in every table, and adds a per-method section (:mod:`kd_tune.report.methods`, ``methods.csv``), a figure of accuracy
against each method's main knob (:mod:`kd_tune.report.method_figures`) and the importance of each swept axis
(:mod:`kd_tune.report.importance`, ``importance.csv``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from kd_tune.errors import UsageError
from kd_tune.report.best_alpha import best_alpha, models_markdown, pareto
from kd_tune.report.best_alpha_figures import fig_accuracy_vs_alpha_by_model, fig_best_alpha, fig_pareto, has_model_axes
from kd_tune.report.configs import CONFIG_KEYS, DEFAULT_KNOBS, has_method_axis
from kd_tune.report.figures import (
    fig_accuracy_vs_alpha,
    fig_confusion,
    fig_gain_vs_alpha,
    fig_heatmap,
    fig_learning_curves,
    fig_loss_vs_alpha,
    fig_search_accuracy,
    fig_search_alpha_temperature,
    fig_search_best_so_far,
)
from kd_tune.report.importance import importance, importance_markdown, importance_table
from kd_tune.report.method_figures import fig_accuracy_vs_main_knob
from kd_tune.report.methods import methods_markdown, per_variant, variants
from kd_tune.report.run_table import load_runs, selectable
from kd_tune.report.stats import Best, Protocol, best_config, gains_over_scratch, protocol_of, summarize
from kd_tune.report.tables import markdown_table
from kd_tune.space.methods import DEFAULT_METHOD


@dataclass(frozen=True)
class Report:
    name: str
    runs: pd.DataFrame
    summary: pd.DataFrame
    gains: pd.DataFrame
    best: Best | None
    best_distilled: Best | None
    files: list[Path]
    unfinished: int
    protocol: Protocol
    search: str = ""
    """For a search: its trials, how many the scheduler stopped, the student epochs it used."""
    models: str = ""
    """For a sweep over students or teachers: the best alpha per model and the Pareto table (:mod:`kd_tune.report.best_alpha`)."""
    methods: str = ""
    """For a sweep over more than one variant of the methods: each one's best configuration (:mod:`kd_tune.report.methods`)."""
    importance: str = ""
    """For a sweep over methods or their knobs: the importance of each swept axis (:mod:`kd_tune.report.importance`)."""

    @property
    def method_axis(self) -> bool:
        """Whether the summary holds more than one method or knob setting (then tables show which, and the best lines say it)."""
        return bool(self.summary[CONFIG_KEYS].drop_duplicates().shape[0] > 1) if len(self.summary) else False

    def markdown(self) -> str:
        lines = [f"# Sweep {self.name!r}", "", self.protocol.describe(), ""]
        if self.search:
            lines += [self.search, ""]
        if self.unfinished:
            lines += [f"Note: {self.unfinished} grid point(s) have not finished; this report covers what exists.", ""]
        shown = self.summary.copy()
        shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:.4g}")
        shown["alpha"] = shown["alpha"].map(lambda v: f"{v:.4g}")
        shown["mean acc %"] = (100 * shown["mean"]).map(lambda v: f"{v:.2f}")
        shown["95% CI %"] = shown.apply(lambda r: "n/a (n=1)" if r["n"] < 2 else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]", axis=1)
        shown["method"], shown["knobs"] = shown["method"].where(shown["role"] == "student", "-"), shown["knobs"].where(shown["role"] == "student", "-")
        cols = ["role", *_varying(self.summary), "alpha", "temperature", "epochs", "n", "mean acc %", "95% CI %"]
        if shown["val_mean"].notna().any():
            shown["val acc %"] = (100 * shown["val_mean"]).map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
            cols.append("val acc %")
        lines += ["Test accuracy per configuration (mean over seeds):", "", markdown_table(shown[cols]), ""]
        if not self.gains.empty:
            g = self.gains.copy()
            g["temperature"] = g["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:.4g}")
            g["alpha"] = g["alpha"].map(lambda v: f"{v:.4g}")
            g["gain pp"] = (100 * g["gain"]).map(lambda v: f"{v:+.2f}")
            g["95% CI pp"] = g.apply(lambda r: "n/a" if pd.isna(r["ci_low"]) else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]", axis=1)
            g["positive"] = g.apply(lambda r: f"{int(r['positive'])}/{int(r['n'])}" if r["test"] == "paired t" else "-", axis=1)
            g["p"], g["p Holm"] = g["p"].map(_p_value), g["p_holm"].map(_p_value)
            cols = [*_varying(self.gains), "alpha", "temperature", "epochs", "n", "gain pp", "95% CI pp", "test", "positive", "p", "p Holm"]
            tested = int(self.gains["p_holm"].notna().sum())
            lines += ["Gain over scratch (same epochs, seed and label noise; test accuracy, percentage points):", "",
                      markdown_table(g[cols]), ""]
            if tested:
                held = int((self.gains["p_holm"] < 0.05).sum())
                best = (" (The best configuration's own interval below needs no adjustment: it was chosen on validation and is one "
                        "comparison on test.)" if self.protocol.selected_on == "validation" else "")
                lines += [f"p: the test of gain = 0 for that configuration alone; p Holm: adjusted over the {tested} configurations "
                          f"tested here, so that the chance of any false non-zero gain in the table is 5 %: {held} of {tested} "
                          f"below 0.05.{best}", ""]
        if self.models:
            lines += [self.models, ""]
        if self.methods:
            lines += [self.methods, ""]
        if self.importance:
            lines += [self.importance, ""]
        distilled = ("Best distilled configuration (learns from the teacher: kd with alpha < 1, or another method)"
                     if self.method_axis or (self.summary["method"] != DEFAULT_METHOD).any() else "Best distilled configuration (alpha < 1)")
        for title, b in (("Best configuration", self.best), (distilled, self.best_distilled)):
            if b is None or (title != "Best configuration" and b == self.best):
                continue
            lines += [self._best_line(title, b), ""]
        return "\n".join(lines) + "\n"

    def _best_line(self, title: str, b: Best) -> str:
        gain = f"{100 * b.gain:+.2f} points"
        if b.gain_ci_low is None or b.gain_ci_high is None:
            ci = "no CI (fewer than 2 seeds on a side)"
        else:
            how = f"{b.gain_test}, positive on {b.gain_positive} of {b.gain_n} seeds" if b.gain_test == "paired t" else b.gain_test
            ci = f"95% CI [{100 * b.gain_ci_low:+.2f}, {100 * b.gain_ci_high:+.2f}] ({how}), {'excludes' if b.ci_excludes_zero else 'includes'} zero"
        acc_ci = "" if b.ci_low is None or pd.isna(b.ci_low) else f", 95% CI [{100 * b.ci_low:.2f}, {100 * b.ci_high:.2f}]"  # type: ignore[operator]
        chosen = (f"selected on validation accuracy {100 * b.val_mean:.2f} %" if b.val_mean is not None and self.protocol.selected_on == "validation"
                  else "selected on the test set (optimistic)")
        noise = f", label noise {b.label_noise:g}" if b.label_noise else ""
        noise += (f", student {b.student}" if b.student else "") + (f", teacher {b.teacher}" if b.teacher else "")
        method = f"method {b.method} ({b.knobs}), " if self.method_axis or b.method != DEFAULT_METHOD or b.knobs != DEFAULT_KNOBS else ""
        return (f"{title}: {method}alpha = {b.alpha:g}, T = {b.temperature:g}, {b.epochs} epochs{noise} ({chosen}): "
                f"test accuracy {100 * b.mean:.2f} %{acc_ci} (n = {b.n}); over scratch at {b.epochs} epochs: {gain}, {ci}.")


def _varying(table: pd.DataFrame) -> list[str]:
    """The columns of the model and method axes that take more than one value in ``table`` (a sweep without them: none)."""
    return [c for c in ("student", "teacher", "label_noise", "method", "knobs") if table[c].nunique() > 1]


def _p_value(p: float) -> str:
    return "n/a" if pd.isna(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def make_report(name: str, tracking_uri: str, out: Path) -> Report:
    """Read the sweep's runs, write the CSVs, summary and figures into ``out`` and log them on the parent run.

    Raises :class:`UsageError` for an unknown sweep or one without student runs.
    """
    all_runs, _, parent = load_runs(name, tracking_uri)
    if all_runs.empty:
        raise UsageError(f"sweep {name!r} has no student runs yet in {tracking_uri}; allowed: a sweep with at least one run")
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    runs = selectable(all_runs)
    protocol = protocol_of(runs)
    summary = summarize(runs)
    gains = gains_over_scratch(runs)
    best = best_config(runs, summary, gains, select_on=protocol.selected_on)
    best_distilled = best_config(runs, summary, gains, distilled_only=True, select_on=protocol.selected_on)
    files = [out / "runs.csv", out / "summary.csv", out / "gains.csv"]
    all_runs.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    gains.to_csv(files[2], index=False)
    is_search = bool((all_runs["algorithm"] != "grid").any())
    report = Report(name, runs, summary, gains, best, best_distilled, files, int((runs["status"] != "FINISHED").sum()), protocol,
                    search_note(all_runs) if is_search else "")
    if is_search:
        metric = "val_acc" if protocol.selected_on == "validation" else "test_acc"
        files += [fig_search_accuracy(all_runs, metric, out), fig_search_alpha_temperature(all_runs, metric, out),
                  fig_search_best_so_far(all_runs, metric, out)]
        if best is not None:
            files.append(fig_learning_curves(client, runs, best, out))
            confusion = fig_confusion(client, best, out)
            if confusion is not None:
                files.append(confusion)
    elif not summary.empty and has_model_axes(runs):
        best_table, front = best_alpha(runs, protocol.selected_on), pareto(runs, protocol.selected_on)
        files += [out / "best_alpha.csv", out / "pareto.csv"]
        best_table.to_csv(files[-2], index=False)
        front.to_csv(files[-1], index=False)
        report = replace(report, models=models_markdown(best_table, front))
        files.append(fig_accuracy_vs_alpha_by_model(summary, out))
        if best_table["teacher"].nunique() > 1:
            files.append(fig_best_alpha(best_table, "teacher_acc", "student", out, "best_alpha_vs_teacher.png"))
        if best_table["student"].nunique() > 1:
            files.append(fig_best_alpha(best_table, "student_parameters", "teacher", out, "best_alpha_vs_student.png"))
        files.append(fig_pareto(front, out))
        if best is not None:
            files.append(fig_learning_curves(client, runs, best, out))
    elif not summary.empty:
        files.append(fig_accuracy_vs_alpha(summary, out))
        for fig in (fig_gain_vs_alpha(gains, out), fig_heatmap(summary, out)):
            if fig is not None:
                files.append(fig)
        files.append(fig_loss_vs_alpha(summary, out))
        if best is not None:
            files.append(fig_learning_curves(client, runs, best, out))
            confusion = fig_confusion(client, best, out)
            if confusion is not None:
                files.append(confusion)
    if not summary.empty and has_method_axis(runs):
        report, more = method_views(report, runs, out)
        files += more
    md = out / "summary.md"
    md.write_text(report.markdown())
    files.append(md)
    for f in files:
        client.log_artifact(parent, str(f), artifact_path="report")
    return report


def method_views(report: Report, runs: pd.DataFrame, out: Path) -> tuple[Report, list[Path]]:
    """A sweep over methods or their knobs: the per-method section (more than one variant), the figure of accuracy against
    each method's main knob, and the importance of each swept axis; the report with their Markdown, and their files."""
    select_on, files = report.protocol.selected_on, []
    methods = ""
    if len(variants(report.summary)) > 1:
        table = per_variant(runs, report.summary, report.gains, select_on)
        files.append(out / "methods.csv")
        table.to_csv(files[-1], index=False)
        methods = methods_markdown(table)
    figure = fig_accuracy_vs_main_knob(report.summary, out, select_on)
    if figure is not None:
        files.append(figure)
    results = importance(runs, select_on)
    files.append(out / "importance.csv")
    importance_table(results).to_csv(files[-1], index=False)
    return replace(report, methods=methods, importance=importance_markdown(results)), files


def student_epochs_used(runs: pd.DataFrame) -> int:
    """Student epochs the sweep trained: per trial, the epoch it was stopped at or its largest epochs value."""
    trained = runs["stopped_at"].astype("Float64").fillna(runs["epochs"].astype("Float64"))
    return int(trained.groupby(runs["trial_id"]).max().sum())


def search_note(runs: pd.DataFrame) -> str:
    """One paragraph on a search: trials, stopped early, the student epochs it used against the most it could have."""
    students = runs[runs["role"] == "student"]
    stopped = int(students["stopped_at"].notna().sum())
    algorithm = ", ".join(sorted(set(students["algorithm"])))
    budget = int(runs.groupby("trial_id")["epochs"].max().sum())
    return (f"Search ({algorithm}): {len(students)} student trials with sampled alpha and T, {stopped} stopped early by the scheduler "
            f"(shown in the figures and runs.csv at their last epoch, but not selectable: they were not trained to their epochs); "
            f"{student_epochs_used(runs)} student epochs trained (baselines included), of at most {budget} without early stopping.")
