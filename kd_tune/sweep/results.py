"""A sweep's results as tables: the outcome of a run (one row per grid point) and the status read
back from storage, and how the CLI prints them.

A trial shared by several epochs values gives a row for each grid point it serves, with the
metrics it reported when it passed that epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kd_tune.distill.checkpoint import read_checkpoint, trial_results
from kd_tune.report.configs import knobs_key
from kd_tune.space.methods import changed_knobs
from kd_tune.space.parse import load_space_text
from kd_tune.space.trial_report import TrialReport
from kd_tune.space.trials import TrialConfig, TrialPoint, mutable_values
from kd_tune.sweep.state.storage import Storage
from kd_tune.sweep.state.sweep_files import SPACE_FILE, live_driver, resume_command
from kd_tune.sweep.state.tune_state import require_sweep

if TYPE_CHECKING:
    from ray import tune

RESULT_COLUMNS = ["role", "student", "teacher", "method", "knobs", "alpha", "temperature", "epochs", "seed", "label_noise", "status", "how",
                  "test_acc", "test_loss", "teacher_agreement"]
STATUS_COUNTS = ("finished", "stopped early", "running", "interrupted", "pending", "paused", "errored", "diverged")


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep (or a resume) ended with."""

    name: str
    path: str
    """The sweep's folder (a local path, or scheme://bucket/prefix/name)."""
    table: pd.DataFrame
    total: int
    finished: int
    errored: int
    diverged: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teacher_acc: float
    wall_seconds: float
    resume_command: str
    tracking_behind: str = ""
    """What had not reached the tracking store when the sweep ended (it was unreachable), e.g. "12 tracking writes (10 epochs of metrics)"."""
    tracking_needs_resume: bool = False
    """Among those, the driver's own writes (the teachers' runs): ``kd-tune resume`` makes them, ``sync`` (the trials' record) does not."""

    @property
    def ok(self) -> bool:
        return self.finished == self.total

    def summary_line(self) -> str:
        how = self.table["how"].value_counts().to_dict()
        resumed = "" if set(how) <= {"new"} else " (" + ", ".join(f"{n} {k}" for k, n in sorted(how.items())) + ")"
        return (f"sweep {self.name!r}: {self.finished}/{self.total} grid points finished, {self.errored} errored, "
                f"{self.diverged} diverged{resumed}, teacher test acc {self.teacher_acc:.4f}, {self.wall_seconds:.0f} s")


def results_table(result_grid: tune.ResultGrid, finished_before: set[str] | None = None) -> pd.DataFrame:
    """One row per grid point: its values, status, metrics at its epochs and how this run got them.

    ``how`` is ``new`` for a first run; on a resume ``restored`` (finished before, not rerun),
    ``resumed`` (continued from a checkpoint) or ``restarted``.
    """
    finished_before = finished_before or set()
    rows = []
    for i in range(len(result_grid)):
        r = result_grid[i]
        if not r.config:
            continue
        last = r.metrics or {}
        history = r.metrics_dataframe
        trial_id = str(last.get("trial_id", ""))
        if trial_id in finished_before:
            how = "restored"
        elif not finished_before:
            how = "resumed" if last.get("resumed_from") else "new"
        else:
            how = "resumed" if last.get("resumed_from") else "restarted"
        decoded = TrialConfig.decode(r.config)
        packed, report = decoded.packed, TrialReport.decode(last)
        saved: list[TrialReport] | None = None  # the reports its newest checkpoint holds, read when the files lack some
        for point in decoded.points:
            # A pack reports its members' metrics under members/<label>/ (Tune flattens the nested result).
            col = f"members/{point.label}/" if packed else ""
            diverged = report.is_gone(point.label)
            stopped = None if r.error or packed else point.stopped_at(last)  # a search trial the scheduler stopped: its last epoch's metrics
            for milestone in point.milestones:
                at: dict[str, Any] = {}
                if history is not None and f"{col}epoch" in history and f"{col}test_acc" in history:
                    match = history[(history[f"{col}epoch"] == (stopped or milestone)) & history[f"{col}test_acc"].notna()]
                    if len(match):
                        at = {k.removeprefix(col): v for k, v in match.iloc[-1].to_dict().items()}
                at = at or _last_at(report, point.label if packed else None, stopped or milestone)
                if not at and not r.error:
                    saved = _checkpoint_results(r) if saved is None else saved
                    at = next((a for m in saved if (a := _last_at(m, point.label if packed else None, stopped or milestone))), {})
                status = ("stopped early" if stopped and at else "finished" if at else "errored" if r.error else
                          "diverged" if diverged else "unfinished")
                rows.append({
                    "student": "", "teacher": "", **point.at(milestone).grid_config(), "knobs": knob_text(point, r.config), "status": status, "how": how,
                    "test_acc": at.get("test_acc"), "test_loss": at.get("test_loss"), "teacher_agreement": at.get("teacher_agreement"),
                })
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return df.sort_values(["role", "student", "teacher", "label_noise", "temperature", "alpha", "epochs", "seed"], na_position="first",
                          kind="stable").reset_index(drop=True)


def _checkpoint_results(result: tune.Result) -> list[TrialReport]:
    """The results a trial reported, as its newest checkpoint holds them (each holds the whole history); none if unreadable.

    Why: the history above comes from the result files Tune copies beside the trial; a full disk left them truncated
    there (issue 35), and the resumed trial appended only its new epochs to what was left, while its checkpoints
    are whole (a cut one reads as None)."""
    if result.checkpoint is None:
        return []
    try:
        with result.checkpoint.as_directory() as folder:
            state = read_checkpoint(Path(folder))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint tells nothing: the row stays as the files say
        return []
    return trial_results(state)


