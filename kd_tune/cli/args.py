"""Each subcommand's arguments as a frozen dataclass: a field is a flag (or, marked :func:`positional`, an argument),
its metadata's help is the flag's ``--help``. The sweep-level settings come from :mod:`kd_tune.space.options`.

Plain Python: the parser is built from these at once, importing neither torch, Ray nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_tune.space.options import STORAGE_HELP, ResumeOptions, SubmitOptions, SweepOptions, help_text
from kd_tune.tracking.ui import UI_HOST

ADDRESS_HELP = SubmitOptions.__dataclass_fields__["address"].metadata["help"]
NAME_HELP = "the sweep's name"


def positional(help: str, optional: bool = False) -> dict[str, Any]:
    """Field metadata of a positional argument (``optional``: it may be left out)."""
    return {"help": help, "positional": True, "optional": optional}


@dataclass(frozen=True, kw_only=True)
class SweepArgs(SweepOptions):
    space: Path = field(metadata=positional("search-space YAML, e.g. search_spaces/smoke.yaml"))


@dataclass(frozen=True, kw_only=True)
class ResumeArgs(ResumeOptions):
    name: str = field(metadata=positional(NAME_HELP))
    ship_code: bool = field(default=False, metadata=help_text(
        "with a job server's --address: send this machine's kd_tune package with the job (default: as the sweep's last job did)"))


@dataclass(frozen=True, kw_only=True)
class SubmitArgs(SubmitOptions):
    space: Path = field(metadata=positional("search-space YAML on this machine, e.g. search_spaces/smoke.yaml"))


@dataclass(frozen=True, kw_only=True)
class ReplayArgs(ResumeOptions):
    name: str = field(metadata=positional("a population sweep's name (scheduler pbt or pb2)"))
    member: str | None = field(default=None, metadata=help_text("the member to replay, by label (default: the best, selected on validation)"))
    seeds: str = field(default="3", metadata=help_text("how many fresh seeds (default 3: 1000 + the sweep's largest seed, and up), "
                                                       "or the seeds, comma-separated"))
    new_name: str | None = field(default=None, metadata=help_text("the replay sweep's name (default: NAME-replay)"))


@dataclass(frozen=True)
class PlanArgs:
    space: Path = field(metadata=positional("search-space YAML"))
    no_share_epochs: bool = field(default=False, metadata=help_text("plan without epoch sharing"))
    pack: int | None = field(default=None, metadata=SweepOptions.__dataclass_fields__["pack"].metadata)


@dataclass(frozen=True)
class ReportArgs:
    name: str = field(metadata=positional(NAME_HELP))
    out: str | None = field(default=None, metadata=help_text("folder for the CSV, summary and PNG files (default: reports/NAME)"))
    tracking_uri: str | None = field(default=None, metadata=help_text(
        "MLflow store (default: the sweep's own, else $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)"))
    storage: str | None = field(default=None, metadata=help_text(STORAGE_HELP))


@dataclass(frozen=True)
class SweepNameArgs:
    """A sweep in a storage: ``status`` and ``sync``."""

    name: str = field(metadata=positional(NAME_HELP))
    storage: str | None = field(default=None, metadata=help_text(STORAGE_HELP))


@dataclass(frozen=True)
class JobsArgs:
    address: str | None = field(default=None, metadata=help_text(ADDRESS_HELP))


@dataclass(frozen=True)
class JobArgs:
    """A sweep's job: ``stop``."""

    name: str = field(metadata=positional(NAME_HELP))
    address: str | None = field(default=None, metadata=help_text(ADDRESS_HELP))


@dataclass(frozen=True)
class LogsArgs(JobArgs):
    follow: bool = field(default=False, metadata=help_text("stream the logs until the job ends"))


@dataclass(frozen=True)
class UiArgs:
    name: str | None = field(default=None, metadata=positional(
        "a sweep's name: print the address of its runs page only (default: every sweep's)", optional=True))
    tracking_uri: str | None = field(default=None, metadata=help_text("MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"))
    host: str = field(default=UI_HOST, metadata=help_text(
        "address to bind (default 127.0.0.1: only this machine; use ssh/ray port forwarding)"))
    port: int = field(default=5000, metadata=help_text("port (default 5000)"))
    artifacts_destination: str | None = field(default=None, metadata=help_text(
        "where the server keeps the artifacts clients log through it: a folder or a URI such as s3://bucket/mlflow "
        "(default: MLflow's ./mlartifacts)"))


@dataclass(frozen=True)
class DataArgs:
    name: str = field(metadata=positional("dataset name, e.g. mnist"))
    data_dir: str | None = field(default=None, metadata=help_text("dataset folder (default: $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)"))
