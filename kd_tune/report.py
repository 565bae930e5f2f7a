"""Reports: the study's tables and figures, read back from MLflow.

``kd-tune report NAME`` reads every run of a sweep (``mlflow.search_runs`` -> pandas), writes a
tidy CSV (one row per grid point and seed), a summary table (mean, 95 % CI and n over seeds; the
best configuration and its gain over scratch training) and PNG figures, and logs all of them as
artifacts of the sweep's parent run.

Honest statistics: the best configuration is selected on the validation split (mean validation
accuracy over seeds) and reported with its *test* accuracy; a sweep without a validation split selects
on the test set, and the report says that this is optimistic. Intervals are 95 % Student-t over the
seeds of a configuration. A distilled student and the scratch student of the same seed start from the
same weights and see the same data order, so the gain over scratch is computed pairwise (same epochs,
seed and label noise): mean gain, paired-t interval, n pairs and on how many seeds it was positive.
Welch's interval is used only where no pairs exist. With one seed there is no interval, and the
report says so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
           "train_loss", "train_hard_loss", "train_distill_loss", "val_acc", "val_loss"]
GAIN_KEYS = ["label_noise", "alpha", "temperature", "epochs"]
FIGSIZE = (8.0, 5.0)
DPI = 100


@dataclass(frozen=True)
class Best:
    """The selected configuration: its test accuracy and its gain over scratch (paired where possible)."""

    alpha: float
    temperature: float
    epochs: int
    mean: float
    """Mean test accuracy over seeds (what is reported)."""
    n: int
    gain: float
    gain_ci_low: float | None
    gain_ci_high: float | None
    run_id: str
    label_noise: float = 0.0
    ci_low: float | None = None
    ci_high: float | None = None
    val_mean: float | None = None
    """Mean validation accuracy over seeds (what selected it; None without a validation split)."""
    gain_test: str = "paired t"
    """How the gain's interval was computed: "paired t" over seeds, or "Welch" where no pairs exist."""
    gain_n: int = 0
    gain_positive: int = 0
    """Seeds on which the gain was > 0 (paired only)."""

    @property
    def ci_excludes_zero(self) -> bool | None:
        if self.gain_ci_low is None or self.gain_ci_high is None:
            return None
        return self.gain_ci_low > 0 or self.gain_ci_high < 0


