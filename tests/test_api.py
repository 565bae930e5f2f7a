"""kd-tune's Python API (kd_tune.api), in this process as a notebook would drive it: the docs' worked example run on the
MNIST slice, its tables against the MLflow record and the report the command writes, a second sweep in the same
process, Ctrl+C then a resume, the process left as it was found, bad input refused with the command's one line, the
compact progress line, and ``import kd_tune`` loading no library.

The sweeps join one Ray that this module starts itself, as a user's ``ray.init()`` would (``address="local"``: a plain
``ray.init()`` would join whatever cluster another test left on this machine); each must leave it running.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from inspect import signature
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import kd_tune
from kd_tune.cli.app import main

from .conftest import FIXTURE_DATA, REPO, tiny_space

EXAMPLE = REPO / "docs" / "examples" / "python_api.py"
EXAMPLE_NAME = "api_example"
HEAVY = ("torch", "numpy", "ray", "mlflow", "pyarrow", "pandas", "yaml")


def process_state() -> dict[str, Any]:
    """What a sweep must leave as it found it: the environment, the collector, every logger that exists now (level,
    handlers, filters, propagate, disabled) and logging's disable level, the working folder, MLflow's tracking URI (its
    module global and what ``mlflow.get_tracking_uri()`` answers), the handlers of Ctrl+C and the stop signals, and the
    Ray this process runs (its node)."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as fluent
    import ray

    loggers = {name: (lg.level, tuple(lg.handlers), tuple(lg.filters), lg.propagate, lg.disabled)
               for name, lg in [("", logging.root), *logging.Logger.manager.loggerDict.items()] if isinstance(lg, logging.Logger)}
    return {
        "environ": dict(os.environ),
        "gc": (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()),
        "loggers": loggers,
        "logging.disable": logging.root.manager.disable,
        "cwd": os.getcwd(),
        "mlflow": (fluent._tracking_uri, mlflow.get_tracking_uri()),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
        "ray": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
    }


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed, said per variable or logger (loggers made in between are not compared: modules imported then made them)."""
    out = []
    for key, was in before.items():
        now = after[key]
        if key == "environ":
            out += [f"${k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        elif key == "loggers":
            out += [f"logger {name!r}: {state} -> {now.get(name)}" for name, state in was.items() if now.get(name) != state]
        elif was != now:
            out.append(f"{key}: {was!r} -> {now!r}")
    return out


# --- no sweep: these run before the module's Ray starts ---


def test_import_kd_tune_loads_no_library() -> None:
    """``import kd_tune``, even its API's names and errors looked up, loads neither torch, Ray, MLflow nor pandas."""
    code = ("import sys, kd_tune\nkd_tune.run, kd_tune.resume, kd_tune.load, kd_tune.Sweep, kd_tune.UsageError, kd_tune.KdTuneError\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert set(kd_tune.__all__) <= set(dir(kd_tune))
    with pytest.raises(AttributeError):
        kd_tune.no_such_name  # noqa: B018


def test_bad_input_raises_usage_error_with_the_commands_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad space (as a file and as a dict) and a bad value: the one exception, whose message is the command's error
    line without its prefix; nothing is started or written."""
    import ray

    bad = tiny_space(grid={"alpha": [0.0, 1.5], "temperature": [3.0], "epochs": [1], "seed": [0]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    store = tmp_path / "store"

    def cli_line(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("kd-tune sweep: error: ") and len(err) == 2
        return err[0].removeprefix("kd-tune sweep: error: ")

    line = cli_line("sweep", str(path), "--storage", str(store))
    with pytest.raises(kd_tune.UsageError) as from_file:
        kd_tune.run(path, storage=store)
    assert str(from_file.value) == line
    with pytest.raises(kd_tune.UsageError) as from_dict:
        kd_tune.run(bad, storage=store)
    assert str(from_dict.value) == line.replace(str(path), "<dict>") == "<dict>: key 'grid.alpha[1]': bad value 1.5; allowed: a number in [0, 1]"
    assert isinstance(from_dict.value, kd_tune.KdTuneError) and from_dict.value.exit_code == 2

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_space(), sort_keys=False))
    line = cli_line("sweep", str(good), "--storage", str(store), "--pack", "0")
    with pytest.raises(kd_tune.UsageError) as flag:
        kd_tune.run(tiny_space(), storage=store, pack=0)
    assert str(flag.value) == line and line.startswith("--pack 0: allowed: an integer in [1, ")
    with pytest.raises(kd_tune.UsageError, match=r"^progress 'lines': allowed: 'line', 'table' or None$"):
        kd_tune.run(tiny_space(), storage=store, progress="lines")  # type: ignore[arg-type]
    with pytest.raises(kd_tune.UsageError, match=r"^no sweep named 'nothing' in "):
        kd_tune.resume("nothing", storage=store)
    with pytest.raises(kd_tune.UsageError, match=r"^sweep name '\.\./x' is not allowed"):
        kd_tune.load("../x", storage=store)
    assert not store.exists() and not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "good.yaml"]


def test_the_api_takes_every_flag_of_sweep_and_resume() -> None:
    """Each flag of ``kd-tune sweep`` and ``kd-tune resume`` is a keyword of ``run`` and ``resume`` of the same name
    (``--no-share-epochs`` is ``share_epochs``; ``--quiet`` is ``progress=None, log=None``)."""
    from kd_tune.cli.args import ResumeArgs, SweepArgs

    run_params, resume_params = set(signature(kd_tune.run).parameters), set(signature(kd_tune.resume).parameters)
    renamed = {"space": "space", "no_share_epochs": "share_epochs", "quiet": "progress"}
    assert {renamed.get(f.name, f.name) for f in fields(SweepArgs)} <= run_params
    assert {renamed.get(f.name, f.name) for f in fields(ResumeArgs) if f.name != "ship_code"} <= resume_params  # ship_code: a job's
    assert {"log", "interrupt"} <= run_params & resume_params


def _table(text: str, heading: str) -> list[str]:
    section = text[text.index(heading):]
    section = section[: section.find("\n## ", 4) if "\n## " in section[4:] else len(section)]
    return [line for line in section.splitlines() if line.startswith("| `kd-tune ")]


def test_the_docs_agree() -> None:
    """docs/cli.md and docs/python-api.md give each subcommand the same Python equivalent, and the worked example shown in
    docs/python-api.md is the file the integration test runs."""
    cli, api = (REPO / "docs" / "cli.md").read_text(), (REPO / "docs" / "python-api.md").read_text()
    rows = _table(cli, "## From Python")
    assert rows == _table(api, "## The command line and the API")
    assert {re.match(r"\| `kd-tune (\w+)", r).group(1) for r in rows} == {"sweep", "resume", "replay", "status", "report"}  # type: ignore[union-attr]
    shown = re.search(r"## A worked example.*?```python\n(.*?)```", api, re.S)
    assert shown is not None and shown.group(1) == EXAMPLE.read_text()
    readme = (REPO / "README.md").read_text()
    assert "## Python API" in readme and "[docs/python-api.md](docs/python-api.md)" in readme[readme.index("## Documentation"):]


# --- the progress line (no Ray: stand-ins for Tune's trials) ---


def _trial(status: str, milestones: tuple[int, ...], epoch: int = 0) -> SimpleNamespace:
    from kd_tune.space.trials import TrialPoint, encode_point

    point = TrialPoint("student", 0.5, 3.0, max(milestones), 0, milestones)
    return SimpleNamespace(status=status, config=encode_point(point), last_result={"epoch": epoch} if epoch else {})


def test_the_progress_line_counts_grid_points_and_says_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_tune.sweep import driver

    trials = [_trial("TERMINATED", (1, 2), 2), _trial("RUNNING", (1, 2), 1), _trial("PENDING", (1, 2)), _trial("ERROR", (3,), 1)]
    p = driver.GridProgress.of(trials)
    # done: both points of the finished trial, the running trial's epoch-1 point, the errored trial's point
    assert (p.done, p.running, p.pending, p.errored, p.epochs_done, p.epochs_total) == (4, 1, 2, 1, 6, 9)
    assert driver.GridProgress.of(trials, total_samples=6).pending == 4  # a search's trials not suggested yet

    line = driver.ProgressLine(every_s=20)
    line.setup(1000.0)
    assert line.should_report(False, now=1000.0)
    assert not line.should_report(False, now=1019.0) and line.should_report(False, now=1020.5)  # at most one per 20 s
    assert line.should_report(True, now=1021.0)  # the last one, whatever the time
    first = line.text(trials[1:3], "s", now=1010.0)  # the pace is measured from this first report's epochs
    assert first == "sweep 's': 1/4 grid points done, 1 running, 2 pending; 10 s elapsed, time left: not known yet"
    trials[1] = _trial("RUNNING", (1, 2), 2)
    assert line.text(trials[1:3], "s", now=1070.0) == ("sweep 's': 2/4 grid points done, 0 running, 2 pending; 1m 10s elapsed, "
                                                      "about 2m 20s left")

    # In a notebook: one output, updated in place; not pickled with the reporter (Ray Tune pickles it with the sweep).
    shown: list[tuple[str, str]] = []

    class Handle:
        def update(self, obj: Any) -> None:
            shown.append(("update", obj.data))

    import IPython.display

    monkeypatch.setattr(driver, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: shown.append(("display", obj.data)) or Handle())
    line.show("a")
    line.show("b")
    assert shown == [("display", "a"), ("update", "b")]
    assert pickle.loads(pickle.dumps(line))._handle is None


def test_the_reporter_shows_what_its_driver_asks_for(capsys: pytest.CaptureFixture[str]) -> None:
    from kd_tune.sweep import driver

    reporter = pickle.loads(pickle.dumps(driver.progress_reporter()))  # as a resumed sweep gets it back
    reporter.setup(start_time=time.time(), total_samples=2)
    trials = [_trial("RUNNING", (1, 2), 1), _trial("PENDING", (1, 2))]
    with driver.progress_style(None):
        assert not reporter.should_report(trials, done=True)
    with driver.progress_style("line", "s"):
        assert reporter.should_report(trials, done=True)
        reporter.report(trials, True)
    assert capsys.readouterr().out.startswith("sweep 's': 1/4 grid points done, 1 running, 2 pending; ")
    with driver.progress_style("table"):  # the default: Ray Tune's table, as kd-tune sweep prints it
        assert reporter.should_report(trials, done=True) and reporter.table.should_report(trials, done=True)
    with pytest.raises(kd_tune.UsageError), driver.progress_style("lines"):
        pass


# --- real sweeps, in this process, on one Ray this module starts as a user would ---


@pytest.fixture(scope="module")
def user_ray() -> Iterator[str]:
    """A Ray started by the caller before any sweep; every sweep must join it and leave it running. Yields its node id."""
    import ray

    from kd_tune.sweep.cluster.connect import shutdown_ray

    # Ray's notice that it turned token authentication on goes to a handler bound to the stderr pytest captured (and
    # closed) before: a "Logging error" here. kd-tune's own start of Ray quiets it the same way (connect_ray).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        shutdown_ray()


@dataclass(frozen=True)
class Example:
    folder: Path
    namespace: dict[str, Any]
    changed: list[str]
    """What the example's sweep left changed in the process (nothing, if all is well)."""

    @property
    def storage(self) -> Path:
        return self.folder / "kd_tune_results"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, user_ray: str) -> Example:
    """docs/examples/python_api.py run as a user runs it: in a fresh folder (its storage, a new MLflow store and the
    report land there), MNIST's slice as $KD_TUNE_DATA_DIR, nothing else set."""
    import mlflow

    from kd_tune.process import mlflow_tracking_uri_kept

    folder = tmp_path_factory.mktemp("example")
    with mlflow_tracking_uri_kept(), pytest.MonkeyPatch.context() as mp:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # as in a fresh process, whatever an earlier test of this worker set
        mp.chdir(folder)
        mp.setenv("KD_TUNE_DATA_DIR", str(FIXTURE_DATA))
        for variable in ("MLFLOW_TRACKING_URI", "KD_TUNE_STORAGE", "RAY_ADDRESS"):
            mp.delenv(variable, raising=False)
        before = process_state()
        namespace = runpy.run_path(str(EXAMPLE), run_name="__main__")
        changed = differences(before, process_state())
    return Example(folder, namespace, changed)


