"""`kd-tune ui` serves the same store on 127.0.0.1 (a real MLflow server, stopped by PID), and first prints each sweep's
pages: the view of its grid points it saves on the sweep's experiment, and its report's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.tracking.grid_view import GRID_VIEW, VIEW_TAG_PREFIX, grid_filter, grid_view_state, save_grid_view
from kd_tune.tracking.runs import create_parent_run, params_batch
from kd_tune.tracking.tags import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TAG_PARENT, TAG_ROLE, TAG_SELECTED_ON, TAG_SWEEP
from kd_tune.tracking.ui import UI_HOST, runs_page, sweep_page, ui_lines

from .servers import MlflowServer, listening_addresses

# Marked per test: the module also holds tests that need neither Ray nor a server (they stay in `-m "not integration"`).


@pytest.mark.integration
def test_ui_serves_the_store_on_localhost(tmp_path: Path) -> None:
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("seen-through-the-ui")
    with MlflowServer(tmp_path) as server:
        body = server.api("experiments/search", max_results="100")
        assert "seen-through-the-ui" in {e["name"] for e in body["experiments"]}
        assert listening_addresses(server.port) == {"127.0.0.1"}  # loopback only, not 0.0.0.0
        assert server.runs_pages() == {}  # an experiment that is no sweep gets no runs-page line
    assert server.proc.returncode is not None  # stopped


def test_ui_refuses_an_unknown_sweep_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "nope"]) == 2
    # (MLflow itself may log that it creates the store's tables first)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd-tune ui: error:")]
    assert error.startswith("kd-tune ui: error: sweep 'nope' is not tracked in sqlite:///")
    assert error.endswith("allowed: one of the sweeps there: none yet (start one with kd-tune sweep)")


# --- what `kd-tune ui` prints, and the view it saves (no Ray, no server: a store written as a sweep writes it) ---------


def _sweep_store(tmp_path: Path, validation: bool = True) -> tuple[str, MlflowClient, str, str]:
    """A store holding sweep ``tiny`` as kd-tune records it, nothing trained: its experiment, its parent run, a teacher run
    and six grid points under it (alpha 0 / 0.5 at two label-noise levels, scratch baselines), each with its params and
    accuracies (no val_acc without a ``validation`` split). Returns the store's URI, a client, the experiment and the
    parent run."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # The experiment a sweep makes, its artifacts here rather than in ./mlruns
    experiment_id = client.create_experiment("tiny", artifact_location=str(tmp_path / "artifacts"), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    parent = create_parent_run(client, experiment_id, "tiny", str(tmp_path / "store" / "tiny"))
    teacher = client.create_run(experiment_id, run_name="teacher", tags={TAG_PARENT: parent, TAG_SWEEP: "tiny", TAG_ROLE: "teacher"})
    client.log_metric(teacher.info.run_id, "val_acc", 0.99)
    points = [("student", 0.0, 0.0, 0.91), ("student", 0.5, 0.0, 0.95), ("scratch", 1.0, 0.0, 0.93),
              ("student", 0.0, 0.2, 0.81), ("student", 0.5, 0.2, 0.88), ("scratch", 1.0, 0.2, 0.84)]
    for role, alpha, noise, acc in points:
        run = client.create_run(experiment_id, run_name=f"{role}-a{alpha}-n{noise}", tags={TAG_PARENT: parent, TAG_SWEEP: "tiny", TAG_ROLE: role})
        params = {"role": role, "alpha": alpha, "temperature": 3.0 if role == "student" else None, "epochs": 2, "seed": 0,
                  "label_noise": noise, "method": "kd", "dataset.val_size": 100}
        metrics = [Metric("test_acc", acc - 0.01, 0, 2)] + ([Metric("val_acc", acc, 0, 2)] if validation else [])
        client.log_batch(run.info.run_id, params=params_batch(params), metrics=metrics)
    return uri, client, experiment_id, parent


def test_ui_prints_each_sweeps_grid_points_and_its_report(tmp_path: Path) -> None:
    uri, client, experiment_id, parent = _sweep_store(tmp_path)
    lines = ui_lines(uri, "127.0.0.1", 5000, "tiny")
    page = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={GRID_VIEW}"
    artifacts = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent}/artifacts"
    assert lines[1:] == ["sweep 'tiny': its grid points (best first), then its report's figures:", f"  tiny  {page}",
                         f"        report figures, after kd-tune report tiny: {artifacts}?workflowType=machine_learning"]
    # Once the report has put its files on the parent run, the line opens its figure of accuracy against alpha (its
    # summary, for a kind of report without that figure).
    for f in ("summary.md", "accuracy_vs_alpha.png"):
        (tmp_path / f).write_bytes(b"a report's file")
        client.log_artifact(parent, str(tmp_path / f), artifact_path="report")
        assert ui_lines(uri, "127.0.0.1", 5000, "tiny")[3] == f"        report figures: {artifacts}/report/{f}?workflowType=machine_learning"
    assert ui_lines(uri, "127.0.0.1", 5000)[1:] == ["each sweep: its grid points (best first), then its report's figures:", f"  tiny  {page}",
                                                    f"        report figures: {artifacts}/report/accuracy_vs_alpha.png?workflowType=machine_learning"]


