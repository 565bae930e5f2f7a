"""The finding "alpha that changes during training" (docs/findings.md): the best constant alpha, the best fixed schedule
and the replayed PBT schedule, each selected on validation and reported on test, paired by seed with each other and
with scratch. Run after (the teacher comes from the cache):

    kd-tune sweep search_spaces/schedules_mnist_small.yaml
    kd-tune sweep search_spaces/pbt_mnist_small.yaml
    kd-tune replay pbt_mnist_small --seeds 1000,1001,1002

    python docs/examples/compare_schedules.py [--storage S] [--grid-uri U] [--population-uri U]

The two grid sweeps share the seeds 1000-1002: a seed fixes a student's initial weights and data order, so the
configurations of one seed, in either sweep, differ in their alpha alone.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
from scipy import stats

import kd_tune


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, seed): its last epoch's validation and test accuracy (in %)."""
    runs = runs[runs["role"].isin(["student", "scratch"])].copy()
    runs["config"] = [("scratch" if role == "scratch" else f"alpha {a:g}" if knobs.count("=") == 2 else knobs.split(", ", 2)[2])
                      for role, a, knobs in zip(runs["role"], runs["alpha"], runs["knobs"], strict=True)]
    return runs.assign(val=runs["val_acc"] * 100, test=runs["test_acc"] * 100)[["config", "seed", "val", "test"]]


def paired(a: pd.Series, b: pd.Series) -> str:
    """Mean of a - b over the seeds both have, its 95 % t-interval, and on how many seeds a > b."""
    d = (a - b).dropna()
    n, mean = len(d), d.mean()
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}], {int((d > 0).sum())}/{n}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default=None)
    ap.add_argument("--grid-uri", default=None, help="the MLflow store of schedules_mnist_small")
    ap.add_argument("--population-uri", default=None, help="the MLflow store of pbt_mnist_small and its replay")
    args = ap.parse_args()
    grid = per_seed(kd_tune.load("schedules_mnist_small", storage=args.storage, tracking_uri=args.grid_uri).runs())
    replay = per_seed(kd_tune.load("pbt_mnist_small-replay", storage=args.storage, tracking_uri=args.population_uri).runs())
    replay = replay[replay["config"] != "scratch"].assign(config="PBT schedule, replayed")
    rows = pd.concat([grid, replay])
    val, test = (rows.pivot_table(index="seed", columns="config", values=v) for v in ("val", "test"))
    constants = [c for c in val if c.startswith("alpha ")]
    schedules = [c for c in val if c.startswith("alpha_schedule=")]
    chosen = {"best constant alpha": val[constants].mean().idxmax(), "best fixed schedule": val[schedules].mean().idxmax(),
              "PBT schedule, replayed": "PBT schedule, replayed"}
    print(f"n = {len(val)} seeds ({', '.join(map(str, val.index))}); each configuration's mean over them; selected on validation\n")
    print("every configuration (mean %):")
    print(pd.DataFrame({"val": val.mean(), "test": test.mean()}).sort_values("val", ascending=False).round(2).to_string())
    reference = chosen["best constant alpha"]
    print("\n| | configuration | val % | test % | over scratch, points [95 % CI], seeds > 0 | over the best constant |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, c in chosen.items():
        versus = "reference" if c == reference else paired(test[c], test[reference])
        print(f"| {what} | {c} | {val[c].mean():.2f} | {test[c].mean():.2f} | {paired(test[c], test['scratch'])} | {versus} |")


if __name__ == "__main__":
    main()
