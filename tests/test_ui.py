"""`kd-tune ui` serves the same store on 127.0.0.1 (a real MLflow server, stopped by PID)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd_tune.cli.app import main

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
