"""cluster.yaml and its PostgreSQL variant cluster_postgres.yaml pass Ray's own cluster-config schema, the variant differs
from cluster.yaml only where it runs the head's MLflow server on PostgreSQL, and the kd-tune commands they and the
README's cluster section run are real commands of this CLI."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from kd_tune.cli.app import build_parser

from .conftest import REPO

CONFIGS = ("cluster.yaml", "cluster_postgres.yaml")
# What cluster_postgres.yaml may change: its name (a cluster of its own) and the head's setup and start.
POSTGRES_CHANGES = ("cluster_name", "head_setup_commands", "head_start_ray_commands")


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
    return loaded


@pytest.fixture(scope="module", params=CONFIGS)
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_cluster_yaml_passes_rays_schema(config: dict[str, Any]) -> None:
    # What `ray up` does before it talks to the cloud: fill in the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("damage", ["unknown key", "wrong type", "missing head type"])
def test_rays_validator_catches_a_broken_copy(config: dict[str, Any], damage: str) -> None:
    """The check above can fail: the same validator rejects a damaged copy of the file."""
    bad = copy.deepcopy(config)
    if damage == "unknown key":
        bad["available_node_types"]["gpu_worker"]["gpus"] = 1
    elif damage == "wrong type":
        bad["max_workers"] = "many"
    else:
        bad["head_node_type"] = "no-such-type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(bad))


def test_cluster_shape(config: dict[str, Any]) -> None:
    nodes = config["available_node_types"]
    head, workers = nodes[config["head_node_type"]], [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert "GPU" not in head["resources"] and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers and all(w["resources"]["GPU"] >= 1 and w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)  # autoscaled
    assert config["file_mounts"]["~/search_spaces"] == "./search_spaces"
    assert any("pip install -e ~/kd-tune" in c for c in config["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def _kd_tune_commands(text: str) -> list[list[str]]:
    """Every `kd-tune ...` command line in a text, as argv (environment variables and <placeholders> as X)."""
    text = re.sub(r'"?\$\{?\w+\}?"?|<[^>]*>', "X", text)
    return [shlex.split(m.group(1)) for m in re.finditer(r"kd-tune ((?:sweep|resume|status|report|plan|ui|data|submit|jobs|logs|stop)\b[^\n\"`;&)>]*)", text)]


def test_mlflow_server_on_the_head_binds_localhost(config: dict[str, Any]) -> None:
    start = " ".join(config["head_start_ray_commands"])
    [ui] = [c for c in _kd_tune_commands(start) if c[0] == "ui"]
    args = build_parser().parse_args(ui)
    assert args.host == "127.0.0.1" and args.port == 5000 and args.artifacts_destination == "X"
    env = " ".join(config["head_setup_commands"])
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in env and "KD_TUNE_STORAGE=s3://" in env


def _strip_postgres(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in POSTGRES_CHANGES}


def test_the_postgres_variant_changes_only_the_heads_setup_and_start() -> None:
    """Everything else (nodes, mounts, Ray's commands, the workers) stays cluster.yaml's: a fix there must reach both."""
    main, pg = load("cluster.yaml"), load("cluster_postgres.yaml")
    assert _strip_postgres(pg) == _strip_postgres(main)
    assert pg["cluster_name"] != main["cluster_name"]  # `ray up` of each makes its own cluster
    # The head's own commands: cluster.yaml's, in order, with PostgreSQL's added (the backend line aside).
    backend = re.compile(r"KD_TUNE_MLFLOW_BACKEND=\S+'")
    for key in ("head_setup_commands", "head_start_ray_commands"):
        kept = [backend.sub("", c) for c in main[key]]
        theirs = iter(backend.sub("", c) for c in pg[key])
        assert all(c in theirs for c in kept), key  # a subsequence


def test_the_damaged_variant_is_caught() -> None:
    """The comparison above can fail: a worker changed in the variant alone."""
    main, pg = load("cluster.yaml"), load("cluster_postgres.yaml")
    pg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] = "g4dn.xlarge"
    assert _strip_postgres(pg) != _strip_postgres(main)


def test_the_postgres_variant_runs_mlflow_on_postgres() -> None:
    """The head installs PostgreSQL (if missing), makes a role and a database it owns (once), installs psycopg2, waits
    for PostgreSQL, then serves MLflow from that database. tests/test_postgres.py serves this very backend URI."""
    config = load("cluster_postgres.yaml")
    setup, start = config["head_setup_commands"], config["head_start_ray_commands"]
    [install] = [c for c in setup if "apt-get" in c]
    assert install.startswith("ls /usr/lib/postgresql/*/bin/postgres") and " || " in install  # only where it is missing
    assert "install -y --no-install-recommends postgresql" in install and "DPkg::Lock::Timeout" in install
    [backend] = re.findall(r"KD_TUNE_MLFLOW_BACKEND=(\S+?)'", " ".join(setup))
    assert backend.startswith("postgresql+psycopg2:///")  # psycopg2 named (SQLAlchemy 2.1's default is psycopg 3); the Unix socket
    database = backend.rsplit("/", 1)[1]
    role = '"$(whoami)"'  # the user MLflow's server runs as (peer authentication over the socket)
    [make_role] = [c for c in setup if "createuser" in c]
    [make_db] = [c for c in setup if "createdb" in c]
    assert f"createuser {role}" in make_role and "rolname = '$(whoami)'" in make_role and " || " in make_role  # made once
    assert f"createdb -O {role} {database}" in make_db and f"datname = '{database}'" in make_db and " || " in make_db
    [pip] = [c for c in setup if "[postgres]" in c]
    assert pip.startswith("pip install -e") and '"$HOME/kd-tune[postgres]"' in pip
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11's; kd-tune runs on 3.10)
    assert re.search(r'^postgres = \["psycopg2', pyproject, re.M) and re.search(r'^test = \[.*"kd-tune\[postgres\]"', pyproject, re.M)
    ready = next(i for i, c in enumerate(start) if "pg_isready" in c)
    ui = next(i for i, c in enumerate(start) if "kd-tune ui" in c)
    assert ready < ui and "systemctl start postgresql" in start[ready]
    assert '--tracking-uri "$KD_TUNE_MLFLOW_BACKEND"' in start[ui]


def test_readme_cluster_commands_parse() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = _kd_tune_commands("\n".join(blocks))
    assert {c[0] for c in commands} >= {"sweep", "resume", "status", "report"}
    for argv in commands:
        build_parser().parse_args(argv)  # an unknown flag exits 2 here
    assert "ray up cluster.yaml" in section and "ray attach cluster.yaml --port-forward 5000" in section
    assert "ray down cluster.yaml" in section


def test_every_command_is_valid_bash(config: dict[str, Any]) -> None:
    """Ray runs each command with bash on the node: a quote lost in YAML's folded lines would fail only at `ray up`."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    commands = [c for k in keys for c in config.get(k) or []]
    assert commands
    for c in commands:
        res = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (c, res.stderr)
    broken = subprocess.run(["bash", "-n", "-c", "cd /tmp && (grep -q 1 || createdb x"], capture_output=True, text=True, timeout=30)
    assert broken.returncode != 0  # the check above can fail


def test_cluster_docs_postgres_commands_parse() -> None:
    """docs/cluster.md's session for cluster_postgres.yaml: its kd-tune commands are real ones, its ray commands name the file."""
    doc = (REPO / "docs" / "cluster.md").read_text()
    section = doc[doc.index("**A team's server on PostgreSQL.**"):]
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)[:1]
    commands = _kd_tune_commands(block)
    assert commands
    for argv in commands:
        build_parser().parse_args(argv)
    assert "ray up cluster_postgres.yaml" in block and "ray attach cluster_postgres.yaml --port-forward 5000" in block