@dataclass(frozen=True)
class Protocol:
    """How the numbers of a report were made: preprocessing, split and selection rule."""

    preprocessing: str
    train_size: str
    val_size: int

    @property
    def selected_on(self) -> str:
        return "validation" if self.val_size > 0 else "test"

    def describe(self) -> str:
        rule = (f"selection: the highest mean validation accuracy over seeds ({self.val_size} training images held out); "
                "reported: that configuration's test accuracy" if self.val_size > 0 else
                "selection: on the TEST set (no validation split, val_size 0): the best configuration's accuracy is optimistic")
        return f"Preprocessing: {self.preprocessing}; training images: {self.train_size}; {rule}."


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

    def markdown(self) -> str:
        lines = [f"# Sweep {self.name!r}", "", self.protocol.describe(), ""]
        if self.unfinished:
            lines += [f"Note: {self.unfinished} grid point(s) have not finished; this report covers what exists.", ""]
        shown = self.summary.copy()
        shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
        shown["mean acc %"] = (100 * shown["mean"]).map(lambda v: f"{v:.2f}")
        shown["95% CI %"] = shown.apply(lambda r: "n/a (n=1)" if r["n"] < 2 else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]", axis=1)
        cols = ["role", "alpha", "temperature", "epochs", "n", "mean acc %", "95% CI %"]
        if shown["val_mean"].notna().any():
            shown["val acc %"] = (100 * shown["val_mean"]).map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
            cols.append("val acc %")
        if shown["label_noise"].nunique() > 1:
            cols.insert(1, "label_noise")
        lines += ["Test accuracy per configuration (mean over seeds):", "", markdown_table(shown[cols]), ""]
        if not self.gains.empty:
            g = self.gains.copy()
            g["temperature"] = g["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
            g["gain pp"] = (100 * g["gain"]).map(lambda v: f"{v:+.2f}")
            g["95% CI pp"] = g.apply(lambda r: "n/a" if pd.isna(r["ci_low"]) else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]", axis=1)
            g["positive"] = g.apply(lambda r: f"{int(r['positive'])}/{int(r['n'])}" if r["test"] == "paired t" else "-", axis=1)
            cols = ["alpha", "temperature", "epochs", "n", "gain pp", "95% CI pp", "test", "positive"]
            if g["label_noise"].nunique() > 1:
                cols.insert(0, "label_noise")
            lines += ["Gain over scratch (same epochs, seed and label noise; test accuracy, percentage points):", "",
                      markdown_table(g[cols]), ""]
        for title, b in (("Best configuration", self.best), ("Best distilled configuration (alpha < 1)", self.best_distilled)):
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
        return (f"{title}: alpha = {b.alpha:g}, T = {b.temperature:g}, {b.epochs} epochs{noise} ({chosen}): "
                f"test accuracy {100 * b.mean:.2f} %{acc_ci} (n = {b.n}); over scratch at {b.epochs} epochs: {gain}, {ci}.")


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
        # How the data was made (runs logged before these keys existed standardized and had no validation split).
        "normalize": raw.get("params.dataset.normalize", pd.Series("True", index=raw.index, dtype=str)).fillna("True") == "True",
        "val_size": pd.to_numeric(raw.get("params.dataset.val_size", pd.Series(0, index=raw.index))).fillna(0).astype(int),
        "train_size": raw.get("params.dataset.train_size", pd.Series("None", index=raw.index, dtype=str)).fillna("None"),
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


def paired_interval(a: pd.Series, b: pd.Series) -> tuple[float, float | None, float | None, int, int]:
    """Mean of the per-seed differences a - b (both indexed by seed; seeds on one side only are dropped)
    with its paired-t 95 % interval, the number of pairs and on how many the difference was > 0."""
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    d = (both["a"] - both["b"]).astype(float)
    mean, lo, hi, n = t_interval(d)
    if n >= 2 and float(d.std(ddof=1)) == 0.0:
        lo = hi = mean
    return mean, (None if math.isnan(lo) else lo), (None if math.isnan(hi) else hi), n, int((d > 0).sum())


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95 % CI and n of the test accuracy over seeds, and the mean validation accuracy, per
    configuration (finished runs only)."""
    done = runs[runs["status"] == "FINISHED"]
    keys = ["role", "label_noise", "alpha", "temperature", "epochs"]
    rows = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        mean, lo, hi, n = t_interval(group["test_acc"])
        val = group["val_acc"].dropna() if "val_acc" in group else pd.Series(dtype=float)
        rows.append({**dict(zip(keys, key, strict=True)), "n": n, "mean": mean, "ci_low": lo, "ci_high": hi,
                     "val_mean": float(val.mean()) if len(val) else math.nan,
                     "test_loss": group["test_loss"].mean(), "train_hard_loss": group["train_hard_loss"].mean(),
                     "train_distill_loss": group["train_distill_loss"].mean()})
    return pd.DataFrame(rows, columns=[*keys, "n", "mean", "ci_low", "ci_high", "val_mean", "test_loss", "train_hard_loss", "train_distill_loss"])


def _baseline(done: pd.DataFrame, noise: float, epochs: int, temperature: float) -> pd.DataFrame:
    """The scratch runs a configuration is compared with: the scratch baseline at the same epochs and
    label noise, else the alpha = 1 students (hard labels alone: the same training) at the same T."""
    same = (done["epochs"] == epochs) & (done["label_noise"] == noise)
    scratch = done[same & (done["role"] == "scratch")]
    if scratch.empty:
        scratch = done[same & (done["role"] == "student") & (done["alpha"] == 1.0) & (done["temperature"] == temperature)]
    return scratch


def gains_over_scratch(runs: pd.DataFrame) -> pd.DataFrame:
    """Per distilled configuration: the gain in test accuracy over scratch, paired by seed (paired t),
    or Welch's interval where no seed has both (then ``positive`` is not defined)."""
    done = runs[runs["status"] == "FINISHED"]
    rows = []
    students = done[(done["role"] == "student") & (done["alpha"] < 1.0)]
    for key, mine in students.groupby(GAIN_KEYS, sort=True):
        noise, alpha, temperature, epochs = key
        base = _baseline(done, noise, epochs, temperature)
        if base.empty:
            continue
        a, b = mine.groupby("seed")["test_acc"].mean(), base.groupby("seed")["test_acc"].mean()
        gain, lo, hi, n, positive = paired_interval(a, b)
        test = "paired t"
        if n == 0:
            gain, lo, hi = welch_interval(mine["test_acc"], base["test_acc"])
            n, positive, test = min(len(mine), len(base)), 0, "Welch"
        rows.append({"label_noise": noise, "alpha": alpha, "temperature": temperature, "epochs": epochs, "n": n,
                     "gain": gain, "ci_low": lo, "ci_high": hi, "positive": positive, "test": test})
    cols = [*GAIN_KEYS, "n", "gain", "ci_low", "ci_high", "positive", "test"]
    return pd.DataFrame(rows, columns=cols).astype({"ci_low": float, "ci_high": float})


def best_config(runs: pd.DataFrame, summary: pd.DataFrame, gains: pd.DataFrame, distilled_only: bool = False,
                select_on: str = "validation") -> Best | None:
    """The student configuration with the highest mean validation accuracy (``select_on="test"``, or no
    validation split: the highest mean test accuracy), with its test accuracy and its gain over scratch
    at the same epochs (from ``gains``, :func:`gains_over_scratch`). ``distilled_only`` keeps alpha < 1
    (the configurations that learn from the teacher at all)."""
    students = summary[(summary["role"] == "student") & ((summary["alpha"] < 1.0) if distilled_only else True)]
    if students.empty:
        return None
    column = "val_mean" if select_on == "validation" and students["val_mean"].notna().all() else "mean"
    b = students.sort_values(column, ascending=False, kind="stable").iloc[0]
    noise, epochs, alpha, temp = float(b["label_noise"]), int(b["epochs"]), float(b["alpha"]), float(b["temperature"])
    done = runs[runs["status"] == "FINISHED"]
    mine = done[(done["role"] == "student") & (done["epochs"] == epochs) & (done["label_noise"] == noise)
                & (done["alpha"] == alpha) & (done["temperature"] == temp)]
    gain, lo, hi, n, positive, test = math.nan, None, None, 0, 0, "paired t"
    row = gains[(gains["label_noise"] == noise) & (gains["alpha"] == alpha) & (gains["temperature"] == temp) & (gains["epochs"] == epochs)]
    if len(row):
        r = row.iloc[0]
        gain, n, positive, test = float(r["gain"]), int(r["n"]), int(r["positive"]), str(r["test"])
        lo, hi = (None if pd.isna(r["ci_low"]) else float(r["ci_low"])), (None if pd.isna(r["ci_high"]) else float(r["ci_high"]))
    elif alpha == 1.0:  # hard labels alone: compared with the scratch baseline of the same seeds (a zero gain)
        base = _baseline(done, noise, epochs, temp)
        if len(base):
            gain, lo, hi, n, positive = paired_interval(mine.groupby("seed")["test_acc"].mean(), base.groupby("seed")["test_acc"].mean())
    best_run = str(mine.sort_values("val_acc" if column == "val_mean" else "test_acc", kind="stable").iloc[-1]["run_id"])
    return Best(alpha, temp, epochs, float(b["mean"]), int(b["n"]), gain, lo, hi, best_run, noise,
                None if pd.isna(b["ci_low"]) else float(b["ci_low"]), None if pd.isna(b["ci_high"]) else float(b["ci_high"]),
                None if pd.isna(b["val_mean"]) else float(b["val_mean"]), test, n, positive)


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
                b = base.iloc[0]
                ax.axhline(100 * float(b["mean"]), color=colors(i), linestyle="--", linewidth=1, label=f"scratch, {epochs} epoch{'s' if epochs != 1 else ''}")
                if b["n"] >= 2:  # the baseline has its own uncertainty: draw its interval as a band
                    ax.axhspan(100 * float(b["ci_low"]), 100 * float(b["ci_high"]), color=colors(i), alpha=0.12, linewidth=0)
        ax.set_title(f"T = {temp:g}" + (f", label noise {noise:g}" if len(noises) > 1 else ""))
        ax.set_xlabel("alpha (weight of the hard-label loss)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    n_note = "mean and 95% CI over seeds" if (summary["n"] >= 2).any() else "one seed per point"
    fig.suptitle(f"Student test accuracy vs alpha ({n_note})")
    return _save(fig, out / "accuracy_vs_alpha.png")


def fig_gain_vs_alpha(gains: pd.DataFrame, out: Path) -> Path | None:
    """Gain over scratch (test accuracy, points) vs alpha with its interval: a line per epochs value,
    a panel per temperature and label noise."""
    if gains.empty:
        return None
    temps = sorted(gains["temperature"].dropna().unique())
    noises = sorted(gains["label_noise"].unique())
    panels = [(t, n) for n in noises for t in temps]
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE[0] * len(panels) ** 0.5 * 1.2, FIGSIZE[1]), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (temp, noise) in zip(axes[0], panels, strict=True):
        for i, epochs in enumerate(sorted(gains["epochs"].unique())):
            rows = gains[(gains["epochs"] == epochs) & (gains["temperature"] == temp) & (gains["label_noise"] == noise)].sort_values("alpha")
            if rows.empty:
                continue
            err = None
            if rows["ci_low"].notna().any():
                err = [100 * (rows["gain"] - rows["ci_low"]).fillna(0), 100 * (rows["ci_high"] - rows["gain"]).fillna(0)]
            ax.errorbar(rows["alpha"], 100 * rows["gain"], yerr=err, capsize=3, marker="o", color=colors(i),
                        label=f"{epochs} epoch{'s' if epochs != 1 else ''} (n = {int(rows['n'].max())}, {rows['test'].iloc[0]})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"T = {temp:g}" + (f", label noise {noise:g}" if len(noises) > 1 else ""))
        ax.set_xlabel("alpha (weight of the hard-label loss)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gain over scratch (test accuracy, points)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Gain of distillation over scratch, same seeds (mean and 95% CI)")
    return _save(fig, out / "gain_vs_alpha.png")


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


def protocol_of(runs: pd.DataFrame) -> Protocol:
    """The preprocessing, training-set size and validation split the runs were made with."""

    def one(values: pd.Series, show: Callable[[Any], str]) -> str:
        distinct = sorted({show(v) for v in values})
        return distinct[0] if len(distinct) == 1 else "mixed (" + ", ".join(distinct) + ")"

    preprocessing = one(runs["normalize"], lambda v: "mean/std standardization" if v else "pixel / 255")
    train = one(runs["train_size"], lambda v: "all" if v in ("None", "null", "") else str(v))
    return Protocol(preprocessing, train, int(runs["val_size"].min()) if len(runs) else 0)


def make_report(name: str, tracking_uri: str, out: Path) -> Report:
    """Read the sweep's runs, write the CSVs, summary and figures into ``out`` and log them on the parent run.

    Raises :class:`UsageError` for an unknown sweep or one without student runs.
    """
    runs, _, parent = load_runs(name, tracking_uri)
    if runs.empty:
        raise UsageError(f"sweep {name!r} has no student runs yet in {tracking_uri}; allowed: a sweep with at least one run")
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    protocol = protocol_of(runs)
    summary = summarize(runs)
    gains = gains_over_scratch(runs)
    best = best_config(runs, summary, gains, select_on=protocol.selected_on)
    best_distilled = best_config(runs, summary, gains, distilled_only=True, select_on=protocol.selected_on)
    files = [out / "runs.csv", out / "summary.csv", out / "gains.csv"]
    runs.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    gains.to_csv(files[2], index=False)
    report = Report(name, runs, summary, gains, best, best_distilled, files, int((runs["status"] != "FINISHED").sum()), protocol)
    if not summary.empty:
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
    md = out / "summary.md"
    md.write_text(report.markdown())
    files.append(md)
    for f in files:
        client.log_artifact(parent, str(f), artifact_path="report")
    return report


def log_sweep_summary(name: str, tracking_uri: str) -> Best | None:
    """The report's choice as metrics and tags of the sweep's parent run, so the MLflow UI shows which
    configuration won, by how much and over how many seeds (written again at every sweep's or resume's
    end: the latest values win). Returns the best configuration, None while no student run finished."""
    runs, _, parent = load_runs(name, tracking_uri)
    if runs.empty:
        return None
    protocol, summary, gains = protocol_of(runs), summarize(runs), gains_over_scratch(runs)
    best = best_config(runs, summary, gains, select_on=protocol.selected_on)
    best_distilled = best_config(runs, summary, gains, distilled_only=True, select_on=protocol.selected_on)
    metrics: dict[str, float] = {}
    tags = {"kd_tune.selected_on": protocol.selected_on, "kd_tune.preprocessing": protocol.preprocessing}
    for prefix, b in (("best", best), ("best_distilled", best_distilled)):
        if b is None:
            continue
        values = {"test_acc": b.mean, "test_acc_ci_low": b.ci_low, "test_acc_ci_high": b.ci_high, "n": b.n, "val_acc": b.val_mean,
                  "gain_over_scratch": b.gain, "gain_ci_low": b.gain_ci_low, "gain_ci_high": b.gain_ci_high,
                  "gain_positive_seeds": b.gain_positive if b.gain_test == "paired t" else None}
        metrics |= {f"{prefix}_{k}": float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}
        tags |= {f"kd_tune.{prefix}.alpha": f"{b.alpha:g}", f"kd_tune.{prefix}.temperature": f"{b.temperature:g}",
                 f"kd_tune.{prefix}.epochs": str(b.epochs), f"kd_tune.{prefix}.label_noise": f"{b.label_noise:g}",
                 f"kd_tune.{prefix}.run_id": b.run_id, f"kd_tune.{prefix}.gain_test": b.gain_test}
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                         tags=[RunTag(k, v) for k, v in tags.items()])
    return best