def _last_at(last: TrialReport, member: str | None, epoch: int) -> dict[str, Any]:
    """The metrics of the trial's last report (a pack ``member``'s part of it) if they are those of ``epoch``, else nothing.

    Why: the per-epoch history comes from the result files the driver writes beside the trial, while the
    last result is kept in Ray's experiment state; a driver killed between the two leaves a finished
    trial whose files lack its last epochs (seen in the kill tests), and a resume rightly does not rerun it.
    """
    part = last.of(member)  # Ray keeps the result as reported (nested), unlike the files
    if part is None or part.diverged or part.epoch != epoch or part.metrics.get("test_acc") is None:
        return {}
    return {"epoch": part.epoch, **part.metrics}


def knob_text(point: TrialPoint, config: Mapping[str, Any] | None = None) -> str:
    """A point's knobs that are not its method's defaults, written as the report writes knobs (``nckd_weight=2, warmup=1``),
    then its schedules, or for a population's member (its trial's ``config``) the values it ended with."""
    parts = [knobs_key(changed_knobs(point.method, point.knobs))]
    parts += [f"{name}={s.text()}" for name, s in (("alpha_schedule", point.alpha_schedule), ("temperature_schedule", point.temperature_schedule)) if s]
    if config is not None and (values := mutable_values(config)):
        parts.append("pbt, ended at " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    return ", ".join(p for p in parts if p)


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for axis in ("label_noise", "student", "teacher", "method", "knobs"):
        if shown[axis].nunique() <= 1:
            shown = shown.drop(columns=axis)  # not an axis of this sweep
    for col in ("test_acc", "teacher_agreement", "test_loss"):
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["temperature"] = shown["temperature"].map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    return str(shown.to_string(index=False))


@dataclass(frozen=True)
class SweepStatus:
    """A sweep's trials as its storage tells them (no Ray cluster needed)."""

    name: str
    path: str
    counts: dict[str, int]
    table: pd.DataFrame
    driver_alive: bool
    resume_command: str
    planned: int = 0
    """Trials the sweep will have in all (a search suggests its trials as it goes)."""

    def format(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        shown = self.table.copy()
        shown["test_acc"] = shown["test_acc"].map(lambda v: "" if v is None or v != v else f"{v:.4f}")
        lines = [f"sweep {self.name!r} in {self.path}: {counts}; driver {'running' if self.driver_alive else 'not running'}",
                 shown.to_string(index=False)]
        if self.planned > len(self.table):
            lines.append(f"{self.planned - len(self.table)} more search trials to come (not suggested yet)")
        if not self.driver_alive and self.counts["finished"] + self.counts["stopped early"] < self.planned:
            lines.append(f"to continue: {self.resume_command}")
        return "\n".join(lines)


def _member_epoch(last: TrialReport, label: str) -> int:
    """A pack member's last epoch as its trial's last report tells it (a diverged member stopped earlier)."""
    own = last.of(label)
    if own is not None:
        return own.epoch - (1 if own.diverged else 0)
    return 0 if last.is_gone(label) else last.epoch


def sweep_status(name: str, root: Storage) -> SweepStatus:
    """Trials finished / running / pending / errored, read from the sweep's storage (no Ray needed).

    Raises :class:`~kd_tune.errors.UsageError` when there is no sweep of that name.
    """
    from ray import tune

    path = require_sweep(root, name)
    alive = live_driver(root, name) is not None
    names = {"TERMINATED": "finished", "RUNNING": "running" if alive else "interrupted", "PENDING": "pending",
             "ERROR": "errored", "PAUSED": "paused"}
    rows = []
    for t in tune.ExperimentAnalysis(path, storage_filesystem=root.ray_filesystem).trials:
        last = t.last_result or {}
        decoded = TrialConfig.decode(t.config)
        report = TrialReport.decode(last)
        if decoded.packed:  # a row per member, as the unpacked sweep's trial of that member would give
            for point in decoded.points:
                own = report.of(point.label)
                status = "diverged" if report.is_gone(point.label) else names.get(t.status, t.status.lower())
                rows.append({"trial": point.label, "status": status, "epoch": f"{_member_epoch(report, point.label):d}/{point.epochs}",
                             "test_acc": None if own is None else own.metrics.get("test_acc")})
            continue
        point = decoded.point
        status = "diverged" if report.diverged else names.get(t.status, t.status.lower())
        if status == "finished" and point.stopped_at(last):
            status = "stopped early"
        rows.append({"trial": point.label, "status": status,
                     "epoch": f"{report.epoch}/{point.epochs}", "test_acc": report.students[None].metrics.get("test_acc")})
    table = pd.DataFrame(rows, columns=["trial", "status", "epoch", "test_acc"]).sort_values("trial").reset_index(drop=True)
    counts = {k: int((table["status"] == k).sum()) for k in STATUS_COUNTS}
    planned = len(table)
    if root.exists(name, SPACE_FILE):
        spec = load_space_text(root.read_text(name, SPACE_FILE), root.show(name, SPACE_FILE))
        planned = max(planned, len(spec.trials()) + spec.search.num_samples)
    return SweepStatus(name, root.show(name), counts, table, alive, resume_command(name, root), planned)


__all__ = ["SweepOutcome", "SweepStatus", "format_table", "results_table", "sweep_status"]
