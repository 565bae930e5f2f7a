"""Shared fixtures: a slice of real MNIST (2,000 training and 500 test digits, torchvision layout)
and tiny search spaces that finish in seconds on a 2-core machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "mnist_slice"
REPO = Path(__file__).resolve().parent.parent


def tiny_space(**overrides: Any) -> dict[str, Any]:
    """A valid search space with tiny models; overrides replace whole top-level sections."""
    space: dict[str, Any] = {
        "name": "tiny",
        "dataset": {"name": "mnist", "train_size": 1000, "label_noise": 0.0, "val_size": 100},
        "teacher": {"widths": [8, 16], "epochs": 1, "lr": 0.003, "batch_size": 64},
        "student": {"widths": [4, 8], "lr": 0.003, "batch_size": 64},
        "grid": {"alpha": [0.0, 1.0], "temperature": [3.0], "epochs": [1, 2], "seed": [0]},
        "resources": {"cpu": 1, "gpu": 0},
    }
    space.update(overrides)
    return space


@pytest.fixture
def write_space(tmp_path: Path) -> Callable[..., Path]:
    def write(space: dict[str, Any] | str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(space if isinstance(space, str) else yaml.safe_dump(space, sort_keys=False))
        return path

    return write


@pytest.fixture
def fixture_data() -> Path:
    return FIXTURE_DATA
