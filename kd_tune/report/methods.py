"""The report's per-method section: for a sweep whose grid has a method axis, each variant's best configuration.

Per variant (``kd``, ``kd+ls``, ``kd+reverse_kl``, ``dkd``, ``dist``: :func:`kd_tune.space.methods.variant`), the
student configuration selected as :func:`kd_tune.report.stats.best_config` selects (the highest mean validation accuracy
over seeds; the test set where the sweep has no validation split; a tie: the larger alpha, then the lower T) among that
variant's configurations, reported with its test accuracy (mean, 95 % t-interval, n), its gain over scratch (same student,
label noise and epochs, paired by seed: :func:`~kd_tune.report.stats.gains_over_scratch`) and its gain over the best
``kd`` configuration (the variant ``kd`` selected the same way; paired by seed, :func:`~kd_tune.report.stats.paired_interval`).
Plain pandas.
"""

from __future__ import annotations

import math

import pandas as pd

from kd_tune.report.configs import method_order, with_config_columns
from kd_tune.report.stats import Best, best_config, config_runs, paired_interval
from kd_tune.report.tables import markdown_table
from kd_tune.space.methods import DEFAULT_METHOD

METHODS_COLUMNS = ["variant", "method", "knobs", "student", "teacher", "label_noise", "alpha", "temperature", "epochs", "n", "val_mean",
                   "test_mean", "test_ci_low", "test_ci_high", "gain_scratch", "gain_scratch_ci_low", "gain_scratch_ci_high",
                   "gain_scratch_n", "gain_scratch_test", "gain_kd", "gain_kd_ci_low", "gain_kd_ci_high", "gain_kd_n", "gain_kd_positive",
                   "selected_on", "run_id"]


def variants(summary: pd.DataFrame) -> list[str]:
    """The variants of the summary's students, ``kd`` first."""
    summary = with_config_columns(summary)
    return method_order(summary.loc[summary["role"] == "student", "variant"])


def best_per_variant(runs: pd.DataFrame, summary: pd.DataFrame, gains: pd.DataFrame, select_on: str = "validation") -> dict[str, Best]:
    """Each variant's configuration selected as :func:`best_config` selects, among that variant's student configurations."""
    summary = with_config_columns(summary)
    chosen = {}
    for v in variants(summary):
        best = best_config(runs, summary[(summary["role"] == "student") & (summary["variant"] == v)], gains, select_on=select_on)
        if best is not None:
            chosen[v] = best
    return chosen


def _per_seed(runs: pd.DataFrame, best: Best) -> pd.Series:
    done = with_config_columns(runs)
    return config_runs(done[done["status"] == "FINISHED"], best).groupby("seed")["test_acc"].mean()


def per_variant(runs: pd.DataFrame, summary: pd.DataFrame, gains: pd.DataFrame, select_on: str = "validation") -> pd.DataFrame:
    """One row per variant: its selected configuration, its test accuracy, its gain over scratch and over the best ``kd``
    configuration (``gain_kd``: nan on kd's own row, and where the sweep has no kd students). ``selected_on``: validation,
    or test where a candidate has no validation accuracy (or ``select_on`` is "test")."""
    chosen = best_per_variant(runs, summary, gains, select_on)
    reference = chosen.get(DEFAULT_METHOD)
    kd_seeds = _per_seed(runs, reference) if reference is not None else None
    rows = []
    for v, b in chosen.items():
        gain_kd, lo, hi, n, positive = math.nan, None, None, 0, 0
        if kd_seeds is not None and v != DEFAULT_METHOD:
            gain_kd, lo, hi, n, positive = paired_interval(_per_seed(runs, b), kd_seeds)
        rows.append({"variant": v, "method": b.method, "knobs": b.knobs, "student": b.student, "teacher": b.teacher, "label_noise": b.label_noise,
                     "alpha": b.alpha, "temperature": b.temperature, "epochs": b.epochs, "n": b.n,
                     "val_mean": math.nan if b.val_mean is None else b.val_mean, "test_mean": b.mean,
                     "test_ci_low": math.nan if b.ci_low is None else b.ci_low, "test_ci_high": math.nan if b.ci_high is None else b.ci_high,
                     "gain_scratch": b.gain, "gain_scratch_ci_low": math.nan if b.gain_ci_low is None else b.gain_ci_low,
                     "gain_scratch_ci_high": math.nan if b.gain_ci_high is None else b.gain_ci_high, "gain_scratch_n": b.gain_n,
                     "gain_scratch_test": b.gain_test, "gain_kd": gain_kd if n else math.nan,
                     "gain_kd_ci_low": math.nan if lo is None else lo, "gain_kd_ci_high": math.nan if hi is None else hi, "gain_kd_n": n,
                     "gain_kd_positive": positive,
                     "selected_on": "validation" if select_on == "validation" and b.val_mean is not None else "test", "run_id": b.run_id})
    return pd.DataFrame(rows, columns=METHODS_COLUMNS)


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.2f}"