@pytest.mark.integration
def test_the_docs_example_runs(example: Example, user_ray: str) -> None:
    import ray

    sweep = example.namespace["sweep"]
    assert isinstance(sweep, kd_tune.Sweep) and sweep.ok and not sweep.interrupted and sweep.outcome.total == 6
    assert sweep.name == EXAMPLE_NAME and sweep.tracking_uri == example.tracking_uri
    report = example.namespace["report"]
    assert {f.name for f in report.files} >= {"runs.csv", "summary.csv", "gains.csv", "summary.md", "accuracy_vs_alpha.png"}
    assert all((example.folder / f).exists() and (example.folder / f).parent == example.folder / "reports" / EXAMPLE_NAME for f in report.files)
    # The Ray the caller started was joined, not restarted, and is still running.
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == user_ray


@pytest.mark.integration
def test_the_example_left_the_process_as_it_found_it(example: Example) -> None:
    """Its sweep (the first in this process, on a new MLflow store) and its report."""
    assert example.changed == []


@pytest.mark.integration
def test_the_grid_point_table_is_the_mlflow_record(example: Example) -> None:
    """One row per grid point, each with the test accuracy its MLflow run holds; the same table read back by name."""
    from mlflow.tracking import MlflowClient

    from kd_tune.tracking.tags import TAG_ROLE

    sweep = example.namespace["sweep"]
    table = sweep.table()
    client = MlflowClient(example.tracking_uri)
    experiment = client.get_experiment_by_name(EXAMPLE_NAME)
    assert experiment is not None
    record = {}
    for run in client.search_runs([experiment.experiment_id], max_results=100):
        if run.data.tags[TAG_ROLE] in ("student", "scratch"):
            p = run.data.params
            key = (run.data.tags[TAG_ROLE], float(p["alpha"]), p["temperature"], int(p["epochs"]), int(p["seed"]))
            assert key not in record and run.info.status == "FINISHED"
            record[key] = run.data.metrics["test_acc"]
    rows = {(r.role, float(r.alpha), "None" if r.temperature != r.temperature or r.temperature is None else str(float(r.temperature)),
             int(r.epochs), int(r.seed)): r.test_acc for r in table.itertuples()}
    assert len(rows) == len(table) == 6 and set(rows) == set(record)
    assert all(rows[k] == pytest.approx(record[k], abs=1e-12) for k in rows)
    assert (table["status"] == "finished").all()
    # Loaded by name (from the sweep's storage, as `kd-tune status` reads it): the same table.
    import pandas as pd

    pd.testing.assert_frame_equal(kd_tune.load(EXAMPLE_NAME, storage=example.storage).table(), table)


