"""Reports: the study's tables and figures, read back from MLflow.

``kd-tune report NAME`` reads every run of a sweep (``mlflow.search_runs`` -> pandas), writes a
tidy CSV (one row per grid point and seed), a summary table (mean, 95 % CI and n over seeds; the
best configuration and its gain over scratch training) and PNG figures, and logs all of them as
artifacts of the sweep's parent run.

Confidence intervals: Student's t over the seeds of a configuration; the gain over scratch uses
Welch's t (unequal variances). With one seed there is no interval, and the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy import stats  # noqa: E402

from kd_tune.errors import UsageError  # noqa: E402
from kd_tune.mlflow_runs import TAG_PARENT, TAG_ROLE, TAG_SWEEP  # noqa: E402
from kd_tune.tracking import CONFUSION_ARTIFACT  # noqa: E402

METRICS = ["test_acc", "test_loss", "teacher_agreement", "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece",
           "train_loss", "train_hard_loss", "train_distill_loss"]
FIGSIZE = (8.0, 5.0)
DPI = 100


@dataclass(frozen=True)
class Best:
    """The distilled configuration with the highest mean accuracy and its gain over scratch."""

    alpha: float
    temperature: float
    epochs: int
    mean: float
    n: int
    gain: float
    gain_ci_low: float | None
    gain_ci_high: float | None
    run_id: str
    label_noise: float = 0.0

    @property
    def ci_excludes_zero(self) -> bool | None:
        if self.gain_ci_low is None or self.gain_ci_high is None:
            return None
        return self.gain_ci_low > 0 or self.gain_ci_high < 0


@dataclass(frozen=True)
class Report:
    name: str
    runs: pd.DataFrame
    summary: pd.DataFrame
    best: Best | None
    best_distilled: Best | None
    files: list[Path]
    unfinished: int

    def markdown(self) -> str:
        lines = [f"# Sweep {self.name!r}", ""]
        if self.unfinished:
            lines += [f"Note: {self.unfinished} grid point(s) have not finished; this report covers what exists.", ""]
        shown = self.summary.copy()
        shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
        shown["mean acc %"] = (100 * shown["mean"]).map(lambda v: f"{v:.2f}")
        shown["95% CI %"] = shown.apply(lambda r: "n/a (n=1)" if r["n"] < 2 else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]", axis=1)
        cols = ["role", "alpha", "temperature", "epochs", "n", "mean acc %", "95% CI %"]
        if shown["label_noise"].nunique() > 1:
            cols.insert(1, "label_noise")
        lines.append(markdown_table(shown[cols]))
        lines.append("")
        for title, b in (("Best configuration", self.best), ("Best distilled configuration (alpha < 1)", self.best_distilled)):
            if b is None or (title != "Best configuration" and b == self.best):
                continue
            gain = f"{100 * b.gain:+.2f} points"
            if b.gain_ci_low is None or b.gain_ci_high is None:
                ci = "no CI (fewer than 2 seeds on a side)"
            else:
                ci = (f"95% CI [{100 * b.gain_ci_low:+.2f}, {100 * b.gain_ci_high:+.2f}], "
                      f"{'excludes' if b.ci_excludes_zero else 'includes'} zero")
            noise = f", label noise {b.label_noise:g}" if b.label_noise else ""
            lines.append(f"{title}: alpha = {b.alpha:g}, T = {b.temperature:g}, {b.epochs} epochs{noise}: "
                         f"{100 * b.mean:.2f} % (n = {b.n}); over scratch at {b.epochs} epochs: {gain}, {ci}.")
            lines.append("")
        return "\n".join(lines) + "\n"


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("---" for _ in df.columns) + " |")
    return "\n".join(lines)


def load_runs(name: str, tracking_uri: str) -> tuple[pd.DataFrame, str, str]:
    """Every student and scratch run of the sweep as a tidy frame; also the experiment and parent run ids."""
    import mlflow

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments() if e.name != "Default")) or "none"
        raise UsageError(f"no sweep named {name!r} in the MLflow store {tracking_uri}; allowed: {known}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` = '{name}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise UsageError(f"experiment {name!r} in {tracking_uri} holds no kd-tune sweep; allowed: a name given to kd-tune sweep")
    parent = parents[0].info.run_id
    mlflow.set_tracking_uri(tracking_uri)
    raw = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'", max_results=100000,
                             output_format="pandas")
    assert isinstance(raw, pd.DataFrame)
    raw = raw[raw[f"tags.{TAG_ROLE}"].isin(["student", "scratch"])] if len(raw) else raw
    rows = pd.DataFrame({
        "run_id": raw.get("run_id", pd.Series(dtype=str)),
        "role": raw.get(f"tags.{TAG_ROLE}", pd.Series(dtype=str)),
        "alpha": pd.to_numeric(raw.get("params.alpha", pd.Series(dtype=float))),
        "temperature": pd.to_numeric(raw.get("params.temperature", pd.Series(dtype=float)).replace("None", None)),
        "epochs": pd.to_numeric(raw.get("params.epochs", pd.Series(dtype=float))).astype("Int64"),
        "seed": pd.to_numeric(raw.get("params.seed", pd.Series(dtype=float))).astype("Int64"),
        "label_noise": pd.to_numeric(raw.get("params.label_noise", pd.Series(0.0, index=raw.index, dtype=float))).fillna(0.0),
        "status": raw.get("status", pd.Series(dtype=str)),
    })
    for m in METRICS:
        rows[m] = pd.to_numeric(raw[f"metrics.{m}"]) if f"metrics.{m}" in raw else float("nan")
    rows = rows.sort_values(["role", "label_noise", "temperature", "alpha", "epochs", "seed"], na_position="first", kind="stable").reset_index(drop=True)
    return rows, exp.experiment_id, parent


def t_interval(values: pd.Series) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the 95 % Student-t interval of the mean (low = high = nan for n < 2)."""
    v = values.dropna().astype(float)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def welch_interval(a: pd.Series, b: pd.Series) -> tuple[float, float | None, float | None]:
    """Mean of a minus mean of b with Welch's 95 % interval (None when either side has fewer than 2 values)."""
    a, b = a.dropna().astype(float), b.dropna().astype(float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, None, None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    return diff, diff - half, diff + half


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95 % CI and n of the test accuracy over seeds, per configuration (finished runs only)."""
    done = runs[runs["status"] == "FINISHED"]
    keys = ["role", "label_noise", "alpha", "temperature", "epochs"]
    rows = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        mean, lo, hi, n = t_interval(group["test_acc"])
        rows.append({**dict(zip(keys, key, strict=True)), "n": n, "mean": mean, "ci_low": lo, "ci_high": hi,
                     "test_loss": group["test_loss"].mean(), "train_hard_loss": group["train_hard_loss"].mean(),
                     "train_distill_loss": group["train_distill_loss"].mean()})
    return pd.DataFrame(rows, columns=[*keys, "n", "mean", "ci_low", "ci_high", "test_loss", "train_hard_loss", "train_distill_loss"])


def best_config(runs: pd.DataFrame, summary: pd.DataFrame, distilled_only: bool = False) -> Best | None:
    """The student configuration with the highest mean accuracy (with ``distilled_only``, among alpha < 1:
    the ones that learn from the teacher at all), and its gain over scratch at the same epochs."""
    students = summary[(summary["role"] == "student") & ((summary["alpha"] < 1.0) if distilled_only else True)]
    if students.empty:
        return None
    b = students.sort_values("mean", ascending=False, kind="stable").iloc[0]
    done = runs[runs["status"] == "FINISHED"]
    same = (done["epochs"] == b["epochs"]) & (done["label_noise"] == b["label_noise"])
    mine = done[same & (done["role"] == "student") & (done["alpha"] == b["alpha"]) & (done["temperature"] == b["temperature"])]
    scratch = done[same & (done["role"] == "scratch")]
    if scratch.empty:  # no scratch baseline: alpha = 1 trains on hard labels alone, the same thing
        scratch = done[same & (done["role"] == "student") & (done["alpha"] == 1.0)]
    gain, lo, hi = welch_interval(mine["test_acc"], scratch["test_acc"]) if len(scratch) else (math.nan, None, None)
    return Best(float(b["alpha"]), float(b["temperature"]), int(b["epochs"]), float(b["mean"]), int(b["n"]), gain, lo, hi,
                str(mine.sort_values("test_acc").iloc[-1]["run_id"]), float(b["label_noise"]))


# --- figures ----------------------------------------------------------------------------------


def _errorbar(ax: plt.Axes, x: pd.Series, rows: pd.DataFrame, **kw: object) -> None:
    y = 100 * rows["mean"]
    err = None
    if (rows["n"] >= 2).any():
        err = [100 * (rows["mean"] - rows["ci_low"]).fillna(0), 100 * (rows["ci_high"] - rows["mean"]).fillna(0)]
    ax.errorbar(x, y, yerr=err, capsize=3, marker="o", **kw)  # type: ignore[arg-type]


def fig_accuracy_vs_alpha(summary: pd.DataFrame, out: Path) -> Path:
    students, scratch = summary[summary["role"] == "student"], summary[summary["role"] == "scratch"]
    temps = sorted(students["temperature"].dropna().unique()) or [math.nan]
    noises = sorted(students["label_noise"].unique()) or [0.0]
    panels = [(t, n) for n in noises for t in temps]  # a panel per temperature (and per label noise, if varied)
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE[0] * len(panels) ** 0.5 * 1.2, FIGSIZE[1]), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (temp, noise) in zip(axes[0], panels, strict=True):
        for i, epochs in enumerate(sorted(students["epochs"].dropna().unique())):
            here = (students["epochs"] == epochs) & (students["temperature"] == temp) & (students["label_noise"] == noise)
            rows = students[here].sort_values("alpha")
            _errorbar(ax, rows["alpha"], rows, color=colors(i), label=f"distilled, {epochs} epoch{'s' if epochs != 1 else ''}")
            base = scratch[(scratch["epochs"] == epochs) & (scratch["label_noise"] == noise)]
            if len(base):
                ax.axhline(100 * float(base["mean"].iloc[0]), color=colors(i), linestyle="--", linewidth=1, label=f"scratch, {epochs} epoch{'s' if epochs != 1 else ''}")
        ax.set_title(f"T = {temp:g}" + (f", label noise {noise:g}" if len(noises) > 1 else ""))
        ax.set_xlabel("alpha (weight of the hard-label loss)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    n_note = "mean and 95% CI over seeds" if (summary["n"] >= 2).any() else "one seed per point"
    fig.suptitle(f"Student test accuracy vs alpha ({n_note})")
    return _save(fig, out / "accuracy_vs_alpha.png")


def fig_loss_vs_alpha(summary: pd.DataFrame, out: Path) -> Path:
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
    _finish(ax, "alpha (weight of the hard-label loss)", "loss (nats, mean per image)", f"Losses vs alpha ({epochs} epochs, T = {temp:g})")
    return _save(fig, out / "loss_vs_alpha.png")


def fig_heatmap(summary: pd.DataFrame, out: Path) -> Path | None:
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
    ax.set_title(f"Mean test accuracy (%), {epochs} epochs")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    return _save(fig, out / "heatmap_alpha_temperature.png")


def fig_learning_curves(client: MlflowClient, runs: pd.DataFrame, best: Best, out: Path) -> Path:
    done = runs[runs["status"] == "FINISHED"]
    epochs = best.epochs
    mine = done[done["run_id"] == best.run_id]
    scratch = done[(done["role"] == "scratch") & (done["epochs"] == epochs) & (done["label_noise"] == best.label_noise)]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for rows, label, color in ((mine, f"best: alpha = {best.alpha:g}, T = {best.temperature:g}", "tab:orange"),
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


def make_report(name: str, tracking_uri: str, out: Path) -> Report:
    runs, _, parent = load_runs(name, tracking_uri)
    if runs.empty:
        raise UsageError(f"sweep {name!r} has no student runs yet in {tracking_uri}; allowed: a sweep with at least one run")
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    summary = summarize(runs)
    best = best_config(runs, summary)
    best_distilled = best_config(runs, summary, distilled_only=True)
    files = [out / "runs.csv", out / "summary.csv"]
    runs.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    report = Report(name, runs, summary, best, best_distilled, files, int((runs["status"] != "FINISHED").sum()))
    if not summary.empty:
        files.append(fig_accuracy_vs_alpha(summary, out))
        files.append(fig_loss_vs_alpha(summary, out))
        heat = fig_heatmap(summary, out)
        if heat is not None:
            files.append(heat)
        if best is not None:
            files.append(fig_learning_curves(client, runs, best, out))
            confusion = fig_confusion(client, best, out)
            if confusion is not None:
                files.append(confusion)
    md = out / "summary.md"
    md.write_text(report.markdown())
    files.append(md)
    for f in files:
        client.log_artifact(parent, str(f), artifact_path="report")
    return report
