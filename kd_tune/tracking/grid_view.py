"""The saved view of a sweep's grid points in MLflow's UI: what its runs page opens on (``viewStateShareKey``).

What MLflow 3.17's UI lets an address choose is little: the view (``workflowType``), the sort and the filter
(``orderByKey``, ``orderByAsc``, ``searchFilter``), never the columns, which it keeps per browser (local storage;
by default Dataset, Source and Models) nor which parent rows are unfolded. What it does read from the store is a
*saved view*: an experiment tag ``mlflow.sharedViewState.<key>`` holding the runs page's state, columns, their
order and widths, and charts included, opened by the address parameter ``viewStateShareKey=<key>``
(``useSharedExperimentViewState`` in MLflow's ``experiment-page/hooks``: the fields of
``EXPERIMENT_PAGE_QUERY_PARAM_KEYS`` and ``EXPERIMENT_PAGE_UI_STATE_FIELDS``, less ``runsExpanded``, ``runsPinned``,
``runsHidden``, ``runsVisibilityMap`` and ``autoRefreshEnabled``, which 3.17 does not take from a shared view). So
kd-tune keeps one such view on each sweep's experiment (:func:`save_grid_view`): the grid points as rows (a filter on
the parent run's children: MLflow lists children whose parent is filtered out as rows of their own), best
validation accuracy first, their accuracies and axes as the first columns, and charts of accuracy against alpha and
by epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kd_tune.tracking.tags import TAG_PARENT, TAG_ROLE, TAG_SELECTED_ON

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

GRID_VIEW = "kd-tune-grid"
"""The key of the saved view kd-tune keeps on each sweep's experiment (what ``viewStateShareKey`` names)."""
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""MLflow's UI: EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX (experiment-tracking/constants.ts)."""
GRID_AXES = ("role", "alpha", "temperature", "epochs", "seed")
"""The params every grid point's run has and the view always shows (a scratch run's temperature is None)."""
FIRST_AXES = ("label_noise", "method", "student", "teacher")
"""Other axes a sweep may vary, shown (when they vary) before the rest of what varies, sorted by name."""
# Pixel widths (measured in Chromium): what a header's name and a value need, so that the accuracies and the five axes
# fit beside MLflow's pinned columns (checkbox, run name, created) in the table MLflow leaves at 1500 px with its
# Assistant panel open.
WIDTHS = {"role": 70, "alpha": 54, "temperature": 100, "epochs": 62, "seed": 48, "val_acc": 72, "test_acc": 74}
CREATED_WIDTH = 142  # "56 seconds ago" whole (MLflow's own width: 150)


def run_name_width(names: Sequence[str]) -> int:
    """The run-name column's width that shows the longest of ``names`` whole: its color dot and margins, ~6.5 px a
    character (MLflow's own width: 190)."""
    return min(260, max(120, round(46 + 6.5 * max(map(len, names), default=0))))

UI_DEFAULTS: dict[str, Any] = {
    "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "viewMaximized": False, "runListHidden": False,
    "groupBy": None, "groupsExpanded": {}, "autoRefreshEnabled": True, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
}
"""The rest of a runs page's state, as MLflow's UI makes it (createExperimentPageUIState): MLflow before 3.15 replaces the
page's whole state with a shared view's, so the view carries all of it."""
MAX_TAG_VALUE = 20000
"""mlflow.utils.validation.MAX_EXPERIMENT_TAG_VAL_LENGTH."""


def _column(kind: str, key: str) -> str:
    """A column's id in MLflow's runs table (its canonical sort key, e.g. ``params.`alpha```)."""
    return f"{kind}.`{key}`"


