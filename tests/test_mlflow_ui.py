"""A sweep as a user meets it in MLflow's UI: a real tiny sweep and its real report, the real server that `kd-tune ui`
starts, and the pages it prints, opened in a real headless Chromium (Debian's `chromium` driven by Playwright).

What a user must see without clicking anything, in a browser that never saw MLflow (a 1500x950 window, MLflow's
Assistant panel open as it opens on a first visit to a local server): the sweep's grid points as rows, best
validation accuracy first, each with its validation and test accuracy, role, alpha, T, epochs and seed, whole and in
sight. One click away: the report's figure of accuracy against alpha on the parent run (the second address printed),
and MLflow's own view of the sweep ("Exit shared view"), whose parent row unfolds into every run with its datasets
and its model. The pages are saved as screenshots in the test's folder, or as docs/mlflow_runs_page.png and
docs/mlflow_runs_datasets.png (docs/mlflow.md's) with KD_TUNE_UPDATE_DOCS=1: a test run does not rewrite a committed
image otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main
from kd_tune.data.split import prepare
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.tracking.datasets import dataset_inputs, log_dataset_inputs
from kd_tune.tracking.grid_view import GRID_VIEW
from kd_tune.tracking.logged_models import input_example, log_model_once, using_tracking_uri
from kd_tune.tracking.runs import get_or_create_experiment
from kd_tune.tracking.ui import run_page, runs_page

from .conftest import FIXTURE_DATA, NATIVE_SWEEP, REPO, Swept
from .servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); Playwright's own download is not used
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
FIRST_VIEW = REPO / "docs" / "mlflow_runs_page.png"
DATASETS_VIEW = REPO / "docs" / "mlflow_runs_datasets.png"
SWEEP = NATIVE_SWEEP
# Columns of MLflow's runs table (an ag-grid): each cell carries its column's id.
DATASET_CELL = '[col-id="attributes.`Dataset`"]'
MODELS_CELL = '[col-id="attributes.`Models`"]'
ROWS = ".ag-center-cols-container .ag-row"  # keyed by row-id (the run's id), like the pinned run names
RUN_NAMES = '.ag-pinned-left-cols-container .ag-row [col-id="attributes.`Run Name`"]'
ACCURACIES = ["metrics.`val_acc`", "metrics.`test_acc`"]
AXES = ["params.`role`", "params.`alpha`", "params.`temperature`", "params.`epochs`", "params.`seed`"]
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
EXIT_SHARED_VIEW = '[data-component-id="mlflow.experiment_page.shared_view.discard"]'

# The table's rows in display order (ag-grid keeps rows in the DOM in any order; row-index is their place), each as
# column id -> the cell's text, with the run's name from the pinned column.
TABLE = """() => {
  const names = {};
  for (const row of document.querySelectorAll('.ag-pinned-left-cols-container .ag-row')) {
    const link = row.querySelector('[col-id="attributes.`Run Name`"] a');
    names[row.getAttribute('row-id')] = link ? link.textContent.trim() : null;
  }
  return [...document.querySelectorAll('.ag-center-cols-container .ag-row')]
    .sort((a, b) => Number(a.getAttribute('row-index')) - Number(b.getAttribute('row-index')))
    .map(row => Object.fromEntries([['name', names[row.getAttribute('row-id')]],
      ...[...row.querySelectorAll('.ag-cell')].map(c => [c.getAttribute('col-id'), c.textContent.trim()])]));
}"""
# Why each of the columns' header and cells (their text), or a run's name, cannot be read where it is: not drawn
# (ag-grid draws only the columns in sight), cut short by an ellipsis, or reaching out of a box that clips it (the
# table scrolled sideways, the page beside MLflow's Assistant panel) or out of the window. Empty when every one is
# whole and in sight.
UNREADABLE = """(columns) => {
  const problems = [];
  const check = (el, what) => {
    if (!el) { problems.push(what + ': not drawn'); return; }
    const r = el.getBoundingClientRect();
    if (getComputedStyle(el).overflowX !== 'visible' && el.scrollWidth > el.clientWidth) problems.push(what + ': cut short');
    for (let n = el.parentElement; n && n !== document.documentElement; n = n.parentElement) {
      if (getComputedStyle(n).overflowX === 'visible') continue;
      const box = n.getBoundingClientRect();
      if (r.left < box.left - 0.5 || r.right > box.right + 0.5) { problems.push(what + ': clipped'); break; }
    }
    if (r.left < 0 || r.right > window.innerWidth || r.bottom > window.innerHeight) problems.push(what + ': out of the window');
  };
  const rows = document.querySelectorAll('.ag-center-cols-container .ag-row');
  for (const col of columns) {
    check(document.querySelector(`.ag-header-cell[col-id="${col}"] [data-testid^="sort-header"]`), col + ' header');
    rows.forEach((row, i) => check(row.querySelector(`[col-id="${col}"] .ag-cell-value`), `${col} row ${i}`));
  }
  document.querySelectorAll('.ag-pinned-left-cols-container [col-id="attributes.`Run Name`"] a span')
    .forEach((el, i) => check(el, `run name ${i}`));
  if (!rows.length) problems.push('no rows');
  return problems;
}"""


@pytest.fixture(scope="module")
def reported(native_sweep: Swept, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared sweep (conftest.py, inspected by test_mlflow_native.py too: two label-noise levels sharing
    one clean teacher, alpha 0.5 at 1 and 2 epochs: a teacher run and four student runs under the sweep's parent)
    with its report made, as a user makes it: `kd-tune report` adds its files on the parent run (under report/; nothing
    else there changes). Returns the folder it wrote them to."""
    out = tmp_path_factory.mktemp("report")
    assert main(["report", SWEEP, "--storage", native_sweep.storage, "--tracking-uri", native_sweep.uri, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(native_sweep: Swept, reported: Path) -> Iterator[MlflowServer]:
    """`kd-tune ui NAME` serving the shared sweep's sqlite store, its report made before."""
    with MlflowServer(native_sweep.folder, sweep=SWEEP) as srv:
        assert srv.store == native_sweep.uri
        yield srv


def _report_page(server: MlflowServer) -> str:
    """The address `kd-tune ui` printed on the line after the sweep's runs page: its report's figure."""
    (line,) = [ln for ln in server.log.read_text().splitlines() if ln.lstrip().startswith("report figures")]
    return line.rsplit(" ", 1)[1]


def _first_visit(pw: Any) -> Any:
    """A page in a fresh browser (no MLflow state in its local storage: a first visit), 1500x950."""
    browser = pw.chromium.launch(executable_path=str(CHROMIUM))
    return browser, browser.new_page(viewport={"width": 1500, "height": 950})


@needs_chromium
def test_the_printed_page_shows_the_grid_points_best_first_without_a_click(server: MlflowServer, native_sweep: Swept) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    pages = server.runs_pages()
    assert pages == {SWEEP: runs_page("127.0.0.1", server.port, native_sweep.experiment_id, GRID_VIEW)}  # `kd-tune ui NAME`: that sweep's only
    students = {run.info.run_name: run for run in native_sweep.children()}
    with sync_playwright() as pw:
        browser, page = _first_visit(pw)
        try:
            page.goto(pages[SWEEP])
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=60_000)
            # MLflow opens its Assistant panel on a first visit to a local server: the table is narrowest beside it.
            expect(page.locator(ASSISTANT_CLOSE)).to_be_visible(timeout=30_000)
            expect(page.locator(ROWS)).to_have_count(len(students))  # the grid points as rows: no parent row, no teacher
            # Every grid point's accuracies and axes whole and in sight (polled: MLflow applies the view's columns, and
            # its panel slides in, after the rows appear).
            try:
                page.wait_for_function(f"columns => ({UNREADABLE})(columns).length === 0", arg=ACCURACIES + AXES, timeout=30_000)
            except PlaywrightTimeout:
                pytest.fail(f"not readable without a click: {page.evaluate(UNREADABLE, ACCURACIES + AXES)}")
            # MLflow took the view's sort and filter: they are in its address now (its search box shows the filter).
            assert "orderByKey=metrics.%60val_acc%60" in page.url and "orderByAsc=false" in page.url and "searchFilter=" in page.url
            rows = page.evaluate(TABLE)
            assert sorted(r["name"] for r in rows) == sorted(students)
            val = [students[r["name"]].data.metrics["val_acc"] for r in rows]
            assert val == sorted(val, reverse=True) and len(set(val)) > 1  # best validation accuracy first (an order to get wrong)
            for row in rows:
                run = students[row["name"]]
                for key in ("val_acc", "test_acc"):
                    assert math.isclose(float(row[f"metrics.`{key}`"]), run.data.metrics[key], abs_tol=5e-4), (row, key)
                for key in ("role", "alpha", "temperature", "epochs", "seed"):
                    assert row[f"params.`{key}`"] == run.data.params[key], (row, key)
            page.screenshot(path=str(FIRST_VIEW if os.environ.get("KD_TUNE_UPDATE_DOCS") else server.folder / FIRST_VIEW.name))
        finally:
            browser.close()


@needs_chromium
def test_the_reports_figure_is_the_other_printed_address(server: MlflowServer, native_sweep: Swept, reported: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    parent = native_sweep.runs["sweep"][0].info.run_id
    url = _report_page(server)
    assert url == run_page("127.0.0.1", server.port, native_sweep.experiment_id, parent, "report/accuracy_vs_alpha.png")
    png = (reported / "accuracy_vs_alpha.png").read_bytes()
    width = int.from_bytes(png[16:20], "big")  # the PNG header's width: the figure the report made
    with sync_playwright() as pw:
        browser, page = _first_visit(pw)
        try:
            page.goto(url)
            figure = page.locator('img[alt="report/accuracy_vs_alpha.png"]')
            expect(figure).to_be_visible(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
            assert figure.evaluate("img => img.naturalWidth") == width
            expect(page.get_by_role("link", name="Runs", exact=True).first).to_be_visible()  # the "Model training" view's, not GenAI's
        finally:
            browser.close()


@needs_chromium
def test_mlflows_own_view_unfolds_the_sweep_into_runs_with_their_datasets_and_models(server: MlflowServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 560})
            page.goto(server.runs_pages()[SWEEP])
            expect(page.locator(ROWS)).to_have_count(4)  # the grid points
            # "Exit shared view": MLflow's own view (its default columns: Dataset, Source, Models), the sweep as one row.
            page.locator(EXIT_SHARED_VIEW).click()
            expect(page.locator(ROWS)).to_have_count(1)  # the sweep's parent run; its children nest under it
            assert "viewStateShareKey" not in page.url and "workflowType=machine_learning" in page.url
            expect(page.locator(RUN_NAMES).first).to_contain_text(SWEEP)
            page.locator(RUN_NAMES).first.locator("button").click()
            expect(page.locator(ROWS)).to_have_count(6)  # the parent, the teacher, four students
            links = page.locator(RUN_NAMES).locator('a[href*="/runs/"]')
            runs = {href.rsplit("/", 1)[-1]: name.strip() for href, name in zip(links.evaluate_all("els => els.map(e => e.getAttribute('href'))"),
                                                                                  links.all_inner_texts(), strict=True)}
            assert sorted(runs.values()) == sorted([SWEEP, "a0.5-T3-e1-s0", "a0.5-T3-e2-s0", "a0.5-T3-e1-s0-n0.2", "a0.5-T3-e2-s0-n0.2",
                                                    "teacher"])
            for run_id, name in runs.items():
                if name == SWEEP:
                    continue
                row = page.locator(f'{ROWS}[row-id="{run_id}"]')
                datasets = row.locator(DATASET_CELL).get_by_test_id("open-dataset-drawer")
                expect(datasets).to_have_count(3)  # mnist-train, mnist-val, mnist-test
                expect(datasets.first).to_contain_text("mnist-train-n0.2 (" if name.endswith("-n0.2") else "mnist-train (")
                expect(row.locator(DATASET_CELL)).to_contain_text("training")
                link = row.locator(MODELS_CELL).locator('a[href*="/models/m-"]')
                expect(link).to_have_text("teacher" if name == "teacher" else "student")
            # The parent row names the sweep's datasets too (its model inputs are not in MLflow's search results):
            # both training sets (clean and noisy labels), validation and test.
            parent = next(run_id for run_id, name in runs.items() if name == SWEEP)
            expect(page.locator(f'{ROWS}[row-id="{parent}"] {DATASET_CELL}').get_by_test_id("open-dataset-drawer")).to_have_count(4)
            close = page.locator(ASSISTANT_CLOSE)
            if close.count():
                close.click()  # the assistant panel MLflow opens on a first visit: out of the screenshot's way
                expect(close).to_have_count(0)
            page.screenshot(path=str(DATASETS_VIEW if os.environ.get("KD_TUNE_UPDATE_DOCS") else server.folder / DATASETS_VIEW.name))
        finally:
            browser.close()


def test_models_and_datasets_are_logged_through_the_tracking_server(server: MlflowServer, tmp_path: Path) -> None:
    """On a cluster the driver logs through `kd-tune ui`'s server (artifacts proxied): the same calls work there."""
    client = MlflowClient(server.url)
    experiment_id = get_or_create_experiment(client, "through-the-server")
    run_id = client.create_run(experiment_id).info.run_id
    split = prepare("mnist", 100, 0.0, 0, FIXTURE_DATA, lambda s: None)
    state = {"model_args": {"arch": "cnn", "args": {"widths": [4, 8]}, "in_shape": [1, 28, 28], "num_classes": 10},
             "model": build_cnn([4, 8], (1, 28, 28), 10, seed=0).state_dict()}
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    model_id = log_model_once(client, run_id, state, input_example(split), "student")
    assert log_model_once(client, run_id, state, input_example(split), "student") == model_id
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    assert log_dataset_inputs(client, run_id, dataset_inputs(split, {0.0: split.train_y})[0.0]) == 2
    import mlflow.pytorch

    with using_tracking_uri(server.url):
        model = mlflow.pytorch.load_model(f"models:/{model_id}", dst_path=str(tmp_path))
    x = torch.from_numpy(input_example(split))
    assert torch.allclose(model(x), build_cnn([4, 8], (1, 28, 28), 10, seed=0).eval()(x), atol=1e-5)
    assert any(server.artifacts.rglob("MLmodel"))  # stored by the server, not by the client
