"""The report's figures (PNG, matplotlib without a display): accuracy and paired gain vs alpha, losses,
the alpha x temperature heatmap, learning curves and the best student's confusion matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from kd_tune.report.configs import CONFIG_KEYS, DEFAULT_KNOBS, config_label, with_config_columns  # noqa: E402
from kd_tune.report.stats import Best  # noqa: E402
from kd_tune.space.methods import DEFAULT_METHOD  # noqa: E402
from kd_tune.tracking.tags import CONFUSION_ARTIFACT  # noqa: E402

FIGSIZE = (8.0, 5.0)
DPI = 100


def _errorbar(ax: plt.Axes, x: pd.Series, rows: pd.DataFrame, **kw: object) -> None:
    y = 100 * rows["mean"]
    err = None
    if (rows["n"] >= 2).any():
        err = [100 * (rows["mean"] - rows["ci_low"]).fillna(0), 100 * (rows["ci_high"] - rows["mean"]).fillna(0)]
    ax.errorbar(x, y, yerr=err, capsize=3, marker="o", **kw)  # type: ignore[arg-type]


def _several(frame: pd.DataFrame) -> bool:
    """Whether ``frame``'s students hold more than one method or knob setting (then a line per each)."""
    return bool(frame[CONFIG_KEYS].drop_duplicates().shape[0] > 1)