def test_the_saved_view_lists_the_grid_points_best_first_with_their_axes(tmp_path: Path) -> None:
    uri, client, experiment_id, parent = _sweep_store(tmp_path)
    assert sweep_page(uri, experiment_id, parent) == runs_page(UI_HOST, 5000, experiment_id, GRID_VIEW)  # what a sweep's end prints
    value = client.get_experiment(experiment_id).tags[VIEW_TAG_PREFIX + GRID_VIEW]
    envelope = json.loads(value)
    state = json.loads(envelope["state"])
    assert envelope["name"] == "kd-tune: grid points by val_acc" and envelope["createdAt"] == envelope["updatedAt"]
    # Its filter, run by MLflow's own search, finds the grid points: neither the parent nor the teacher.
    found = client.search_runs([experiment_id], filter_string=state["searchFilter"], order_by=[state["orderByKey"] + " DESC"])
    assert [r.data.metrics["val_acc"] for r in found] == [0.95, 0.93, 0.91, 0.88, 0.84, 0.81]
    assert state["orderByKey"] == "metrics.`val_acc`" and state["orderByAsc"] is False
    # The accuracies, the five axes, then what else varies (label noise; not the method, the same everywhere).
    assert state["selectedColumns"] == ["metrics.`val_acc`", "metrics.`test_acc`", "params.`role`", "params.`alpha`", "params.`temperature`",
                                        "params.`epochs`", "params.`seed`", "params.`label_noise`"]
    assert state["columnOrder"][2:-1] == state["selectedColumns"] and set(state["columnWidths"]) > set(state["selectedColumns"])
    assert {(c["type"], c.get("metricKey") or c["yaxis"]["key"]) for c in state["compareRunCharts"]} == {
        ("SCATTER", "val_acc"), ("SCATTER", "test_acc"), ("LINE", "val_acc"), ("LINE", "test_acc")}
    assert {k: v for k, v in envelope.items() if k not in {"name", "createdAt", "updatedAt", "state"}} == state  # MLflow < 3.15 reads these
    # Saved again unchanged: not rewritten (MLflow shows when the view last changed).
    assert save_grid_view(client, experiment_id, parent) == GRID_VIEW
    assert client.get_experiment(experiment_id).tags[VIEW_TAG_PREFIX + GRID_VIEW] == value


def test_a_sweep_selected_on_test_accuracy_is_sorted_by_it(tmp_path: Path) -> None:
    """A sweep without a validation split is listed by test accuracy; so is one whose report selected on test."""
    _, client, experiment_id, parent = _sweep_store(tmp_path / "no-validation", validation=False)
    state = grid_view_state(parent, client.search_runs([experiment_id], filter_string=grid_filter(parent)))
    assert state["orderByKey"] == "metrics.`test_acc`" and state["selectedColumns"][:2] == ["metrics.`test_acc`", "params.`role`"]
    _, client, experiment_id, parent = _sweep_store(tmp_path / "selected-on-test")
    client.set_tag(parent, TAG_SELECTED_ON, "test")
    save_grid_view(client, experiment_id, parent)
    envelope = json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG_PREFIX + GRID_VIEW])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "kd-tune: grid points by test_acc"
    assert state["orderByKey"] == "metrics.`test_acc`" and state["selectedColumns"][:2] == ["metrics.`test_acc`", "metrics.`val_acc`"]


def test_a_sweeps_end_prints_the_plain_runs_page_when_the_store_refuses_the_view(tmp_path: Path) -> None:
    assert sweep_page(f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}", "7", "abc") == runs_page(UI_HOST, 5000, "7")
