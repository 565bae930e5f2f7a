"""A sweep as a user meets it in MLflow's UI: a real tiny sweep, the real server that `kd-tune ui` starts,
and the runs page it prints, opened in a real headless Chromium (Debian's `chromium` driven by Playwright).

What a user must see without clicking anything: the experiment's Runs page in MLflow's "Model
training" view (not the GenAI overview). Expanding the sweep's row (MLflow nests child runs under
their parent) lists the child runs, each with its datasets and its model filled in.
The page is saved as a screenshot in the test's folder, or as docs/mlflow_runs_page.png (the
README's) with KD_TUNE_UPDATE_DOCS=1: a test run does not rewrite a committed image otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from kd_tune.data.split import prepare
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.tracking.datasets import dataset_inputs, log_dataset_inputs
from kd_tune.tracking.logged_models import input_example, log_model_once, using_tracking_uri
from kd_tune.tracking.runs import get_or_create_experiment

from .conftest import FIXTURE_DATA, NATIVE_SWEEP, REPO, Swept
from .servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); Playwright's own download is not used
SCREENSHOT = REPO / "docs" / "mlflow_runs_page.png"
SWEEP = NATIVE_SWEEP
# Columns of MLflow's runs table (an ag-grid): each cell carries its column's id.
DATASET_CELL = '[col-id="attributes.`Dataset`"]'
MODELS_CELL = '[col-id="attributes.`Models`"]'
ROWS = ".ag-center-cols-container .ag-row"  # keyed by row-id (the run's id), like the pinned run names
RUN_NAMES = '.ag-pinned-left-cols-container .ag-row [col-id="attributes.`Run Name`"]'


@pytest.fixture(scope="module")
def server(native_sweep: Swept) -> Iterator[MlflowServer]:
    """`kd-tune ui NAME` serving the session's shared sweep (conftest.py, inspected by test_mlflow_native.py
    too): two label-noise levels sharing one clean teacher, alpha 0.5 at 1 and 2 epochs: a teacher run and
    four student runs under the sweep's parent, in the sqlite store the server serves."""
    with MlflowServer(native_sweep.folder, sweep=SWEEP) as srv:
        assert srv.store == native_sweep.uri
        yield srv


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_sweep_opens_on_its_runs_page_with_datasets_and_models(server: MlflowServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    pages = server.runs_pages()
    assert list(pages) == [SWEEP]  # `kd-tune ui NAME` printed that sweep's page only
    url = pages[SWEEP]
    assert url.startswith(f"http://127.0.0.1:{server.port}/#/experiments/") and "/runs?workflowType=machine_learning" in url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 560})
            page.goto(url)
            # The Runs page in the "Model training" view, without a click: its heading is "Runs" (the GenAI
            # view calls the same table "Training runs"), and the address was not sent to the overview.
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=60_000)
            expect(page.locator(ROWS)).to_have_count(1)  # the sweep's parent run; its children nest under it
            assert "/runs" in page.url and "overview" not in page.url and "workflowType=machine_learning" in page.url
            # Expand the sweep's row, as a user does, to list its runs.
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
            close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close.count():
                close.click()  # the assistant panel MLflow opens on a first visit: out of the screenshot's way
                expect(close).to_have_count(0)
            page.screenshot(path=str(SCREENSHOT if os.environ.get("KD_TUNE_UPDATE_DOCS") else tmp_path / SCREENSHOT.name))
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
