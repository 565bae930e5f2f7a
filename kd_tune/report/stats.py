"""The statistics of a sweep's runs over seeds: intervals, paired gains over scratch, and the
selection rule (on validation, reported on test).

Intervals are 95 % Student-t over the seeds of a configuration. A distilled student and the scratch
student of the same seed start from the same weights and see the same data order, so the gain over
scratch is computed pairwise (same epochs, seed and label noise): mean gain, paired-t interval, n pairs
and on how many seeds it was positive. Welch's interval is used only where no pairs exist. With one
seed there is no interval. A gains table tests many configurations at once, so each gain's p-value (of
gain = 0) comes with its Holm adjustment over the table (family-wise error rate): with 40 configurations and
no real effect, about two unadjusted 95 % intervals would exclude zero by chance. A configuration's distillation method
and knobs are part of what it is (:data:`GAIN_KEYS`): configurations of different methods are never merged. Plain pandas and scipy:
:mod:`kd_tune.report.report` draws and writes the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from scipy import stats

from kd_tune.report.configs import DEFAULT_KNOBS, learns_from_teacher, with_config_columns
from kd_tune.space.methods import DEFAULT_METHOD

GAIN_KEYS = ["student", "teacher", "label_noise", "method", "knobs", "alpha", "temperature", "epochs"]
"""What a distilled configuration is (``student`` and ``teacher``: the grid's axes of models, "" without them; ``method``
and ``knobs``: its distillation method and that method's knobs, :mod:`kd_tune.report.configs`)."""
SUMMARY_KEYS = ["role", *GAIN_KEYS]
"""What a configuration of a summary is: a role (student or scratch) and the keys of a distilled one."""


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
    student: str = ""
    """Its ``grid.student`` entry ("" without that axis)."""
    teacher: str = ""
    """Its ``grid.teacher`` entry ("" without that axis)."""
    method: str = DEFAULT_METHOD
    """Its distillation method."""
    knobs: str = DEFAULT_KNOBS
    """Its method's knobs (:func:`kd_tune.report.configs.knobs_key`)."""
    variant: str = DEFAULT_METHOD
    """Its method as the report compares it (``kd``, ``kd+ls``, ``dkd``)."""

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


def protocol_of(runs: pd.DataFrame) -> Protocol:
    """The preprocessing, training-set size and validation split the runs were made with."""

    def one(values: pd.Series, show: Callable[[Any], str]) -> str:
        distinct = sorted({show(v) for v in values})
        return distinct[0] if len(distinct) == 1 else "mixed (" + ", ".join(distinct) + ")"

    preprocessing = one(runs["normalize"], lambda v: "mean/std standardization" if v else "pixel / 255")
    train = one(runs["train_size"], lambda v: "all" if v in ("None", "null", "") else str(v))
    return Protocol(preprocessing, train, int(runs["val_size"].min()) if len(runs) else 0)


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


def paired_differences(a: pd.Series, b: pd.Series) -> pd.Series:
    """a - b per seed (both indexed by seed), over the seeds both have."""
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    return (both["a"] - both["b"]).astype(float)


def paired_interval(a: pd.Series, b: pd.Series) -> tuple[float, float | None, float | None, int, int]:
    """Mean of the per-seed differences a - b (both indexed by seed; seeds on one side only are dropped)
    with its paired-t 95 % interval, the number of pairs and on how many the difference was > 0."""
    d = paired_differences(a, b)
    mean, lo, hi, n = t_interval(d)
    if n >= 2 and float(d.std(ddof=1)) == 0.0:
        lo = hi = mean
    return mean, (None if math.isnan(lo) else lo), (None if math.isnan(hi) else hi), n, int((d > 0).sum())


def paired_p(a: pd.Series, b: pd.Series) -> float:
    """Two-sided p-value of the paired t-test of mean(a - b) = 0 over the seeds both have (nan for fewer than 2
    pairs). Differences that are all equal give 0 when they are not zero, 1 when they are (no spread to test)."""
    d = paired_differences(a, b)
    if len(d) < 2:
        return math.nan
    if float(d.std(ddof=1)) == 0.0:
        return 0.0 if float(d.mean()) != 0.0 else 1.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def welch_p(a: pd.Series, b: pd.Series) -> float:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b) (nan when either side has fewer than 2 values;
    with no spread on either side, 0 when the means differ and 1 when they do not, as :func:`paired_p`)."""
    a, b = a.dropna().astype(float), b.dropna().astype(float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return 0.0 if float(a.mean()) != float(b.mean()) else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjustment of the p-values (Holm 1979): the i-th smallest of the m finite ones becomes
    max over j <= i of min(1, (m - j + 1) p_(j)); nan stays nan. Rejecting where the adjusted p < 0.05 keeps the
    chance of any false "gain != 0" in the whole table at 5 %, under any dependence between the tests."""
    finite = p.dropna().astype(float).sort_values(kind="stable")
    m = len(finite)
    adjusted, running = {}, 0.0
    for j, (index, value) in enumerate(finite.items()):
        running = max(running, min(1.0, (m - j) * value))
        adjusted[index] = running
    return pd.Series([adjusted.get(i, math.nan) for i in p.index], index=p.index, dtype=float)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95 % CI and n of the test accuracy over seeds, and the mean validation accuracy, per
    configuration (finished runs only)."""
    runs = with_config_columns(runs)
    done = runs[runs["status"] == "FINISHED"]
    keys = SUMMARY_KEYS
    rows = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        mean, lo, hi, n = t_interval(group["test_acc"])
        val = group["val_acc"].dropna() if "val_acc" in group else pd.Series(dtype=float)
        rows.append({**dict(zip(keys, key, strict=True)), "variant": group["variant"].iloc[0], "n": n, "mean": mean, "ci_low": lo, "ci_high": hi,
                     "val_mean": float(val.mean()) if len(val) else math.nan,
                     "test_loss": group["test_loss"].mean(), "train_hard_loss": group["train_hard_loss"].mean(),
                     "train_distill_loss": group["train_distill_loss"].mean()})
    return pd.DataFrame(rows, columns=[*keys, "variant", "n", "mean", "ci_low", "ci_high", "val_mean", "test_loss", "train_hard_loss", "train_distill_loss"])


def _baseline(done: pd.DataFrame, noise: float, epochs: int, temperature: float, student: str = "", teacher: str = "") -> pd.DataFrame:
    """The scratch runs a configuration is compared with: the scratch baseline of the same student at the same epochs
    and label noise, else the kd students with alpha = 1 (hard labels alone: the same training) at the same T. Only kd's:
    another method's alpha = 1 still distills (its terms have weights of their own)."""
    done = with_config_columns(done)
    same = (done["epochs"] == epochs) & (done["label_noise"] == noise) & (done["student"] == student)
    scratch = done[same & (done["role"] == "scratch")]
    if scratch.empty:
        scratch = done[same & (done["role"] == "student") & (done["method"] == DEFAULT_METHOD) & (done["alpha"] == 1.0)
                       & (done["temperature"] == temperature) & (done["teacher"] == teacher)]
    return scratch


