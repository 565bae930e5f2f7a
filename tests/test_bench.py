"""The benchmark's quick mode runs end to end (it measures nothing: timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import FIXTURE_DATA, REPO

pytestmark = pytest.mark.integration


def test_benchmark_quick_mode_prints_every_ratio() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--data-dir", str(FIXTURE_DATA)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "\nmachine: " in out or out.startswith("machine: ")
    for measure in ("KD epoch (cached teacher logits) / scratch epoch", "naive KD epoch", "torchvision DataLoader epoch",
                    "concurrency: student epochs/s", "sweep overhead:"):
        assert measure in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| measure") and "---" not in ln]
    assert len(rows) == 4
    for row in rows:
        ratio = float(row.split("|")[4])
        assert ratio > 0
