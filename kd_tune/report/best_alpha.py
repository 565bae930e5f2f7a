"""The study's two claims, measured: how teacher quality and student capacity move the best alpha, and what a student's
size buys with and without distillation.

- :func:`best_alpha`: per student, teacher, label-noise level and training length, the alpha selected on validation
  (the scratch student standing for alpha = 1 where the grid has no alpha 1), seed by seed (its mean over seeds, with a 95 % t-interval and n), and the configuration selected on the seed-mean
  validation accuracy with its *test* accuracy and its gain over the same student trained from scratch (paired by
  seed), beside the teacher's test accuracy and the student's number of parameters.
- :func:`pareto`: per student, the best scratch and the best distilled configuration (each selected on validation),
  their test accuracy against the student's size, and which of them no smaller-or-equal student beats.

Ties in a selection go to the larger alpha (less distillation): a tie is no evidence for the teacher. A sweep without
a validation split selects on test, and its tables say so in the ``selected_on`` column. A sweep over distillation
methods keeps each method and knob setting apart (``method``, ``knobs``: :mod:`kd_tune.report.configs`): the scratch
student stands for alpha = 1 only for ``kd``, whose alpha = 1 is hard labels alone. Plain pandas.
"""

from __future__ import annotations

import math

import pandas as pd

from kd_tune.report.configs import learns_from_teacher, with_config_columns
from kd_tune.report.stats import paired_interval, t_interval
from kd_tune.report.tables import markdown_table
from kd_tune.space.methods import DEFAULT_METHOD

BEST_ALPHA_COLUMNS = ["student", "teacher", "label_noise", "method", "knobs", "epochs", "student_arch", "student_parameters", "teacher_acc", "n_seeds",
                      "best_alpha_mean", "best_alpha_ci_low", "best_alpha_ci_high", "alpha", "temperature", "val_mean", "test_mean",
                      "test_ci_low", "test_ci_high", "gain", "gain_ci_low", "gain_ci_high", "gain_n", "selected_on"]
PARETO_COLUMNS = ["student", "student_arch", "student_parameters", "kind", "teacher", "method", "knobs", "epochs", "alpha", "temperature", "n", "val_mean",
                  "test_mean", "test_ci_low", "test_ci_high", "on_front"]


def _metric(select_on: str) -> str:
    return "val_acc" if select_on == "validation" else "test_acc"


def _best(rows: pd.DataFrame, metric: str, by: list[str]) -> pd.Series:
    """The row of ``by`` values with the highest seed-mean ``metric`` (ties: the larger alpha, then the lower T)."""
    means = rows.groupby(by, dropna=False)[metric].mean().reset_index()
    order = means.sort_values([metric, "alpha", "temperature"], ascending=[False, False, True], kind="stable", na_position="last")
    return order.iloc[0]


def best_alpha(runs: pd.DataFrame, select_on: str = "validation") -> pd.DataFrame:
    """The best alpha per (student, teacher, label noise, epochs) and what it gives; see the module's docstring."""
    metric = _metric(select_on)
    runs = with_config_columns(runs)
    done = runs[runs["status"] == "FINISHED"]
    students, scratch = done[done["role"] == "student"], done[done["role"] == "scratch"]
    rows = []
    keys = ["student", "teacher", "label_noise", "method", "knobs", "epochs"]
    for (student, teacher, noise, method, knobs, epochs), distilled in students.groupby(keys, sort=True):
        base = scratch[(scratch["student"] == student) & (scratch["epochs"] == epochs) & (scratch["label_noise"] == noise)]
        # The scratch student is kd's alpha = 1 candidate (hard labels alone) where the grid has no alpha 1 of its own; another
        # method's alpha = 1 still distills, so it has no such stand-in.
        own = method != DEFAULT_METHOD or (distilled["alpha"] == 1.0).any()
        group = distilled if own else pd.concat([distilled, base.assign(alpha=1.0)], ignore_index=True)
        ordered = group.sort_values(["alpha", "temperature"], ascending=[False, True], kind="stable")
        per_seed = ordered.loc[ordered.groupby("seed")[metric].idxmax()]  # idxmax keeps the first: the larger alpha
        a_mean, a_lo, a_hi, n = t_interval(per_seed["alpha"])
        best = _best(group, metric, ["alpha", "temperature"])
        chosen = group[(group["alpha"] == best["alpha"]) & ((group["temperature"] == best["temperature"])
                                                            | (group["temperature"].isna() & pd.isna(best["temperature"])))]
        t_mean, t_lo, t_hi, _ = t_interval(chosen["test_acc"])
        gain, g_lo, g_hi, g_n, _ = paired_interval(chosen.groupby("seed")["test_acc"].mean(), base.groupby("seed")["test_acc"].mean())
        rows.append({"student": student, "teacher": teacher, "label_noise": noise, "method": method, "knobs": knobs, "epochs": int(epochs),
                     "student_arch": distilled["student_arch"].iloc[0], "student_parameters": distilled["student_parameters"].iloc[0],
                     "teacher_acc": float(distilled["teacher_acc"].iloc[0]), "n_seeds": n, "best_alpha_mean": a_mean,
                     "best_alpha_ci_low": a_lo, "best_alpha_ci_high": a_hi, "alpha": float(best["alpha"]), "temperature": float(best["temperature"]),
                     "val_mean": float(chosen["val_acc"].mean()) if chosen["val_acc"].notna().any() else math.nan,
                     "test_mean": t_mean, "test_ci_low": t_lo, "test_ci_high": t_hi, "gain": gain if g_n else math.nan,
                     "gain_ci_low": g_lo, "gain_ci_high": g_hi, "gain_n": g_n, "selected_on": select_on})
    return pd.DataFrame(rows, columns=BEST_ALPHA_COLUMNS)