def config_runs(done: pd.DataFrame, config: pd.Series | Best) -> pd.DataFrame:
    """The student runs of one configuration (a summary's or gains' row, or a :class:`Best`): same keys of :data:`GAIN_KEYS`."""
    done = with_config_columns(done)
    mask = done["role"] == "student"
    for key in GAIN_KEYS:
        value = config[key] if isinstance(config, pd.Series) else getattr(config, key)
        mask &= done[key].isna() if pd.isna(value) else done[key] == value
    return done[mask]


def gains_over_scratch(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration that learns from the teacher (kd with alpha < 1, any configuration of another method:
    :func:`~kd_tune.report.configs.learns_from_teacher`): the gain in test accuracy over scratch, paired by seed (paired t),
    or Welch's interval where no seed has both (then ``positive`` is not defined); ``p``, the test's
    p-value of gain = 0, and ``p_holm``, adjusted over every configuration of the table (:func:`holm`)."""
    runs = with_config_columns(runs)
    done = runs[runs["status"] == "FINISHED"]
    rows = []
    students = done[learns_from_teacher(done)]
    for key, mine in students.groupby(GAIN_KEYS, sort=True):
        student, teacher, noise, method, knobs, alpha, temperature, epochs = key
        base = _baseline(done, noise, epochs, temperature, student, teacher)
        if base.empty:
            continue
        a, b = mine.groupby("seed")["test_acc"].mean(), base.groupby("seed")["test_acc"].mean()
        gain, lo, hi, n, positive = paired_interval(a, b)
        test, p = "paired t", paired_p(a, b)
        if n == 0:
            gain, lo, hi = welch_interval(mine["test_acc"], base["test_acc"])
            n, positive, test, p = min(len(mine), len(base)), 0, "Welch", welch_p(mine["test_acc"], base["test_acc"])
        rows.append({"student": student, "teacher": teacher, "label_noise": noise, "method": method, "knobs": knobs, "alpha": alpha,
                     "temperature": temperature, "epochs": epochs, "variant": mine["variant"].iloc[0], "n": n,
                     "gain": gain, "ci_low": lo, "ci_high": hi, "positive": positive, "test": test, "p": p})
    cols = [*GAIN_KEYS, "variant", "n", "gain", "ci_low", "ci_high", "positive", "test", "p"]
    table = pd.DataFrame(rows, columns=cols).astype({"ci_low": float, "ci_high": float, "p": float})
    table["p_holm"] = holm(table["p"])
    return table


def selection_column(candidates: pd.DataFrame, select_on: str = "validation") -> str:
    """The summary column a selection among ``candidates`` is made on: ``val_mean`` (each has a validation accuracy and
    ``select_on`` is "validation"), else ``mean`` (the test accuracy: optimistic)."""
    return "val_mean" if select_on == "validation" and candidates["val_mean"].notna().all() else "mean"


def select_row(candidates: pd.DataFrame, select_on: str = "validation") -> pd.Series:
    """The summary row with the highest mean validation accuracy (:func:`selection_column`). An exact tie (common with a few
    hundred test images) goes to the larger alpha, then the lower T, as in report.models' best alphas: a tie is no
    evidence for the teacher; then to the summary's order."""
    column = selection_column(candidates, select_on)
    ordered = candidates.sort_values(["alpha", "temperature"], ascending=[False, True], kind="stable")
    return ordered.sort_values(column, ascending=False, kind="stable").iloc[0]


def best_config(runs: pd.DataFrame, summary: pd.DataFrame, gains: pd.DataFrame, distilled_only: bool = False,
                select_on: str = "validation") -> Best | None:
    """The student configuration with the highest mean validation accuracy (``select_on="test"``, or no
    validation split: the highest mean test accuracy; a tie: the larger alpha, then the lower T), with its
    test accuracy and its gain over scratch at the same epochs (from ``gains``, :func:`gains_over_scratch`).
    ``distilled_only`` keeps the configurations that learn from the teacher at all (kd with alpha < 1, any configuration
    of another method). ``summary`` may be a part of :func:`summarize`'s (one method's configurations): the candidates."""
    runs, summary, gains = with_config_columns(runs), with_config_columns(summary), with_config_columns(gains)
    students = summary[learns_from_teacher(summary)] if distilled_only else summary[summary["role"] == "student"]
    if students.empty:
        return None
    column = selection_column(students, select_on)
    b = select_row(students, select_on)
    noise, epochs, alpha, temp = float(b["label_noise"]), int(b["epochs"]), float(b["alpha"]), float(b["temperature"])
    student, teacher, method, knobs = str(b["student"]), str(b["teacher"]), str(b["method"]), str(b["knobs"])
    done = runs[runs["status"] == "FINISHED"]
    mine = config_runs(done, b)
    gain, lo, hi, n, positive, test = math.nan, None, None, 0, 0, "paired t"
    row = gains[(gains[GAIN_KEYS] == b[GAIN_KEYS]).all(axis=1)] if len(gains) else gains
    if len(row):
        r = row.iloc[0]
        gain, n, positive, test = float(r["gain"]), int(r["n"]), int(r["positive"]), str(r["test"])
        lo, hi = (None if pd.isna(r["ci_low"]) else float(r["ci_low"])), (None if pd.isna(r["ci_high"]) else float(r["ci_high"]))
    elif alpha == 1.0 and method == DEFAULT_METHOD:  # hard labels alone: compared with the scratch baseline of the same seeds (a zero gain)
        base = _baseline(done, noise, epochs, temp, student, teacher)
        if len(base):
            gain, lo, hi, n, positive = paired_interval(mine.groupby("seed")["test_acc"].mean(), base.groupby("seed")["test_acc"].mean())
    best_run = str(mine.sort_values("val_acc" if column == "val_mean" else "test_acc", kind="stable").iloc[-1]["run_id"])
    return Best(alpha, temp, epochs, float(b["mean"]), int(b["n"]), gain, lo, hi, best_run, noise,
                None if pd.isna(b["ci_low"]) else float(b["ci_low"]), None if pd.isna(b["ci_high"]) else float(b["ci_high"]),
                None if pd.isna(b["val_mean"]) else float(b["val_mean"]), test, n, positive, student, teacher, method, knobs,
                str(b["variant"]))
