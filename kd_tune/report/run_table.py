"""A sweep's runs read back from MLflow: one tidy row per student or scratch run (grid point and seed), with its method
and knobs (:mod:`kd_tune.report.configs`)."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from kd_tune.errors import UsageError
from kd_tune.process import mlflow_tracking_uri_held
from kd_tune.report.configs import CHANGING, method_columns
from kd_tune.space.methods import ALL_KNOBS
from kd_tune.tracking.tags import TAG_PARENT, TAG_ROLE, TAG_STOPPED_AT, TAG_SWEEP, TAG_TRIAL

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
    with mlflow_tracking_uri_held():  # the caller's own setting (a notebook's) is back once the runs are read
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
        # The models: the grid.student / grid.teacher entries ("" without those axes), the student's architecture and size.
        "student": raw.get("params.student", pd.Series("", index=raw.index, dtype=str)).fillna(""),
        "teacher": raw.get("params.teacher", pd.Series("", index=raw.index, dtype=str)).fillna(""),
        "student_arch": raw.get("params.student.arch", pd.Series("cnn", index=raw.index, dtype=str)).fillna("cnn"),
        "student_parameters": pd.to_numeric(raw.get("params.student.parameters", pd.Series(None, index=raw.index, dtype=float))).astype("Int64"),
    })
    # The method and its knobs (runs logged before methods were an axis have neither: kd with its defaults).
    params = pd.DataFrame({name: raw[f"params.{name}"] for name in ("method", *ALL_KNOBS, *CHANGING, "scheduler.name", "role")
                           if f"params.{name}" in raw}, index=raw.index)
    rows = rows.join(method_columns(params)) if len(rows) else rows.assign(**{c: pd.Series(dtype=object) for c in
                                                                             ["method", *ALL_KNOBS, "knobs", "variant"]})
    for m in METRICS:
        rows[m] = pd.to_numeric(raw[f"metrics.{m}"]) if f"metrics.{m}" in raw else float("nan")
    rows["teacher_acc"] = teacher_accuracies(client.get_run(parent).data.metrics, rows)
    rows = rows.sort_values(["role", "student", "teacher", "label_noise", "method", "knobs", "temperature", "alpha", "epochs", "seed"], na_position="first",
                            kind="stable").reset_index(drop=True)
    return rows, exp.experiment_id, parent


def teacher_accuracies(parent_metrics: dict[str, float], runs: pd.DataFrame) -> pd.Series:
    """The test accuracy of each run's teacher (of the scratch runs: nan), from the parent run's metrics: the sweep logs
    ``teacher_test_acc``, and with several teachers or label-noise levels ``teacher_test_acc[_<teacher>][_noise_<level>]``."""
    several_noise = runs["label_noise"].nunique() > 1

    def acc(row: pd.Series) -> float:
        if row["role"] != "student":
            return float("nan")
        name = "_".join(["teacher_test_acc", *([row["teacher"]] if row["teacher"] else []),
                         *([f"noise_{row['label_noise']:g}"] if several_noise else [])])
        return float(parent_metrics.get(name, parent_metrics.get("teacher_test_acc", float("nan"))))

    return runs.apply(acc, axis=1) if len(runs) else pd.Series(dtype=float)


def selectable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a configuration can be selected from: a search trial the scheduler stopped early was not
    trained to its epochs, so it is shown (figures, runs.csv) but neither summarized nor selected."""
    return runs[runs["stopped_at"].isna()].reset_index(drop=True)
