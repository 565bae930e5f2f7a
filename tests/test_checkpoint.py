"""The one checkpoint format: weights with the arguments that rebuild their model, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from kd_tune.checkpoint import STATE_FILE, load_model_file, model_from_state, read_checkpoint, save_checkpoint, save_model_file
from kd_tune.models import build_model
from kd_tune.train import make_optimizer


def test_checkpoint_and_model_file_rebuild_the_model_without_its_spec(tmp_path: Path) -> None:
    model = build_model((3, 5), (3, 20, 18), 7, seed=4)  # not MNIST's shape: the args must carry it
    optimizer = make_optimizer(model, 1e-3)
    save_checkpoint(tmp_path, model, optimizer, [{"epoch": 2.0, "test_acc": 0.5}], [[1, 0], [0, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left
    state = read_checkpoint(tmp_path)
    assert state is not None and state["epoch"] == 2
    assert state["model_args"] == {"widths": [3, 5], "in_shape": [3, 20, 18], "num_classes": 7}
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