def pareto(runs: pd.DataFrame, select_on: str = "validation") -> pd.DataFrame:
    """Per student: its best scratch configuration (over training lengths) and its best distilled one (one that learns
    from the teacher: kd with alpha < 1, any configuration of another method; over teachers, methods and their knobs,
    alphas, temperatures and lengths), each selected on validation and reported on test; ``on_front``: no student of at
    most its size reaches a higher test accuracy of the same kind."""
    metric = _metric(select_on)
    runs = with_config_columns(runs)
    done = runs[runs["status"] == "FINISHED"]
    rows = []
    for student, group in done.groupby("student", sort=True):
        for kind, mine in (("scratch", group[group["role"] == "scratch"]), ("distilled", group[learns_from_teacher(group)])):
            if mine.empty:
                continue
            by = ["teacher", "method", "knobs", "epochs", "alpha", "temperature"]
            best = _best(mine.assign(temperature=mine["temperature"].fillna(0.0)), metric, by)
            chosen = mine[(mine["teacher"] == best["teacher"]) & (mine["method"] == best["method"]) & (mine["knobs"] == best["knobs"])
                          & (mine["epochs"] == best["epochs"]) & (mine["alpha"] == best["alpha"])
                          & (mine["temperature"].fillna(0.0) == best["temperature"])]
            t_mean, t_lo, t_hi, n = t_interval(chosen["test_acc"])
            rows.append({"student": student, "student_arch": group["student_arch"].iloc[0], "student_parameters": group["student_parameters"].iloc[0],
                         "kind": kind, "teacher": best["teacher"] if kind == "distilled" else "", "method": best["method"],
                         "knobs": best["knobs"], "epochs": int(best["epochs"]),
                         "alpha": float(best["alpha"]), "temperature": float(best["temperature"]) if kind == "distilled" else math.nan, "n": n,
                         "val_mean": float(chosen["val_acc"].mean()) if chosen["val_acc"].notna().any() else math.nan,
                         "test_mean": t_mean, "test_ci_low": t_lo, "test_ci_high": t_hi})
    table = pd.DataFrame(rows, columns=PARETO_COLUMNS[:-1])
    table["on_front"] = [not ((table["kind"] == r["kind"]) & (table["student_parameters"] <= r["student_parameters"])
                              & (table["test_mean"] > r["test_mean"])).any() for _, r in table.iterrows()]
    return table


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.2f}"


def _ci(lo: float, hi: float, scale: float = 100, sign: bool = False) -> str:
    if pd.isna(lo) or pd.isna(hi):
        return "n/a"
    f = "+.2f" if sign else ".2f"
    return f"[{scale * lo:{f}}, {scale * hi:{f}}]"


def models_markdown(best: pd.DataFrame, front: pd.DataFrame) -> str:
    """The two tables in Markdown, with what they were selected on."""
    selected = best["selected_on"].iloc[0] if len(best) else "validation"
    b = pd.DataFrame({
        "student": best["student"], "parameters": best["student_parameters"], "teacher": best["teacher"],
        "teacher acc %": best["teacher_acc"].map(_pct), "epochs": best["epochs"], "n": best["n_seeds"],
        "best alpha (per seed)": [f"{m:.2f} {_ci(lo, hi, 1)}" for m, lo, hi in zip(best["best_alpha_mean"], best["best_alpha_ci_low"], best["best_alpha_ci_high"], strict=True)],
        "selected alpha, T": [f"{a:g}, " + ("-" if pd.isna(t) else f"{t:g}") for a, t in zip(best["alpha"], best["temperature"], strict=True)],
        "test acc %": [f"{_pct(m)} {_ci(lo, hi)}" for m, lo, hi in zip(best["test_mean"], best["test_ci_low"], best["test_ci_high"], strict=True)],
        "gain over scratch pp": ["n/a" if pd.isna(g) else f"{100 * g:+.2f} {_ci(lo, hi, sign=True)}"
                                 for g, lo, hi in zip(best["gain"], best["gain_ci_low"], best["gain_ci_high"], strict=True)],
    })
    f = pd.DataFrame({
        "student": front["student"], "parameters": front["student_parameters"], "kind": front["kind"], "teacher": front["teacher"],
        "epochs": front["epochs"], "alpha": front["alpha"].map(lambda v: f"{v:g}"), "n": front["n"],
        "test acc %": [f"{_pct(m)} {_ci(lo, hi)}" for m, lo, hi in zip(front["test_mean"], front["test_ci_low"], front["test_ci_high"], strict=True)],
        "on the front": front["on_front"].map(lambda v: "yes" if v else ""),
    })
    if best[["method", "knobs"]].drop_duplicates().shape[0] > 1:  # a sweep over methods: which one each row is
        b.insert(3, "method", best["method"].to_numpy())
        b.insert(4, "knobs", best["knobs"].to_numpy())
    distilled = front["kind"] == "distilled"
    if front.loc[distilled, ["method", "knobs"]].drop_duplicates().shape[0] > 1 or (front.loc[distilled, "method"] != DEFAULT_METHOD).any():
        f.insert(4, "method", front["method"].where(distilled, "-").to_numpy())
        f.insert(5, "knobs", front["knobs"].where(distilled, "-").to_numpy())
    return "\n".join([
        f"Best alpha per student, teacher and training length (each seed's alpha selected on {selected}; its mean and 95 % CI over "
        f"seeds; then the configuration selected on the seed-mean {selected} accuracy, reported on test, and its gain over the same "
        "student from scratch, paired by seed):", "", markdown_table(b), "",
        f"Student size against test accuracy (each student's best scratch and best distilled configuration, selected on {selected}; "
        "on the front: no student of at most its size does better of the same kind):", "", markdown_table(f)])