def _one_config(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The students of one method and knob setting (kd with its defaults where it is there, else the first), for a figure
    that shows one; and what to add to its title where the sweep has several."""
    summary = with_config_columns(summary)
    students = summary[summary["role"] == "student"]
    if not _several(students):
        return summary, ""
    default = (students["method"] == DEFAULT_METHOD) & (students["knobs"] == DEFAULT_KNOBS)
    method, knobs = students[default].iloc[0][CONFIG_KEYS] if default.any() else students.iloc[0][CONFIG_KEYS]
    keep = (summary["role"] != "student") | ((summary["method"] == method) & (summary["knobs"] == knobs))
    return summary[keep], f", {config_label(method, knobs)}"


def fig_accuracy_vs_alpha(summary: pd.DataFrame, out: Path) -> Path:
    summary = with_config_columns(summary)
    students, scratch = summary[summary["role"] == "student"], summary[summary["role"] == "scratch"]
    several = _several(students)
    lines = [(e, m, k) for (m, k) in students[CONFIG_KEYS].drop_duplicates().sort_values(CONFIG_KEYS).itertuples(index=False)
             for e in sorted(students["epochs"].dropna().unique())]
    temps = sorted(students["temperature"].dropna().unique()) or [math.nan]
    noises = sorted(students["label_noise"].unique()) or [0.0]
    panels = [(t, n) for n in noises for t in temps]  # a panel per temperature (and per label noise, if varied)
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE[0] * len(panels) ** 0.5 * 1.2, FIGSIZE[1]), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (temp, noise) in zip(axes[0], panels, strict=True):
        for i, (epochs, method, knobs) in enumerate(lines):
            here = ((students["epochs"] == epochs) & (students["temperature"] == temp) & (students["label_noise"] == noise)
                    & (students["method"] == method) & (students["knobs"] == knobs))
            rows = students[here].sort_values("alpha")
            which = config_label(method, knobs) if several else "distilled"
            if len(rows) or not several:
                _errorbar(ax, rows["alpha"], rows, color=colors(i % 10), label=f"{which}, {epochs} epoch{'s' if epochs != 1 else ''}")
            base = scratch[(scratch["epochs"] == epochs) & (scratch["label_noise"] == noise)]
            if len(base) and not any(e == epochs for e, _, _ in lines[:i]):  # one scratch line per epochs value
                b = base.iloc[0]
                ax.axhline(100 * float(b["mean"]), color=colors(i % 10), linestyle="--", linewidth=1, label=f"scratch, {epochs} epoch{'s' if epochs != 1 else ''}")
                if b["n"] >= 2:  # the baseline has its own uncertainty: draw its interval as a band
                    ax.axhspan(100 * float(b["ci_low"]), 100 * float(b["ci_high"]), color=colors(i % 10), alpha=0.12, linewidth=0)
        ax.set_title(f"T = {temp:g}" + (f", label noise {noise:g}" if len(noises) > 1 else ""))
        ax.set_xlabel("alpha (weight of the hard-label loss)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    for ax in axes[0] if several else axes[0][-1:]:  # several methods: each panel has lines of its own
        ax.legend(fontsize=8 if not several else 6, loc="best")
    n_note = "mean and 95% CI over seeds" if (summary["n"] >= 2).any() else "one seed per point"
    fig.suptitle(f"Student test accuracy vs alpha ({n_note})")
    return _save(fig, out / "accuracy_vs_alpha.png")


def fig_gain_vs_alpha(gains: pd.DataFrame, out: Path) -> Path | None:
    """Gain over scratch (test accuracy, points) vs alpha with its interval: a line per epochs value,
    a panel per temperature and label noise (and a line per method and knobs, where those vary)."""
    if gains.empty:
        return None
    gains = with_config_columns(gains)
    several = _several(gains)
    lines = [(e, m, k) for (m, k) in gains[CONFIG_KEYS].drop_duplicates().sort_values(CONFIG_KEYS).itertuples(index=False)
             for e in sorted(gains["epochs"].unique())]
    temps = sorted(gains["temperature"].dropna().unique())
    noises = sorted(gains["label_noise"].unique())
    panels = [(t, n) for n in noises for t in temps]
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE[0] * len(panels) ** 0.5 * 1.2, FIGSIZE[1]), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (temp, noise) in zip(axes[0], panels, strict=True):
        for i, (epochs, method, knobs) in enumerate(lines):
            rows = gains[(gains["epochs"] == epochs) & (gains["temperature"] == temp) & (gains["label_noise"] == noise)
                         & (gains["method"] == method) & (gains["knobs"] == knobs)].sort_values("alpha")
            if rows.empty:
                continue
            err = None
            if rows["ci_low"].notna().any():
                err = [100 * (rows["gain"] - rows["ci_low"]).fillna(0), 100 * (rows["ci_high"] - rows["gain"]).fillna(0)]
            which = f"{config_label(method, knobs)}, " if several else ""
            ax.errorbar(rows["alpha"], 100 * rows["gain"], yerr=err, capsize=3, marker="o", color=colors(i % 10),
                        label=f"{which}{epochs} epoch{'s' if epochs != 1 else ''} (n = {int(rows['n'].max())}, {rows['test'].iloc[0]})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"T = {temp:g}" + (f", label noise {noise:g}" if len(noises) > 1 else ""))
        ax.set_xlabel("alpha (weight of the hard-label loss)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gain over scratch (test accuracy, points)")
    for ax in axes[0] if several else axes[0][-1:]:  # several methods: each panel has lines of its own
        ax.legend(fontsize=8 if not several else 6, loc="best")
    fig.suptitle("Gain of distillation over scratch, same seeds (mean and 95% CI)")
    return _save(fig, out / "gain_vs_alpha.png")


def fig_loss_vs_alpha(summary: pd.DataFrame, out: Path) -> Path:
    summary, which = _one_config(summary)
    summary = summary[summary["label_noise"] == summary["label_noise"].min()]  # the cleanest labels of the sweep
    students, scratch = summary[summary["role"] == "student"], summary[summary["role"] == "scratch"]
    epochs = students["epochs"].max()
    temp = sorted(students["temperature"].dropna().unique())[0] if len(students) else math.nan
    rows = students[(students["epochs"] == epochs) & (students["temperature"] == temp)].sort_values("alpha")
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot(rows["alpha"], rows["train_hard_loss"], marker="o", color="tab:red", label="student loss (hard labels, train)")
    ax.plot(rows["alpha"], rows["train_distill_loss"], marker="s", color="tab:blue", label="distillation loss (train)")
    ax.plot(rows["alpha"], rows["test_loss"], marker="^", color="tab:purple", label="test loss (cross-entropy)")
    base = scratch[scratch["epochs"] == epochs]
    if len(base):
        ax.axhline(float(base["train_hard_loss"].iloc[0]), color="tab:green", linestyle="--", label="scratch loss (train)")
    _finish(ax, "alpha (weight of the hard-label loss)", "loss (nats, mean per image)", f"Losses vs alpha ({epochs} epochs, T = {temp:g}{which})")
    return _save(fig, out / "loss_vs_alpha.png")


def fig_heatmap(summary: pd.DataFrame, out: Path) -> Path | None:
    summary, which = _one_config(summary)
    summary = summary[summary["label_noise"] == summary["label_noise"].min()]
    students = summary[summary["role"] == "student"]
    if students["temperature"].nunique() < 2:
        return None
    epochs = students["epochs"].max()
    grid = students[students["epochs"] == epochs].pivot_table(index="temperature", columns="alpha", values="mean")
    fig, ax = plt.subplots(figsize=FIGSIZE)
    im = ax.imshow(100 * grid.values, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(grid.columns)), [f"{a:g}" for a in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{t:g}" for t in grid.index])
    for (i, j), v in pd.DataFrame(100 * grid.values).stack().items():
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("alpha (weight of the hard-label loss)")
    ax.set_ylabel("temperature T")
    ax.set_title(f"Mean test accuracy (%), {epochs} epochs{which}")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    return _save(fig, out / "heatmap_alpha_temperature.png")


def fig_learning_curves(client: MlflowClient, runs: pd.DataFrame, best: Best, out: Path) -> Path:
    done = runs[runs["status"] == "FINISHED"]
    epochs = best.epochs
    mine = done[done["run_id"] == best.run_id]
    scratch = done[(done["role"] == "scratch") & (done["epochs"] == epochs) & (done["label_noise"] == best.label_noise)]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    method = "" if best.method == DEFAULT_METHOD and best.knobs == DEFAULT_KNOBS else f"{best.variant}, "
    for rows, label, color in ((mine, f"best: {method}alpha = {best.alpha:g}, T = {best.temperature:g}", "tab:orange"),
                               (scratch, "scratch", "tab:blue")):
        for k, (_, r) in enumerate(rows.iterrows()):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(str(r["run_id"]), "test_acc"))
            ax.plot([s for s, _ in hist], [100 * v for _, v in hist], marker=".", color=color, alpha=0.8, label=label if k == 0 else None)
    _finish(ax, "epoch", "test accuracy (%)", f"Learning curves, {epochs} epochs")
    return _save(fig, out / "learning_curves.png")


def fig_confusion(client: MlflowClient, best: Best, out: Path) -> Path | None:
    """The best student's confusion matrix on the test set (from its run's artifact)."""
    try:
        local = client.download_artifacts(best.run_id, CONFUSION_ARTIFACT, str(out))
    except Exception:  # noqa: BLE001 - runs logged before the artifact existed have none
        return None
    path = Path(local)
    matrix = json.loads(path.read_text())["matrix"]
    path.unlink()
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    im = ax.imshow(matrix, cmap="Blues")
    k = len(matrix)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i][j] > 0.5 * max(map(max, matrix)) else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Best student (alpha = {best.alpha:g}, T = {best.temperature:g}, {best.epochs} epochs): test images")
    fig.colorbar(im, ax=ax, label="images")
    return _save(fig, out / "confusion_matrix.png")


def _finish(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# --- a search's figures: each trial is a point (alpha and T sampled), stopped trials marked -------------------


def _search_points(ax: plt.Axes, runs: pd.DataFrame, x: str, metric: str, **kw: object) -> None:
    """The searched students as points: full trials filled, trials the scheduler stopped as crosses (their last epoch's value)."""
    students = runs[(runs["role"] == "student") & (runs["status"] == "FINISHED")]
    full, stopped = students[students["stopped_at"].isna()], students[students["stopped_at"].notna()]
    ax.scatter(full[x], 100 * full[metric], marker="o", label=f"trained to its epochs ({len(full)})", **kw)  # type: ignore[arg-type]
    ax.scatter(stopped[x], 100 * stopped[metric], marker="x", color="tab:gray", label=f"stopped early ({len(stopped)}; value at its last epoch)")


def _scratch_lines(ax: plt.Axes, runs: pd.DataFrame, metric: str) -> None:
    scratch = runs[(runs["role"] == "scratch") & (runs["status"] == "FINISHED")]
    for i, (epochs, rows) in enumerate(scratch.groupby("epochs")):
        ax.axhline(100 * float(rows[metric].mean()), color=plt.get_cmap("tab10")(i + 1), linestyle="--", linewidth=1,
                   label=f"scratch, {epochs} epochs (mean of {len(rows)})")


def fig_search_accuracy(runs: pd.DataFrame, metric: str, out: Path) -> Path:
    """The searched metric against alpha and against T (log scale), one point per trial, scratch as dashed lines."""
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]), sharey=True)
    for ax, x, label in ((axes[0], "alpha", "alpha (weight of the hard-label loss)"), (axes[1], "temperature", "temperature T (log scale)")):
        _search_points(ax, runs, x, metric, color="tab:orange")
        _scratch_lines(ax, runs, metric)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_ylabel(f"{_metric_name(metric)} (%)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"Search: {_metric_name(metric)} of each trial against alpha and T")
    return _save(fig, out / "search_accuracy_vs_alpha_T.png")


def fig_search_alpha_temperature(runs: pd.DataFrame, metric: str, out: Path) -> Path:
    """Where the search sampled: alpha x T, coloured by the searched metric; stopped trials as crosses."""
    students = runs[(runs["role"] == "student") & (runs["status"] == "FINISHED")]
    full, stopped = students[students["stopped_at"].isna()], students[students["stopped_at"].notna()]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    lo, hi = 100 * students[metric].min(), 100 * students[metric].max()
    im = ax.scatter(full["alpha"], full["temperature"], c=100 * full[metric], cmap="viridis", vmin=lo, vmax=hi, s=60, edgecolors="black",
                    label="trained to its epochs")
    ax.scatter(stopped["alpha"], stopped["temperature"], c=100 * stopped[metric], cmap="viridis", vmin=lo, vmax=hi, s=60, marker="X",
               label="stopped early")
    ax.set_yscale("log")
    fig.colorbar(im, ax=ax, label=f"{_metric_name(metric)} (%)")
    _finish(ax, "alpha (weight of the hard-label loss)", "temperature T (log scale)", "Search: the sampled alpha x T")
    return _save(fig, out / "search_alpha_temperature.png")


def fig_search_best_so_far(runs: pd.DataFrame, metric: str, out: Path) -> Path:
    """Each trial's metric in the order the trials started, and the best so far among trials trained to their epochs
    (what selection can pick); scratch as a dashed line."""
    students = runs[(runs["role"] == "student") & (runs["status"] == "FINISHED")].sort_values("start_time", kind="stable").reset_index(drop=True)
    number = pd.Series(range(1, len(students) + 1))
    full = students["stopped_at"].isna()
    best = (100 * students[metric].where(full)).cummax().ffill()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(number[full], 100 * students.loc[full, metric], marker="o", color="tab:orange", label="trial trained to its epochs")
    ax.scatter(number[~full], 100 * students.loc[~full, metric], marker="x", color="tab:gray", label="trial stopped early")
    ax.step(number, best, where="post", color="tab:red", label="best so far (trained to its epochs)")
    _scratch_lines(ax, runs, metric)
    _finish(ax, "trial number (order started)", f"{_metric_name(metric)} (%)", "Search: best so far")
    return _save(fig, out / "search_best_so_far.png")


def _metric_name(metric: str) -> str:
    return {"val_acc": "validation accuracy", "test_acc": "test accuracy"}.get(metric, metric)