def _gain(g: float, lo: float, hi: float, extra: str = "") -> str:
    if pd.isna(g):
        return "n/a"
    ci = "n/a" if pd.isna(lo) or pd.isna(hi) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{100 * g:+.2f} {ci}{extra}"


def methods_markdown(table: pd.DataFrame) -> str:
    """The per-variant table in Markdown, its header naming the selection rule and the split it was made on."""
    on_test = (table["selected_on"] == "test").any()
    rule = ("selected on the TEST set (no validation split): the highest mean test accuracy over seeds, which is optimistic"
            if on_test else "selected on validation: the highest mean validation accuracy over seeds")
    shown = pd.DataFrame({
        "variant": table["variant"], "knobs": table["knobs"], "alpha": table["alpha"].map(lambda v: f"{v:g}"),
        "T": table["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}"), "epochs": table["epochs"], "n": table["n"],
        "val acc %": table["val_mean"].map(_pct),
        "test acc % [95% CI]": [f"{_pct(m)} " + ("n/a" if pd.isna(lo) else f"[{_pct(lo)}, {_pct(hi)}]")
                                for m, lo, hi in zip(table["test_mean"], table["test_ci_low"], table["test_ci_high"], strict=True)],
        "gain over scratch pp [95% CI]": [_gain(g, lo, hi, f" ({t})" if t != "paired t" else "") for g, lo, hi, t in
                                          zip(table["gain_scratch"], table["gain_scratch_ci_low"], table["gain_scratch_ci_high"],
                                              table["gain_scratch_test"], strict=True)],
        "gain over best kd pp [95% CI]": ["reference" if v == DEFAULT_METHOD else _gain(g, lo, hi, f", positive {p}/{n}" if n else "")
                                          for v, g, lo, hi, p, n in zip(table["variant"], table["gain_kd"], table["gain_kd_ci_low"],
                                                                        table["gain_kd_ci_high"], table["gain_kd_positive"], table["gain_kd_n"],
                                                                        strict=True)],
    })
    if on_test:
        shown = shown.drop(columns=["val acc %"])
    position = 2
    for axis, name in (("student", "student"), ("teacher", "teacher"), ("label_noise", "label noise")):
        if table[axis].nunique() > 1:
            shown.insert(position, name, table[axis].to_numpy())
            position += 1
    kd_note = ("" if (table["variant"] == DEFAULT_METHOD).any() else
               " The sweep has no kd students: there is no gain over the best kd configuration.")
    return "\n".join([
        f"Per method (each variant's best configuration, {rule}; a tie: the larger alpha, then the lower T; reported on test, "
        "with its gain over scratch, same student, label noise and epochs, and over the best kd configuration, selected the "
        f"same way; both gains paired by seed, in percentage points):{kd_note}", "", markdown_table(shown)])
