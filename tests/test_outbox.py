"""The tracking outbox's own logic (pure: a fake store that is up or down), and the tracking's other pure helpers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kd_tune.tracking.outbox import Outbox


class FakeStore:
    """A store that refuses every call while down; ``written`` is what reached it, in order."""

    def __init__(self) -> None:
        self.up = True
        self.written: list[int] = []
        self.calls = 0
        self.forgotten = 0

    def probe(self) -> None:
        if not self.up:
            raise ConnectionError("connection refused")

    def write(self, value: int) -> None:
        self.calls += 1
        self.probe()
        self.written.append(value)

    def forget(self) -> None:
        self.forgotten += 1


def outbox(store: FakeStore, lines: list[str], **kw: float) -> Outbox:
    return Outbox("fake://store", store.probe, store.forget, lines.append, first_backoff=0.001, max_backoff=0.01, **kw)


def test_jobs_are_shipped_in_order_and_put_returns_at_once() -> None:
    store, lines = FakeStore(), []
    gate = threading.Event()
    box = outbox(store, lines)
    box.put(gate.wait, "a slow first write")  # the sender is busy: put() must still return at once
    for i in range(5):
        box.put(lambda i=i: store.write(i), f"write {i}", steps=1)
    assert box.backlog().jobs == 6 and box.backlog().steps == 5
    gate.set()
    assert not box.drain(10)
    assert store.written == [0, 1, 2, 3, 4] and lines == []
    assert not box.close()


def test_an_outage_holds_writes_says_so_once_and_catches_up_in_order() -> None:
    store, lines = FakeStore(), []
    box = outbox(store, lines)
    box.put(lambda: store.write(0), "write 0", steps=1)
    assert not box.drain(10)
    store.up = False
    for i in range(1, 4):
        box.put(lambda i=i: store.write(i), f"write {i}", steps=1)
    left = box.drain(0.3)  # bounded wait: the store is away, nothing is dropped
    assert left.jobs == 3 and left.steps == 3 and store.written == [0]
    assert store.calls > 2  # retried meanwhile ...
    assert len(lines) == 1 and "unreachable" in lines[0] and "training goes on" in lines[0]  # ... but said once
    assert store.forgotten >= 1  # the retry reads the store again, not a stale cache
    store.up = True
    assert not box.drain(10)
    assert store.written == [0, 1, 2, 3]  # each once, in order
    assert len(lines) == 2 and "is back after" in lines[1]
    assert len(box.outages) == 1
    box.close()


def test_a_write_the_store_refuses_is_skipped_with_one_line_and_the_rest_go_on() -> None:
    store, lines = FakeStore(), []
    box = outbox(store, lines, attempts=3)

    def refused() -> None:
        raise ValueError("INVALID_PARAMETER_VALUE: metric value too long")

    box.put(refused, "epoch 2 of a0.5_T3_e2_s0")
    box.put(lambda: store.write(7), "write 7")
    assert not box.drain(10)
    assert store.written == [7]
    assert box.skipped == ["epoch 2 of a0.5_T3_e2_s0"]
    assert len(lines) == 1 and "could not record epoch 2 of a0.5_T3_e2_s0" in lines[0] and "INVALID_PARAMETER_VALUE" in lines[0]
    box.close()


def test_close_returns_what_was_never_sent() -> None:
    store, lines = FakeStore(), []
    store.up = False
    box = outbox(store, lines)
    box.put(lambda: store.write(1), "write 1", steps=1)
    box.put(lambda: store.write(2), "write 2", steps=1)
    left = box.close()
    assert left.jobs == 2 and left.steps == 2 and "2 tracking writes (2 epochs of metrics)" == left.describe()
    assert left.pending == ("write 1", "write 2")  # what they would have recorded, in order
    assert store.written == []


def test_a_sweep_that_ends_with_tracking_behind_exits_3_with_the_sync_command(capsys: pytest.CaptureFixture[str]) -> None:
    """What the CLI makes of a sweep whose trials all finished while the store was still away (the outcome is
    built by hand here; tests/test_outage.py ends a real sweep that way)."""
    import pandas as pd

    from kd_tune.cli.commands import TRACKING_BEHIND_EXIT, _report
    from kd_tune.sweep.results import RESULT_COLUMNS, SweepOutcome

    row = {"role": "student", "alpha": 0.5, "temperature": 3.0, "epochs": 2, "seed": 0, "label_noise": 0.0, "status": "finished",
           "how": "new", "test_acc": 0.9, "test_loss": 0.3, "teacher_agreement": 0.95}
    table = pd.DataFrame([row], columns=RESULT_COLUMNS)

    def outcome(behind: str, resume: str = "kd-tune resume s", teachers: bool = False) -> SweepOutcome:
        return SweepOutcome("s", "/store/s", table, 1, 1, 0, 0, "http://127.0.0.1:5000", "1", "p", 0.97, 12.0, resume, tracking_behind=behind,
                            tracking_needs_resume=teachers)

    assert _report(lambda log: outcome(""), quiet=True) == 0
    assert "still unreachable" not in capsys.readouterr().err
    assert _report(lambda log: outcome("3 tracking writes (2 epochs of metrics)"), quiet=True) == TRACKING_BEHIND_EXIT == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "http://127.0.0.1:5000 is still unreachable: 3 tracking writes (2 epochs of metrics)" in err[0]
    assert err[0].endswith("once it is back: kd-tune sync s")
    _report(lambda log: outcome("1 tracking writes (1 epochs of metrics)", "kd-tune resume s --storage /nfs/sweeps"), quiet=True)
    assert capsys.readouterr().err.strip().endswith("kd-tune sync s --storage /nfs/sweeps")  # the sweep's own storage
    # The teachers' runs still queued (the store went away at the start): only a resume records them.
    assert _report(lambda log: outcome("2 tracking writes (0 epochs of metrics)", teachers=True), quiet=True) == 3
    assert capsys.readouterr().err.strip().endswith("once it is back: kd-tune resume s (the teachers' runs are among them: "
                                                    "sync writes the trials' record only)")


def test_bad_tracking_wait_and_unknown_sync_name_are_one_line_exit_2_nothing_written(
        write_space: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kd_tune.cli.app import main

    from .conftest import tiny_space

    space = write_space(tiny_space())
    store = tmp_path / "store"
    assert main(["sweep", str(space), "--tracking-wait", "-1", "--storage", str(store)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "kd-tune sweep: error: --tracking-wait -1.0: allowed: seconds >= 0" and len(err) == 2
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
    assert main(["sync", "nope", "--storage", str(store)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("kd-tune sync: error: no sweep named 'nope' in ") and len(err) == 2


class _ErroredTrial:
    """What error_summary reads of a Tune trial: the driver's staging file, and Trial.get_error (the storage's copy)."""

    def __init__(self, error_file: str | None, stored: str | None) -> None:
        self._error_file, self.stored = error_file, stored

    @property
    def error_file(self) -> str | None:
        return self._error_file

    def get_error(self) -> str | None:
        return self.stored


def test_error_summary_reads_the_drivers_own_error_file_before_the_storage(tmp_path: Path) -> None:
    from kd_tune.sweep.callback import error_summary

    local = tmp_path / "error.txt"
    local.write_text("Failure # 1 (occurred at 2026-11-28_01-00-00)\nTraceback ...\nRuntimeError: injected fault\n")
    # Just after the error, Tune has not yet copied the file to the storage: the staging file is what exists.
    assert error_summary(_ErroredTrial(str(local), None)) == "RuntimeError: injected fault"
    # Read back later by another process (kd-tune sync): no staging file, the storage's copy.
    assert error_summary(_ErroredTrial(str(tmp_path / "gone.txt"), "ValueError: from storage\n")) == "ValueError: from storage"
    assert error_summary(_ErroredTrial(None, None)) == "unknown error"

    class NoStaging(_ErroredTrial):  # a trial read back from storage alone may not know its staging folder at all
        @property
        def error_file(self) -> str | None:
            raise AttributeError("no staging path")

    assert error_summary(NoStaging(None, "KeyError: 'x'")) == "KeyError: 'x'"

