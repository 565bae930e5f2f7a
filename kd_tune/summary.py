"""A sweep's runs read back from MLflow, and its best configuration written on the sweep's parent run.

What a sweep's end needs of the report (:mod:`kd_tune.report`), without its figures: a sweep then never
imports matplotlib. ``load_runs`` gives one tidy row per student or scratch run (grid point and seed);
``log_sweep_summary`` selects as the report does (:mod:`kd_tune.stats`) and writes the choice on the parent run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pandas as pd
from mlflow.tracking import MlflowClient

from kd_tune.errors import UsageError, first_line
from kd_tune.mlflow_runs import TAG_PARENT, TAG_ROLE, TAG_SWEEP, TAG_TRIAL
from kd_tune.stats import Best, best_config, gains_over_scratch, protocol_of, summarize
from kd_tune.tracking import TAG_STOPPED_AT

METRICS = ["test_acc", "test_loss", "teacher_agreement", "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_ece",
           "train_loss", "train_hard_loss", "train_distill_loss", "val_acc", "val_loss"]


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
        # A search's trials: which algorithm, when each started (its order), and whether the scheduler stopped it.
        "algorithm": raw.get("params.search.algorithm", pd.Series("grid", index=raw.index, dtype=str)).fillna("grid"),
        "trial_id": raw.get(f"tags.{TAG_TRIAL}", pd.Series(dtype=str)),
        "start_time": raw.get("start_time", pd.Series(dtype="datetime64[ns, UTC]")),
        "stopped_at": pd.to_numeric(raw.get(f"tags.{TAG_STOPPED_AT}", pd.Series(None, index=raw.index, dtype=float))).astype("Int64"),
    })
    for m in METRICS:
        rows[m] = pd.to_numeric(raw[f"metrics.{m}"]) if f"metrics.{m}" in raw else float("nan")
    rows = rows.sort_values(["role", "label_noise", "temperature", "alpha", "epochs", "seed"], na_position="first", kind="stable").reset_index(drop=True)
    return rows, exp.experiment_id, parent


def selectable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a configuration can be selected from: a search trial the scheduler stopped early was not
    trained to its epochs, so it is shown (figures, runs.csv) but neither summarized nor selected."""
    return runs[runs["stopped_at"].isna()].reset_index(drop=True)


def log_sweep_summary(name: str, tracking_uri: str) -> Best | None:
    """The report's choice as metrics and tags of the sweep's parent run, so the MLflow UI shows which
    configuration won, by how much and over how many seeds (written again at every sweep's or resume's
    end: the latest values win). Returns the best configuration, None while no student run finished."""
    all_runs, _, parent = load_runs(name, tracking_uri)
    runs = selectable(all_runs)
    if runs.empty:
        return None
    protocol, summary, gains = protocol_of(runs), summarize(runs), gains_over_scratch(runs)
    best = best_config(runs, summary, gains, select_on=protocol.selected_on)
    best_distilled = best_config(runs, summary, gains, distilled_only=True, select_on=protocol.selected_on)
    metrics: dict[str, float] = {}
    tested = gains["p_holm"].dropna()
    if len(tested):  # the gains table as the report gives it: how many gains hold once the table's many tests are counted
        metrics |= {"gains_tested": float(len(tested)), "gains_holm_p_below_0.05": float((tested < 0.05).sum())}
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


def summarize_on_parent(name: str, tracking_uri: str, log: Callable[[str], None]) -> None:
    """The report's best configuration on the parent run; a sweep never fails for want of its summary."""
    try:
        best = log_sweep_summary(name, tracking_uri)
    except Exception as e:  # noqa: BLE001 - the runs are complete in MLflow; `kd-tune report` can redo this
        log(f"warning: no summary on the sweep's parent run ({first_line(e)}); kd-tune report {name} computes it")
        return
    if best is not None:
        log(f"best configuration (selected on {'validation' if best.val_mean is not None else 'test'}): alpha = {best.alpha:g}, "
            f"T = {best.temperature:g}, {best.epochs} epochs: test acc {best.mean:.4f} (n = {best.n}); logged on the parent run")
