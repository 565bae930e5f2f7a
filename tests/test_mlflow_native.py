"""What makes a sweep native in MLflow: the experiment's kind, each run's datasets and its MLflow model,
each logged once, and `kd-tune ui` naming each sweep's runs page.

One tiny real sweep (real Ray, real sqlite MLflow store; conftest.py's session-scoped ``native_sweep``,
shared with test_mlflow_ui.py) serves every integration test here: two label-noise levels (0 and 0.2)
sharing one clean teacher, alpha 0.5, epochs 1 and 2 (one trial per level with epoch sharing): a teacher
run and four student runs under the parent.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Run
from mlflow.tracking import MlflowClient
from ray import tune

from kd_tune.cli.app import main
from kd_tune.data.split import DataSplit, flip_labels, normalize, prepare
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.errors import FlagError
from kd_tune.space.schema import SweepSpec
from kd_tune.sweep.callback import MlflowTrackingCallback
from kd_tune.sweep.state.storage import resolve_storage
from kd_tune.sweep.state.sweep_files import sweep_path
from kd_tune.tracking.datasets import dataset_inputs, log_dataset_inputs
from kd_tune.tracking.grid_view import GRID_VIEW
from kd_tune.tracking.logged_models import input_example, log_model_once, using_tracking_uri
from kd_tune.tracking.runs import get_or_create_experiment, sweep_experiments
from kd_tune.tracking.tags import DATASET_CONTEXT_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TAG_ROLE
from kd_tune.tracking.ui import runs_page, ui_lines

from .conftest import FIXTURE_DATA, NATIVE_SWEEP, Swept

SWEEP = NATIVE_SWEEP


@pytest.fixture
def swept(native_sweep: Swept) -> Swept:
    """The session's shared sweep (conftest.py), which test_mlflow_ui.py's tests inspect too."""
    return native_sweep


def _contexts(run: Run) -> dict[str, tuple[str, str]]:
    """context -> (dataset name, digest) of a run's dataset inputs (each context once)."""
    out: dict[str, tuple[str, str]] = {}
    for d in run.inputs.dataset_inputs:
        (context,) = [t.value for t in d.tags if t.key == DATASET_CONTEXT_TAG]
        assert context not in out, f"{context} twice on {run.info.run_name}"
        out[context] = (d.dataset.name, d.dataset.digest)
    return out


def _split(spec: SweepSpec) -> DataSplit:
    ds = spec.dataset
    return prepare(ds.name, ds.train_size, 0.0, ds.seed, FIXTURE_DATA, lambda s: None, val_size=ds.val_size, normalize=ds.normalize)


# --- the experiment ---------------------------------------------------------------------------


