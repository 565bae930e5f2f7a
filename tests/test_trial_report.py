"""The one codec of a trial's reports (kd_tune.space.trial_report): what goes to Tune, and what comes back."""

from __future__ import annotations

import dataclasses
import json

from kd_tune.distill.epochs import EpochMetrics
from kd_tune.space.trial_report import REPORTED_METRICS, SCHEDULE_METRICS, StudentEpoch, TrialReport
from kd_tune.tracking.tags import EPOCH_METRICS

WHERE = {"device": "cpu", "node_id": "abc", "resumed_from": 2, "train_images": 900, "val_images": 100}


def test_the_reported_metrics_are_the_training_layers_epoch_metrics_and_what_a_run_logs() -> None:
    assert REPORTED_METRICS == tuple(f.name for f in dataclasses.fields(EpochMetrics) if f.name != "epoch") + SCHEDULE_METRICS
    assert EPOCH_METRICS == REPORTED_METRICS


def test_a_one_student_report_is_flat_so_tune_finds_its_metric() -> None:
    wire = TrialReport.one(StudentEpoch(3, {"val_acc": 0.9, "test_acc": 0.8}), WHERE).encode()
    assert wire == {"epoch": 3, "val_acc": 0.9, "test_acc": 0.8, **WHERE}
    # What Tune hands back also carries its own keys (done, trial_id, time_this_iter_s...): none reaches the students.
    back = TrialReport.decode({**wire, "done": False, "trial_id": "t1", "time_this_iter_s": 1.5, "node_ip": "10.0.0.1"})
    assert not back.packed and not back.diverged and back.epoch == 3
    assert back.of(None) == back.of("any-label") == StudentEpoch(3, {"val_acc": 0.9, "test_acc": 0.8})
    assert back.where == {**WHERE, "node_ip": "10.0.0.1"}


def test_a_diverged_student() -> None:
    wire = TrialReport.one(StudentEpoch(4, diverged_loss=float("inf"))).encode()
    assert wire == {"epoch": 4, "diverged": 1.0, "diverged_loss": float("inf")}
    back = TrialReport.decode(wire)
    assert back.diverged and back.is_gone(None) and back.students[None].epoch == 4 and back.students[None].metrics == {}


def test_a_pack_nests_its_members_and_lists_those_gone() -> None:
    parts = {"a0.5-T3-e2-s0": StudentEpoch(2, {"test_acc": 0.7}), "a1-T3-e2-s0": StudentEpoch(2, diverged_loss=float("nan"))}
    report = TrialReport.pack(2, parts, ["a1-T3-e2-s0", "a0-T3-e2-s0"], WHERE)
    wire = report.encode()
    assert wire["members"]["a0.5-T3-e2-s0"] == {"epoch": 2, "test_acc": 0.7}
    assert wire["members"]["a1-T3-e2-s0"]["diverged"] == 1.0
    assert wire["diverged_members"] == ["a0-T3-e2-s0", "a1-T3-e2-s0"]  # a real list, sorted
    back = TrialReport.decode(json.loads(json.dumps(wire)))  # as a result file keeps it
    assert back.packed and not back.diverged and back.epoch == 2
    assert back.of("a0.5-T3-e2-s0") == StudentEpoch(2, {"test_acc": 0.7})
    assert back.is_gone("a1-T3-e2-s0") and back.is_gone("a0-T3-e2-s0") and not back.is_gone("a0.5-T3-e2-s0")
    assert back.of("a0-T3-e2-s0") is None and back.of(None) is None


def test_a_pack_report_written_before_the_codec_still_reads() -> None:
    old = {"epoch": 3, "members": {"x": {"epoch": 3, "test_acc": 0.5}}, "diverged_members": "y,z", "device": "cpu"}
    back = TrialReport.decode(old)
    assert back.diverged_members == ("y", "z") and back.is_gone("z") and back.of("x") == StudentEpoch(3, {"test_acc": 0.5})
    assert TrialReport.decode({**old, "diverged_members": ""}).diverged_members == ()


def test_a_history_entry_becomes_a_part() -> None:
    m = EpochMetrics(epoch=5, train_loss=1.0, train_hard_loss=0.5, train_distill_loss=1.5, test_acc=0.9, test_loss=0.3, teacher_agreement=None,
                     test_macro_precision=0.9, test_macro_recall=0.9, test_macro_f1=0.9, test_ece=0.01, epoch_seconds=2.0, val_acc=0.91)
    part = StudentEpoch.of(m.as_dict())
    assert part.epoch == 5 and not part.diverged
    assert set(part.metrics) == set(REPORTED_METRICS) - {"teacher_agreement", "val_loss", *SCHEDULE_METRICS}  # None values are not reported; constant alpha and T neither
    assert TrialReport.one(part).encode() == m.as_dict()
