"""The CLI on bad input: one clear line, exit 2, nothing started, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from kd_tune.cli.app import main

from .conftest import tiny_space


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "space,expected",
    [
        (tiny_space(grid={"alpha": [2.0]}), "key 'grid.alpha[0]': bad value 2.0; allowed: a number in [0, 1]"),
        (tiny_space(name="../up"), "key 'name': bad value '../up'"),
        (tiny_space(dataset={"name": "mnist", "label_noise": 1.5}), "key 'dataset.label_noise': bad value 1.5; allowed: a number in [0, 1)"),
        ("name: [unclosed\n", "YAML syntax error at line"),
    ],
)
def test_bad_space_exits_2_with_one_line(
    space: Any, expected: str, write_space: Callable[..., Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_space(space)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    assert main(["sweep", str(path), "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"kd-tune sweep: error: {path}: ")
    assert expected in err[0]
    assert err[1] == "(see 'kd-tune sweep --help')"
    assert len(err) == 2
    assert not ray.is_initialized()
    assert _files(tmp_path) == before  # no mlflow.db, no storage folder


def test_bad_flag_value(write_space: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_space(tiny_space())
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path), "--gpus-per-trial", "-1"]) == 2
    assert "--gpus-per-trial -1.0: allowed: a number >= 0" in capsys.readouterr().err
    assert main(["sweep", str(path), "--cpus-per-trial", "64"]) == 2
    assert "resources.cpu = 64 per trial, but this machine has" in capsys.readouterr().err
    assert main(["sweep", str(path), "--name", "a/b"]) == 2
    assert "--name 'a/b': allowed:" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()


def test_usage_error_exits_2_and_points_to_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["sweep"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: the following arguments are required: space" in err
    assert "(see 'kd-tune sweep --help')" in err


def test_help_lists_the_options_from_the_dataclass(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    for flag in ("--storage", "--data-dir", "--address", "--tracking-uri", "--cpus-per-trial", "--gpus-per-trial", "--max-failures"):
        assert flag in out
    assert "GPUs per trial, may be a fraction" in out


def test_real_process_exit_code_and_no_traceback(write_space: Callable[..., Path], tmp_path: Path) -> None:
    path = write_space(tiny_space(grid={"alpha": [0.5], "epochs": [0]}))
    proc = subprocess.run([sys.executable, "-m", "kd_tune.cli", "sweep", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "KD_TUNE_STORAGE": str(tmp_path / "store")}, timeout=120)
    assert proc.returncode == 2
    assert "key 'grid.epochs[0]': bad value 0; allowed: an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kd_tune.cli", "sweep", str(path), "--debug"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "KD_TUNE_STORAGE": str(tmp_path / "store")}, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SpaceError" in proc.stderr
    assert _files(tmp_path) == {"space.yaml"}


def test_the_command_skips_teardown_but_not_exit_handlers_nor_output(tmp_path: Path) -> None:
    """``kd-tune`` (cli.run) ends with os._exit after the subcommand: its exit code, everything it printed (also
    through a pipe, whose buffer a bare os._exit would drop) and what atexit handlers do must all survive that."""
    script = ("import atexit, pathlib, sys\n"
              f"atexit.register(lambda: pathlib.Path({str(tmp_path / 'handler-ran')!r}).write_text('yes'))\n"
              "sys.argv = ['kd-tune', 'plan', 'missing.yaml']\n"
              "print('printed before the command')\n"
              "from kd_tune.cli import run\n"
              "run()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is block-buffered then
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stdout == "printed before the command\n"
    assert proc.stderr.startswith("kd-tune plan: error: ") and "missing.yaml" in proc.stderr
    assert (tmp_path / "handler-ran").read_text() == "yes"


def test_data_command(capsys: pytest.CaptureFixture[str]) -> None:
    from .conftest import FIXTURE_DATA

    assert main(["data", "mnist", "--data-dir", str(FIXTURE_DATA)]) == 0
    assert "mnist: 2000 training and 500 test images of shape (1, 28, 28)" in capsys.readouterr().out
    assert main(["data", "imagenet"]) == 2
    assert "dataset 'imagenet' is unknown; allowed: mnist" in capsys.readouterr().err


def test_plan_counts_student_epochs(write_space: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_space(tiny_space(grid={"alpha": [0.0, 0.5], "epochs": [1, 3]}, baselines=["scratch"]))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "6 grid points, 3 trials (epoch sharing on)" in out
    assert "a0.5-T3-e1+3-s0" in out and "reports 1, 3" in out
    assert "student epochs: 9 (with sharing 9, without 12: sharing saves 3, 25%)" in out
    assert "note:" not in out  # no alpha 1: nothing trained twice
    assert main(["plan", str(path), "--no-share-epochs"]) == 0
    assert "6 grid points, 6 trials (epoch sharing off)" in capsys.readouterr().out
    # alpha 1 at two temperatures and the scratch baseline: one student trained three times per seed
    twice = write_space(tiny_space(grid={"alpha": [0.5, 1.0], "temperature": [2.0, 4.0], "epochs": [2], "seed": [0, 1]}, baselines=["scratch"]),
                        "twice.yaml")
    assert main(["plan", str(twice)]) == 0
    out = capsys.readouterr().out
    assert ("note: 4 trials (8 student epochs) train the same weights as another: alpha 1 leaves the teacher out, so alpha 1 at any T "
            "is the scratch student of its seed (a1-T2-e2-s0 = a1-T4-e2-s0 = scratch-e2-s0; a1-T2-e2-s1 = a1-T4-e2-s1 = scratch-e2-s1)") in out
    bf16 = write_space(tiny_space(student={"widths": [4, 8], "precision": "bfloat16"}), "bf16.yaml")
    assert main(["plan", str(bf16)]) == 0
    assert "4 grid points, 2 trials (epoch sharing on; students train in bfloat16)" in capsys.readouterr().out


def test_one_driver_per_sweep(write_space: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kd_tune.sweep.state.sweep_files import DRIVER_FILE

    sweep_dir = tmp_path / "store" / "tiny"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    assert main(["sweep", str(write_space(tiny_space())), "--storage", str(tmp_path / "store")]) == 2
    assert f"sweep 'tiny' is running now (driver pid {os.getpid()} on " in capsys.readouterr().err
    # Another machine's driver cannot be checked by pid: the message says what to do if that machine died.
    (sweep_dir / DRIVER_FILE).write_text(json.dumps({"pid": 1, "host": "head-node-that-died"}))
    assert main(["sweep", str(write_space(tiny_space())), "--storage", str(tmp_path / "store")]) == 2
    assert f"on head-node-that-died, see {sweep_dir / DRIVER_FILE}); if that machine is gone, delete {sweep_dir / DRIVER_FILE}" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_address_where_no_cluster_answers(write_space: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from .servers import free_port

    monkeypatch.chdir(tmp_path)
    path = write_space(tiny_space())
    port = free_port()  # nothing listens there
    address = f"127.0.0.1:{port}"
    assert main(["sweep", str(path), "--address", address, "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"kd-tune sweep: error: --address '{address}': nothing answers at ")  # Ray names the host by its IP
    assert err[0].endswith(f":{port}; allowed: 'auto' on a node of a running cluster (ray up / ray start), "
                           "or the head's HOST:PORT (GCS port, 6379 by default)")
    assert err[1] == "(see 'kd-tune sweep --help')" and len(err) == 2
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_parser_loads_neither_torch_nor_ray() -> None:
    # A fresh interpreter: this test process has torch loaded already.
    code = ("import sys; from kd_tune.cli.app import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'pyarrow', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_trial_names_in_tunes_state_unpickle_without_torch_or_mlflow() -> None:
    """Tune pickles the trial name functions the driver hands it into the sweep's experiment state, and
    ``kd-tune status`` reads that state back: unpickling imports their module, which must be a light one."""
    import cloudpickle

    from kd_tune.sweep import driver

    blob = cloudpickle.dumps([driver.trial_name, driver.trial_dirname])  # as Tune writes them
    code = (f"import pickle, sys; names = pickle.loads(bytes.fromhex({blob.hex()!r})); "
            "print([n.__module__ for n in names], sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['kd_tune.sweep.names', 'kd_tune.sweep.names'] []"


def test_training_path_and_pack_benchmark_import_with_pytorch_alone() -> None:
    """benchmarks/pack_bench.py runs on a GPU machine that has PyTorch but not Ray, MLflow or pyarrow: what it
    imports (the training loop, the packed model, bench.py's interleaving) must not pull them in."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / 'benchmarks')!r}); "
            "import kd_tune.distill.packed, kd_tune.distill.pack_train, kd_tune.distill.train, kd_tune.data.split, bench; "
            "print(sorted(m for m in ('ray', 'mlflow', 'pyarrow', 'pandas') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_pack_benchmark_times_every_variant_bf16_and_fused_included() -> None:
    """A tiny CPU run of benchmarks/pack_bench.py: each K has a row for every contender, with a time and a speedup."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "pack_bench.py"
    proc = subprocess.run([sys.executable, str(bench), "--sizes", "2", "--images", "256", "--repeats", "1", "--nchw", "--bf16", "--fused"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[1]: cells for line in proc.stdout.splitlines() if line.startswith("| 2 |") for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert sorted(rows) == sorted(["unpacked (1 student)", "unpacked (1 student), bf16 autocast", "shared", "per-member", "shared, bf16 autocast", "per-member, bf16 autocast", "shared, NCHW",
                                   "per-member, NCHW", "shared, NCHW, bf16 autocast", "per-member, NCHW, bf16 autocast", "shared, fused Adam",
                                   "per-member, fused Adam"]), proc.stdout
    assert all(float(cells[2]) > 0 and float(cells[4]) > 0 for cells in rows.values()), proc.stdout


def test_pack_benchmark_refuses_cuda_graphs_on_a_cpu() -> None:
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "pack_bench.py"
    proc = subprocess.run([sys.executable, str(bench), "--graphs"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "pack_bench.py: error: --graphs: CUDA graphs need --device cuda"
    assert proc.stdout == ""  # refused before anything was timed


def test_flag_error_names_the_flag_value_and_what_is_allowed() -> None:
    from kd_tune.errors import FlagError, UsageError

    plain = FlagError("--max-failures", -1, "an integer >= 0")
    assert isinstance(plain, UsageError) and plain.exit_code == 2
    assert str(plain) == "--max-failures -1: allowed: an integer >= 0"
    assert str(FlagError("--storage", "/x", "a folder", "cannot write there (denied)")) == "--storage '/x': cannot write there (denied); allowed: a folder"
    assert str(FlagError("dataset", "imagenet", "mnist", "is unknown")) == "dataset 'imagenet' is unknown; allowed: mnist"


def test_job_client_is_made_again_after_a_dropped_connection_only() -> None:
    from kd_tune.sweep.cluster.job_server import retried

    calls: list[str] = []
    waits: list[float] = []

    def flaky() -> str:  # dropped twice, then made (as a busy dashboard does)
        calls.append("try")
        if len(calls) < 3:
            raise ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:8265.")
        return "client"

    assert retried(flaky, ConnectionError, (1.0, 3.0), sleep=waits.append) == "client"
    assert (len(calls), waits) == (3, [1.0, 3.0])

    def refused() -> str:  # another error is no reason to wait: raised at once
        calls.append("try")
        raise RuntimeError("Version check returned 404.")

    calls.clear()
    waits.clear()
    with pytest.raises(RuntimeError, match="404"):
        retried(refused, ConnectionError, (1.0, 3.0), sleep=waits.append)
    assert (len(calls), waits) == (1, [])

    def gone() -> str:
        calls.append("try")
        raise ConnectionError("dropped")

    calls.clear()
    with pytest.raises(ConnectionError, match="dropped"):  # still dropped after the last pause: its error, after 3 tries
        retried(gone, ConnectionError, (1.0, 3.0), sleep=waits.append)
    assert (len(calls), waits) == (3, [1.0, 3.0])