@pytest.mark.integration
def test_sweep_experiment_is_tagged_as_model_training_also_when_reattached(swept: Swept) -> None:
    client = swept.client
    assert client.get_experiment(swept.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # An experiment switched to GenAI (or made before the tag existed) is tagged again when reattached...
    client.set_experiment_tag(swept.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    assert get_or_create_experiment(client, SWEEP) == swept.experiment_id
    assert client.get_experiment(swept.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # ... and when `kd-tune ui` lists the sweeps; an experiment that is no sweep is neither listed nor tagged.
    other = client.create_experiment("not-a-sweep")
    client.set_experiment_tag(swept.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    assert sweep_experiments(client) == {SWEEP: swept.experiment_id}
    assert client.get_experiment(swept.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags


# --- datasets -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_every_run_records_its_datasets_with_digests_per_noise_level(swept: Swept) -> None:
    teacher, parent = swept.runs["teacher"][0], swept.runs["sweep"][0]
    by_noise: dict[str, dict[str, tuple[str, str]]] = {}
    for run in swept.children():
        contexts = _contexts(run)
        assert set(contexts) == {"training", "validation", "test"}  # tiny_space holds out 100 validation images
        noise = run.data.params["label_noise"]
        assert by_noise.setdefault(noise, contexts) == contexts  # the e1 and e2 runs of a level: the same data
    clean, noisy = by_noise["0.0"], by_noise["0.2"]
    assert clean["training"][0] == "mnist-train" and noisy["training"][0] == "mnist-train-n0.2"
    assert clean["training"][1] != noisy["training"][1]  # other labels, another digest
    assert clean["validation"] == noisy["validation"] == ("mnist-val", clean["validation"][1])
    assert clean["test"] == noisy["test"] == ("mnist-test", clean["test"][1])
    assert _contexts(teacher) == clean  # teacher.clean: it learned from the clean labels
    # The parent row shows the whole sweep: both training sets, validation and test, and the teacher.
    datasets = {(d.dataset.name, d.dataset.digest) for d in parent.inputs.dataset_inputs}
    assert datasets == {clean["training"], noisy["training"], clean["validation"], clean["test"]}
    # (search_runs leaves model inputs out, so MLflow's runs table cannot show them: the run page does)
    assert [m.model_id for m in client_get(swept, parent).inputs.model_inputs] == [m.model_id for m in teacher.outputs.model_outputs]
    d = next(i.dataset for i in teacher.inputs.dataset_inputs if i.dataset.name == "mnist-train")
    profile = json.loads(d.profile)
    assert profile["num_rows"] == 1000 and profile["features_shape"] == [1000, 1, 28, 28] and sum(profile["class_counts"]) == 1000
    assert set(json.loads(d.source)) == {"uri"} and d.source_type == "local"


def test_dataset_inputs_without_validation_split_and_what_the_digest_covers(tmp_path: Path) -> None:
    split = prepare("mnist", 200, 0.0, 0, FIXTURE_DATA, lambda s: None)  # val_size 0: no validation split
    assert split.val_y.numel() == 0
    noisy = split.train_y.roll(1)
    inputs = dataset_inputs(split, {0.0: split.train_y, 0.3: noisy}, tmp_path)
    assert [(d.name, d.context) for d in inputs[0.3]] == [("mnist-train-n0.3", "training"), ("mnist-test", "test")]
    assert inputs[0.0][0].digest != inputs[0.3][0].digest and inputs[0.0][1] == inputs[0.3][1]
    assert json.loads(inputs[0.0][0].source) == {"uri": str(tmp_path)}
    # The same images and labels under another preprocessing are another dataset.
    standardized = dataset_inputs(replace(split, normalize=not split.normalize), {0.0: split.train_y}, tmp_path)
    assert standardized[0.0][0].digest != inputs[0.0][0].digest
    # Explicit validation tensors are used when given; the entity carries MLflow's context tag.
    with_val = dataset_inputs(split, {0.0: split.train_y}, tmp_path, val=(split.test_x[:10], split.test_y[:10]))[0.0]
    assert [d.context for d in with_val] == ["training", "validation", "test"]
    entity = with_val[1].entity()
    assert entity.dataset.name == "mnist-val" and [(t.key, t.value) for t in entity.tags] == [(DATASET_CONTEXT_TAG, "validation")]


# --- models -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_each_run_has_an_mlflow_model_that_reproduces_its_test_acc(swept: Swept) -> None:
    client, split = swept.client, _split(swept.spec)
    test_x = normalize(split.test_x, split.info, standardize=split.normalize)  # as in training
    with using_tracking_uri(swept.uri):  # models:/ URIs are read from MLflow's process-wide store (put back after the test)
        _check_logged_models(swept, client, split, test_x)


def _check_logged_models(swept: Swept, client: MlflowClient, split: DataSplit, test_x: torch.Tensor) -> None:
    for run in [*swept.children(), *swept.runs["teacher"]]:
        (output,) = run.outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        name = run.data.tags[TAG_ROLE]
        assert logged.name == name and logged.source_run_id == run.info.run_id and logged.experiment_id == swept.experiment_id
        assert logged.status == LoggedModelStatus.READY
        # The model's files live with the LoggedModel, not in the run's own model/ folder.
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == [f"model/{name}.pt"]
        model = mlflow.pytorch.load_model(logged.model_uri)
        with torch.no_grad():
            acc = (model(test_x).argmax(dim=1) == split.test_y).float().mean().item()
        assert acc == pytest.approx(run.data.metrics["test_acc"], abs=1e-6), run.info.run_name
        # The run's last epoch's metrics are linked to the model (its page in MLflow shows them).
        assert {m.key: m.value for m in logged.metrics}["test_acc"] == run.data.metrics["test_acc"]
    # The signature and the input example: images as the models see them, any batch size.
    model_info = mlflow.models.get_model_info(logged.model_uri)
    assert model_info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 28, 28)}
    assert model_info.saved_input_example_info is not None


@pytest.mark.integration
def test_a_reattached_run_gets_no_second_model_or_dataset(swept: Swept) -> None:
    """A restored driver (a fresh callback, the real trials from Ray's saved state) finds the runs again
    and finishes them again: each keeps its one model and its three datasets."""
    client = swept.client
    before = {r.info.run_id: (len(r.inputs.dataset_inputs), [m.model_id for m in r.outputs.model_outputs]) for r in swept.children()}
    storage = resolve_storage(swept.storage)
    trials = tune.ExperimentAnalysis(sweep_path(storage, SWEEP), storage_filesystem=storage.ray_filesystem).trials
    split, ds = _split(swept.spec), swept.spec.dataset
    labels = {n: flip_labels(split.train_y, n, ds.seed, split.info.num_classes) for n in swept.spec.noise_levels()}  # as the sweep does
    callback = MlflowTrackingCallback(tracking_uri=swept.uri, experiment_id=swept.experiment_id, parent_run_id=swept.runs["sweep"][0].info.run_id,
                                      sweep=SWEEP, static_params=swept.spec.run_params(), inputs=dataset_inputs(split, labels),
                                      example=input_example(split))
    callback.setup()
    reattached = set()
    for trial in trials:
        for milestone in trial.config["point"]["milestones"]:
            run_id = callback.recorder.run_id(str(trial.trial_id), trial.config, milestone)  # found by its tags; its datasets are checked, none is missing
            with tempfile.TemporaryDirectory() as tmp:
                blob = torch.load(client.download_artifacts(run_id, "model/student.pt", tmp), weights_only=True)
            assert callback.recorder.log_model(run_id, {**blob, "epoch": milestone}) == before[run_id][1][0]  # the model it has
            reattached.add(run_id)
    assert reattached == set(before)
    after = {r.info.run_id: (len(r.inputs.dataset_inputs), [m.model_id for m in r.outputs.model_outputs]) for r in _runs(swept, "student")}
    assert after == before
    assert len(client.search_logged_models([swept.experiment_id])) == 5  # four students and the teacher


def test_a_model_cut_short_is_replaced_and_a_dataset_with_new_data_is_added(tmp_path: Path) -> None:
    """A kill while logging a model leaves it PENDING: the next try deletes it and logs a whole one, or, when
    MLflow had linked it to the run already, completes it in place (the run never points at two models). A
    dataset of the same name with other data (another digest) is another input, not a repeat."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("cut-short", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    pending = client.create_logged_model(experiment_id, name="student", source_run_id=run_id)
    split = prepare("mnist", 100, 0.0, 0, FIXTURE_DATA, lambda s: None)
    state = {"model_args": {"arch": "cnn", "args": {"widths": [4, 8]}, "in_shape": [1, 28, 28], "num_classes": 10},
             "model": build_cnn([4, 8], (1, 28, 28), 10, seed=0).state_dict()}
    model_id = log_model_once(client, run_id, state, input_example(split), "student")
    assert model_id != pending.model_id
    assert [(m.model_id, m.status) for m in client.search_logged_models([experiment_id])] == [(model_id, LoggedModelStatus.READY)]
    assert log_model_once(client, run_id, state, input_example(split), "student") == model_id
    linked_run = client.create_run(experiment_id).info.run_id  # cut short after MLflow linked the model to its run
    linked = client.create_logged_model(experiment_id, name="student", source_run_id=linked_run)
    client.log_outputs(linked_run, [LoggedModelOutput(linked.model_id, step=0)])
    assert log_model_once(client, linked_run, state, input_example(split), "student") == linked.model_id
    assert client.get_logged_model(linked.model_id).status == LoggedModelStatus.READY
    assert [o.model_id for o in client.get_run(linked_run).outputs.model_outputs] == [linked.model_id]
    first = dataset_inputs(split, {0.0: split.train_y})[0.0]
    assert log_dataset_inputs(client, run_id, first) == 2 and log_dataset_inputs(client, run_id, first) == 0
    other = dataset_inputs(split, {0.0: split.train_y.roll(1)})[0.0]
    assert log_dataset_inputs(client, run_id, other) == 1  # the training set with other labels; the test set is the same
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 3


# --- kd-tune ui ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_ui_prints_each_sweeps_runs_page(swept: Swept) -> None:
    url = runs_page("127.0.0.1", 5123, swept.experiment_id)
    assert url == f"http://127.0.0.1:5123/#/experiments/{swept.experiment_id}/runs?workflowType=machine_learning"
    lines = ui_lines(swept.uri, "127.0.0.1", 5123)
    assert lines[0] == f"MLflow UI for {swept.uri} on http://127.0.0.1:5123 (Ctrl+C stops it)"
    assert f"  {SWEEP}  {url}&viewStateShareKey={GRID_VIEW}" in lines
    assert ui_lines(swept.uri, "10.1.2.3", 80, SWEEP)[1:3] == [f"sweep {SWEEP!r}: its grid points (best first), then its report's figures:",
                                                               f"  {SWEEP}  {runs_page('10.1.2.3', 80, swept.experiment_id, GRID_VIEW)}"]


@pytest.mark.integration
def test_ui_refuses_an_unknown_sweep_naming_the_known_ones(swept: Swept, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FlagError, match=f"sweep 'nope' is not tracked in {swept.uri}; allowed: one of the sweeps there: {SWEEP}"):
        ui_lines(swept.uri, "127.0.0.1", 5000, "nope")
    assert main(["ui", "--tracking-uri", swept.uri, "nope"]) == 2  # refused before the server would replace this process
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("kd-tune ui: error: sweep 'nope' is not tracked in") and err[0].endswith(SWEEP)


def client_get(swept: Swept, run: Run) -> Run:
    return swept.client.get_run(run.info.run_id)


def _runs(swept: Swept, role: str) -> list[Run]:
    return MlflowClient(swept.uri).search_runs([swept.experiment_id], f"tags.`{TAG_ROLE}` = '{role}'")
