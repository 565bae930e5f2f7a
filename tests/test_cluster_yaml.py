"""cluster.yaml passes Ray's own cluster-config schema, and the kd-tune commands it and the README's
cluster section run are real commands of this CLI."""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from kd_tune.cli.app import build_parser

from .conftest import REPO


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return loaded


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