@pytest.mark.integration
def test_a_sweep_loaded_by_name_has_the_tables_kd_tune_report_writes(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    monkeypatch.chdir(example.folder)  # the command finds the sweep's storage and MLflow store where the example left them
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KD_TUNE_STORAGE", raising=False)
    assert main(["report", EXAMPLE_NAME, "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    loaded = kd_tune.load(EXAMPLE_NAME)
    assert loaded.tracking_uri == example.tracking_uri  # recorded with the sweep

    def as_csv(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(frame.to_csv(index=False)))

    pd.testing.assert_frame_equal(as_csv(loaded.runs()), pd.read_csv(tmp_path / "report" / "runs.csv"))
    pd.testing.assert_frame_equal(as_csv(loaded.summary()), pd.read_csv(tmp_path / "report" / "summary.csv"))
    pd.testing.assert_frame_equal(as_csv(loaded.gains()), pd.read_csv(tmp_path / "report" / "gains.csv"))
    best = loaded.best()
    assert best is not None and best.val_mean is not None
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"Best configuration: alpha = {best.alpha:g}, T = {best.temperature:g}, {best.epochs} epochs " in summary
    assert f"test accuracy {100 * best.mean:.2f} %" in summary and f"{100 * best.gain:+.2f} points" in summary
    status = loaded.status()
    assert status.counts["finished"] == 3 and not status.driver_alive  # three trials: two alphas and the scratch baseline


@pytest.mark.integration
def test_a_second_sweep_in_the_same_process(example: Example, tmp_path: Path, capsys: pytest.CaptureFixture[str], user_ray: str) -> None:
    """From a file this time, in the example's storage (its teacher from the cache), with a notebook's own settings in
    place: its own MLflow tracking URI, a logger, the collector's thresholds; each is as it was after the sweep."""
    import mlflow
    import ray

    space = tmp_path / "second.yaml"
    space.write_text(yaml.safe_dump(tiny_space(name="second", grid={"alpha": [0.5], "epochs": [1]}), sort_keys=False))
    with pytest.raises(kd_tune.UsageError, match=r"^a sweep named 'api_example' already exists in .*to continue it: kd-tune resume api_example"):
        kd_tune.run(space, name=EXAMPLE_NAME, storage=example.storage)  # a taken name, refused before anything starts
    mine = logging.getLogger("notebook.user")
    mine.setLevel(logging.DEBUG)
    mine.addHandler(logging.NullHandler())
    thresholds = gc.get_threshold()
    gc.set_threshold(1000, 20, 20)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mine.db'}")
    try:
        before = process_state()
        lines: list[str] = []
        sweep = kd_tune.run(space, storage=example.storage, tracking_uri=example.tracking_uri, data_dir=FIXTURE_DATA, progress=None,
                            log=lines.append)
        assert differences(before, process_state()) == []
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # unset again (MLflow accepts None)
        gc.set_threshold(*thresholds)
    assert sweep.ok and sweep.outcome is not None and sweep.outcome.total == 1
    assert any("from the cache" in line for line in lines) and "grid points done" not in capsys.readouterr().out  # progress=None
    assert sweep.runs()["test_acc"].notna().all() and not (tmp_path / "mine.db").exists()  # its runs went to its own store
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == user_ray


@pytest.mark.integration
def test_ctrl_c_stops_the_sweep_resumably_then_resume_finishes_it(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str], user_ray: str) -> None:
    """A notebook's interrupt is SIGINT to the process: Ray Tune stops the trials and saves the sweep, then ``run`` raises
    KeyboardInterrupt with the way on, the handler of Ctrl+C is as it was, no run is left RUNNING; ``resume`` finishes it
    with one run per grid point and each epoch's metrics once."""
    import ray
    from mlflow.tracking import MlflowClient

    from kd_tune.sweep.hooks import GATE_ENV

    gate = tmp_path / "gate"
    gate.touch()
    monkeypatch.setenv(GATE_ENV, str(gate))  # each trial waits after each epoch while the file exists
    name, epochs = "interrupted", 3
    space = tiny_space(name=name, grid={"alpha": [0.0, 1.0], "temperature": [3.0], "epochs": [epochs], "seed": [0]})
    sent = threading.Event()

    def interrupt_once_a_trial_is_held() -> None:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("gate.*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C
        sent.set()
        time.sleep(1.0)
        gate.unlink()  # the held trials go on, to be stopped

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt_once_a_trial_is_held, daemon=True).start()
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        kd_tune.run(space, storage=example.storage, tracking_uri=example.tracking_uri, data_dir=FIXTURE_DATA, log=lines.append)
    assert sent.is_set()
    message = str(stopped.value)
    assert re.fullmatch(rf"sweep '{name}' interrupted \([01]/2 grid points finished\); to continue it: "
                        rf"kd_tune\.resume\('{name}', storage='{re.escape(str(example.storage))}'\)", message), message
    assert lines[-1] == message
    progress = capsys.readouterr().out.splitlines()  # the compact line: the first report, and the last when the trials stopped
    assert re.fullmatch(rf"sweep '{name}': 0/2 grid points done, [0-2] running, [0-2] pending; \d+ s elapsed, time left: not known yet",
                        progress[0]), progress
    assert re.fullmatch(rf"sweep '{name}': [01]/2 grid points done, [012] running, [012] pending; \d+ s elapsed, .*", progress[-1])
    assert signal.getsignal(signal.SIGINT) is handler
    monkeypatch.delenv(GATE_ENV)

    loaded = kd_tune.load(name, storage=example.storage)
    assert loaded.status().counts["finished"] < 2
    client = MlflowClient(example.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    assert all(r.info.status != "RUNNING" for r in client.search_runs([experiment.experiment_id]))

    resumed = loaded.resume(data_dir=FIXTURE_DATA, progress=None, log=None)
    assert resumed.ok and not resumed.interrupted and resumed.outcome is not None and resumed.outcome.total == 2
    runs = resumed.runs()
    assert len(runs) == 2 and (runs["status"] == "FINISHED").all()
    for run_id in runs["run_id"]:
        assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == list(range(1, epochs + 1))
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == user_ray
