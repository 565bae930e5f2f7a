"""Shared fixtures: a slice of real MNIST (2,000 training and 500 test digits, torchvision layout),
tiny search spaces that finish in seconds on a 2-core machine, and one tiny real sweep (real Ray, real
sqlite MLflow store) that the MLflow tests (test_mlflow_native.py, test_mlflow_ui.py) all inspect."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from kd_tune.sweep.state.storage import resolve_storage

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from kd_tune.space.schema import SweepSpec

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "mnist_slice"
REPO = Path(__file__).resolve().parent.parent


# Seconds each heavy test file took (`pytest -n 2 --dist loadfile --junitxml`, 2-core AVX-512 EPYC, 2026-12-06). The
# two xdist workers take whole files; given them heaviest first they end together. In pytest-xdist's own order
# (files with the most tests first) test_resume.py's four long tests came last, and one worker ran them alone
# for a minute. Files not listed (seconds each) follow in their usual order.
FILE_SECONDS = {"test_resume.py": 161, "test_outage.py": 133, "test_postgres.py": 120, "test_population.py": 110, "test_jobs.py": 124, "test_sweep.py": 111, "test_cluster.py": 104,
                "test_pack_sweep.py": 97, "test_full_disk.py": 93, "test_search.py": 58, "test_api.py": 45, "test_new_store.py": 41,
                "test_own_data.py": 38, "test_architectures.py": 32, "test_models_sweep.py": 32, "test_bench.py": 28, "test_storage.py": 25,
                "test_cli.py": 22, "test_layers.py": 19, "test_mlflow_native.py": 17, "test_report.py": 17, "test_mlflow_ui.py": 60,
                "test_ui.py": 12, "test_report_methods.py": 8}
# Files that one xdist worker takes together, as one unit: all inspect the session's shared sweep (native_sweep), which
# each worker would otherwise run once for itself.
SAME_WORKER = {"test_mlflow_ui.py": "test_mlflow_native.py", "test_teacher_from.py": "test_mlflow_native.py"}


def _unit(name: str) -> str:
    return SAME_WORKER.get(name, name)


def _unit_seconds(name: str) -> int:
    unit = _unit(name)
    return sum(s for f, s in FILE_SECONDS.items() if _unit(f) == unit)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist would reorder the files by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # stable: each file's tests keep their order; the files of one unit (SAME_WORKER) side by side
    items.sort(key=lambda item: (-_unit_seconds(item.path.name), _unit(item.path.name)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the files of SAME_WORKER as one unit of work (any other mode: xdist's own)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            folder, _, name = path.rpartition("/")
            return f"{folder}/{_unit(name)}" if folder else _unit(name)

    return Units(config, log)


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


class _Delete:
    """Marks a key to remove (its repr is stable, so the test ids are the same in every process, e.g. pytest-xdist's workers)."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()


def with_key(space: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``space`` with the key at the dotted path set to ``value`` (removed for :data:`DELETE`)."""
    space = copy.deepcopy(space)
    *parents, last = dotted.split(".")
    node = space
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
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


NATIVE_SWEEP = "native"


@dataclass(frozen=True)
class Swept:
    """The session's shared sweep: its MLflow store (``folder / 'mlflow.db'``, what ``kd-tune ui`` serves), storage and runs."""

    client: MlflowClient
    uri: str
    experiment_id: str
    spec: SweepSpec
    storage: str
    folder: Path  # the MLflow store's folder
    runs: dict[str, list[Run]]  # by kd_tune.role

    def children(self) -> list[Run]:
        return self.runs["student"]


@pytest.fixture(scope="session")
def native_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:
    """One tiny real sweep for every MLflow test (one sweep's setup instead of one per module): two
    label-noise levels (0 and 0.2) sharing one clean teacher, alpha 0.5, epochs 1 and 2 (one trial per
    level with epoch sharing): a teacher run and four student runs under the parent."""
    from mlflow.tracking import MlflowClient

    from kd_tune.space.options import SweepOptions
    from kd_tune.space.parse import load_space
    from kd_tune.sweep.start import run_sweep
    from kd_tune.tracking.tags import TAG_ROLE

    tmp = tmp_path_factory.mktemp("native")
    space = tiny_space(name=NATIVE_SWEEP, teacher={"widths": [8, 16], "epochs": 1, "lr": 0.003, "batch_size": 64, "clean": True},
                       grid={"alpha": [0.5], "temperature": [3.0], "epochs": [1, 2], "seed": [0], "label_noise": [0.0, 0.2]})
    (tmp / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    folder = tmp / "mlflow"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root (./mlruns) lands here
        outcome = run_sweep(tmp / "space.yaml", resolve_storage(str(tmp / "store")), SweepOptions(data_dir=str(FIXTURE_DATA), tracking_uri=uri, quiet=True),
                            log=lambda s: None)
    assert outcome.ok and outcome.total == 4
    client = MlflowClient(uri)
    runs: dict[str, list[Run]] = {}
    for run in client.search_runs([outcome.experiment_id], max_results=100):
        runs.setdefault(run.data.tags[TAG_ROLE], []).append(run)
    assert {k: len(v) for k, v in runs.items()} == {"sweep": 1, "teacher": 1, "student": 4}
    yield Swept(client, uri, outcome.experiment_id, load_space(tmp / "space.yaml"), str(tmp / "store"), folder, runs)


@pytest.fixture(scope="session")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher cache folder holding the teacher of tests/test_resume.py's spaces (trained once per test worker):
    a sweep whose storage starts with a copy loads its teacher instead of training it first. The sweeps of
    test_resume.py, test_outage.py and test_pack_sweep.py copy it (none writes into it)."""
    from .helpers import cached_teacher_folder

    return cached_teacher_folder(tmp_path_factory)
