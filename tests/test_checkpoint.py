"""The one checkpoint format: weights with the arguments that rebuild their model, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from kd_tune.distill.checkpoint import STATE_FILE, load_model_file, model_from_state, read_checkpoint, save_checkpoint, save_model_file
from kd_tune.distill.models import model_args
from kd_tune.distill.models.cnn import build_cnn
from kd_tune.distill.train import make_optimizer


def test_checkpoint_and_model_file_rebuild_the_model_without_its_spec(tmp_path: Path) -> None:
    model = build_cnn((3, 5), (3, 20, 18), 7, seed=4)  # not MNIST's shape: the args must carry it
    optimizer = make_optimizer(model, 1e-3)
    save_checkpoint(tmp_path, model_args("cnn", {"widths": (3, 5)}, (3, 20, 18), 7), model, optimizer, [{"epoch": 2.0, "test_acc": 0.5}], [[1, 0], [0, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left
    state = read_checkpoint(tmp_path)
    assert state is not None and state["epoch"] == 2
    assert state["model_args"] == {"arch": "cnn", "args": {"widths": [3, 5]}, "in_shape": [3, 20, 18], "num_classes": 7}
    x = torch.randn(4, 3, 20, 18)
    expected = model.eval()(x)
    assert torch.equal(model_from_state(state)(x), expected)

    save_model_file(tmp_path / "student.pt", state["model_args"], state["model"])
    assert set(torch.load(tmp_path / "student.pt", weights_only=True)) == {"model_args", "model"}  # no optimizer state
    assert torch.equal(load_model_file(tmp_path / "student.pt")(x), expected)


def test_a_torn_checkpoint_reads_as_missing(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\x80\x02torn")
    assert read_checkpoint(tmp_path) is None
    assert read_checkpoint(tmp_path / "nowhere") is None


def test_checkpoints_tune_deleted_before_its_state_was_saved_get_stand_ins(tmp_path: Path) -> None:
    """A kill between Tune deleting a trial's old checkpoint (num_to_keep) and saving the experiment state that stops
    naming it: the resume would fail on the missing folder. kd-tune makes it again, as a stand-in that tells the trial
    the epoch Ray knew, and the trial takes its newest complete checkpoint (unit test on a state shaped as Ray 2.60's)."""
    import json
    import pickle

    from kd_tune.sweep.state.storage import resolve_storage
    from kd_tune.sweep.state.trial_state import lost_checkpoint_epoch, newest_persisted
    from kd_tune.sweep.state.tune_state import LOST_CHECKPOINT_FILE, repair_experiment_state

    sweep, trial = tmp_path / "study", "a0-T3-e5-s0_8d08f_00000"
    model = build_cnn((3, 5), (1, 28, 28), 10, seed=0)
    (sweep / trial / "checkpoint_000002").mkdir(parents=True)
    save_checkpoint(sweep / trial / "checkpoint_000002", model_args("cnn", {"widths": (3, 5)}, (1, 28, 28), 10), model, make_optimizer(model, 1e-3), [{"epoch": e} for e in (1.0, 2.0, 3.0)], [[1]])
    # Ray's state: the trial's checkpoint manager (pickled, hex) keeps checkpoint_000000 and _000001, its last result is epoch 2.
    manager = pickle.dumps({"kept": [f"{sweep}/{trial}/checkpoint_00000{i}" for i in (0, 1)]}).hex()
    runtime = {"last_result": {"epoch": 2.0, "checkpoint_dir_name": "checkpoint_000001"}, "checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": manager}}
    (sweep / "experiment_state-2026-11-27_21-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps({"trial_id": "8d08f_00000", "relative_logdir": trial}), json.dumps(runtime)]]}))

    storage = resolve_storage(str(tmp_path))
    assert repair_experiment_state(storage, "study") is False  # the state file itself was whole
    lost0, lost1 = sweep / trial / "checkpoint_000000", sweep / trial / "checkpoint_000001"
    assert sorted(p.name for p in lost1.iterdir()) == [LOST_CHECKPOINT_FILE]
    assert lost_checkpoint_epoch(lost1) == 2  # the one the trial restores from: Ray knew epoch 2
    assert lost_checkpoint_epoch(lost0) == 0  # only ever deleted by Tune
    assert not list((sweep / trial).glob(".*"))  # no staging folder left
    newest = newest_persisted(storage, f"study/{trial}")
    assert newest is not None and newest["epoch"] == 3  # the stand-ins are not checkpoints to train from
    repair_experiment_state(storage, "study")  # again: nothing to make, nothing changed
    assert sorted(p.name for p in (sweep / trial).iterdir()) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
