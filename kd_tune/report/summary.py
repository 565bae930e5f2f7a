"""The report's choice written on the sweep's parent run: what a sweep's end needs of the report, without its
figures (a sweep then never imports matplotlib)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from mlflow.tracking import MlflowClient

from kd_tune.errors import first_line
from kd_tune.report.configs import DEFAULT_KNOBS
from kd_tune.report.run_table import load_runs, selectable
from kd_tune.report.stats import Best, best_config, gains_over_scratch, protocol_of, summarize
from kd_tune.space.methods import DEFAULT_METHOD
from kd_tune.tracking.tags import TAG_PREPROCESSING, TAG_SELECTED_ON, best_tag


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
    tags = {TAG_SELECTED_ON: protocol.selected_on, TAG_PREPROCESSING: protocol.preprocessing}
    for prefix, b in (("best", best), ("best_distilled", best_distilled)):
        if b is None:
            continue
        values = {"test_acc": b.mean, "test_acc_ci_low": b.ci_low, "test_acc_ci_high": b.ci_high, "n": b.n, "val_acc": b.val_mean,
                  "gain_over_scratch": b.gain, "gain_ci_low": b.gain_ci_low, "gain_ci_high": b.gain_ci_high,
                  "gain_positive_seeds": b.gain_positive if b.gain_test == "paired t" else None}
        metrics |= {f"{prefix}_{k}": float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}
        tags |= {best_tag(prefix, "alpha"): f"{b.alpha:g}", best_tag(prefix, "temperature"): f"{b.temperature:g}",
                 best_tag(prefix, "epochs"): str(b.epochs), best_tag(prefix, "label_noise"): f"{b.label_noise:g}",
                 best_tag(prefix, "run_id"): b.run_id, best_tag(prefix, "gain_test"): b.gain_test,
                 best_tag(prefix, "method"): b.method, best_tag(prefix, "knobs"): b.knobs, best_tag(prefix, "variant"): b.variant}
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
        method = "" if best.method == DEFAULT_METHOD and best.knobs == DEFAULT_KNOBS else f"method {best.method} ({best.knobs}), "
        log(f"best configuration (selected on {'validation' if best.val_mean is not None else 'test'}): {method}alpha = {best.alpha:g}, "
            f"T = {best.temperature:g}, {best.epochs} epochs: test acc {best.mean:.4f} (n = {best.n}); logged on the parent run")