def grid_filter(parent_run_id: str) -> str:
    """The runs filter that lists a sweep's grid points: its parent's children but the teachers (two sweeps of one
    name, in two storages, share an experiment and have a parent each)."""
    return f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_ROLE}` != 'teacher'"


def _varied(runs: Sequence[Run]) -> list[str]:
    """The params, other than :data:`GRID_AXES`, whose value is not the same on every one of ``runs``."""
    keys = {k for r in runs for k in r.data.params} - set(GRID_AXES)
    varied = {k for k in keys if len({r.data.params.get(k) for r in runs}) > 1}
    return [k for k in FIRST_AXES if k in varied] + sorted(varied - set(FIRST_AXES))


def grid_view_state(parent_run_id: str, runs: Sequence[Run], selected_on: str | None = None) -> dict[str, Any]:
    """The runs page's state (MLflow's saved-view fields) that shows a sweep's grid points ``runs`` (its parent's
    student and scratch runs): filtered to them, sorted by the accuracy the report selects on (``selected_on``:
    ``validation`` or ``test``, the parent's ``kd_tune.selected_on``; else validation where a run has it), the
    accuracies first, then role, alpha, T, epochs, seed and whatever else varies; charts of each accuracy against
    alpha and by epoch, every grid point in them (MLflow's default charts only the first 10)."""
    has = {m for r in runs for m in r.data.metrics}
    if selected_on is None:
        selected_on = "validation" if "val_acc" in has or not runs else "test"
    first = "val_acc" if selected_on == "validation" else "test_acc"
    metrics = [first] + [m for m in ("val_acc", "test_acc") if m != first and (m in has or not runs)]
    params = list(GRID_AXES) + _varied(runs)
    columns = [_column("metrics", m) for m in metrics] + [_column("params", p) for p in params]
    widths = {_column("attributes", "Run Name"): run_name_width([r.info.run_name or "" for r in runs]), "runDateAndNestInfo": CREATED_WIDTH}
    widths |= {_column("metrics", m): WIDTHS[m] for m in metrics}
    widths |= {_column("params", p): WIDTHS.get(p, max(72, 8 * len(p) + 36)) for p in params}
    by_alpha, by_epoch = "kd-tune-accuracy-vs-alpha", "kd-tune-accuracy-by-epoch"
    charts = [{"uuid": f"kd-tune-{m}-vs-alpha", "type": "SCATTER", "metricSectionId": by_alpha, "deleted": False, "isGenerated": False,
               "runsCountToCompare": 1000, "xaxis": {"key": "alpha", "type": "PARAM"}, "yaxis": {"key": m, "type": "METRIC"}} for m in metrics]
    charts += [{"uuid": f"kd-tune-{m}-by-epoch", "type": "LINE", "metricSectionId": by_epoch, "deleted": False, "isGenerated": False,
                "runsCountToCompare": 1000, "metricKey": m, "selectedMetricKeys": [m], "xAxisKey": "step", "selectedXAxisMetricKey": "",
                "lineSmoothness": 0, "scaleType": "linear", "xAxisScaleType": "linear", "useGlobalXaxisKey": False,
                "useGlobalLineSmoothing": False} for m in metrics]
    sections = [{"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False, "isGenerated": False}
                for uuid, name in ((by_alpha, "accuracy vs alpha"), (by_epoch, "accuracy by epoch"))]
    return {
        **UI_DEFAULTS,
        "searchFilter": grid_filter(parent_run_id), "orderByKey": _column("metrics", first), "orderByAsc": False,
        "selectedColumns": columns,
        # MLflow's order for every column: the run name, then its pinned "Created" column, ours, its "Duration" last.
        "columnOrder": [_column("attributes", "Run Name"), "runDateAndNestInfo", *columns, "duration"],
        "columnWidths": widths,
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True,  # our sections, in our order
    }


def view_name(state: Mapping[str, Any]) -> str:
    """The saved view's name in MLflow's views menu, e.g. ``kd-tune: grid points by val_acc``."""
    return f"kd-tune: grid points by {state['orderByKey'].split('`')[1]}"


def save_grid_view(client: MlflowClient, experiment_id: str, parent_run_id: str) -> str:
    """Keep the saved view of the sweep's grid points (:func:`grid_view_state`, from the runs as they are now) on its
    experiment, as MLflow's UI saves a view (an envelope of name, times and the state as JSON, MLflow >= 3.15), the
    state's fields also at its top level, where MLflow < 3.15 reads a shared view (as its bundle's
    useSharedExperimentViewState does in 3.14.0); its key (:data:`GRID_VIEW`). Written only when it changed: the time
    MLflow shows for it is when its content last did."""
    runs = client.search_runs([experiment_id], filter_string=grid_filter(parent_run_id), max_results=50000)
    selected_on = client.get_run(parent_run_id).data.tags.get(TAG_SELECTED_ON)
    state = grid_view_state(parent_run_id, runs, selected_on)
    key = VIEW_TAG_PREFIX + GRID_VIEW
    now = int(time.time() * 1000)
    created = now
    old = client.get_experiment(experiment_id).tags.get(key)
    if old is not None:
        try:
            envelope = json.loads(old)
            if json.loads(envelope["state"]) == state and envelope["name"] == view_name(state):
                return GRID_VIEW
            created = int(envelope["createdAt"])
        except (ValueError, KeyError, TypeError):
            pass  # not a view this code wrote (or MLflow's older, compressed format): replaced whole
    envelope = {"name": view_name(state), "createdAt": created, "updatedAt": now, "state": json.dumps(state)}
    value = json.dumps({**state, **envelope})
    client.set_experiment_tag(experiment_id, key, value if len(value) <= MAX_TAG_VALUE else json.dumps(envelope))
    return GRID_VIEW
