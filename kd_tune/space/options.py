"""Command-line settings of ``sweep``, ``resume`` and ``submit``: typed dataclasses whose field docs are the flags' ``--help``.

Plain Python (no torch, Ray or MLflow): the CLI builds its parser from these at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kd_tune.errors import FlagError

if TYPE_CHECKING:
    from kd_tune.space.schema import SweepSpec


def help_text(text: str) -> dict[str, str]:
    return {"help": text}


STORAGE_HELP = ("where sweeps and the teacher cache live: a folder (NFS on a cluster) or a URI such as s3://bucket/prefix "
                "(default: $KD_TUNE_STORAGE or ./kd_tune_results)")


@dataclass(frozen=True)
class SweepOptions:
    """Command-line settings of a sweep; each field's help is the flag's ``--help``."""

    name: str | None = field(default=None, metadata=help_text("sweep name (default: the search space's 'name')"))
    storage: str | None = field(default=None, metadata=help_text(STORAGE_HELP))
    data_dir: str | None = field(default=None, metadata=help_text("dataset folder, torchvision layout (default: $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)"))
    address: str | None = field(default=None, metadata=help_text("Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS, else a local Ray started for this sweep)"))
    tracking_uri: str | None = field(default=None, metadata=help_text("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db here)"))
    cpus_per_trial: float | None = field(default=None, metadata=help_text("CPUs per trial, overrides resources.cpu"))
    gpus_per_trial: float | None = field(default=None, metadata=help_text("GPUs per trial, may be a fraction, overrides resources.gpu"))
    max_failures: int | None = field(default=None, metadata=help_text("retries of a crashed trial from its checkpoint, overrides max_failures"))
    quiet: bool = field(default=False, metadata=help_text("print only the final table"))
    resume: bool = field(default=False, metadata=help_text("continue the sweep if one of this name exists (same as kd-tune resume)"))
    no_share_epochs: bool = field(default=False, metadata=help_text("one trial per epochs value instead of one trial reporting each (share_epochs: false)"))
    pack: int | None = field(default=None, metadata=help_text(
        "grid points trained together as one packed model per trial, overrides resources.pack (default: 64 when trials get "
        "a GPU, 1 on CPUs, where packing does not pay); a search keeps one student per trial"))
    tracking_wait: float | None = field(default=None, metadata=help_text(
        "seconds the sweep's end waits for MLflow writes held back while the tracking store is unreachable (default 120); "
        "what is still unsent then is safe in the checkpoints: kd-tune sync NAME sends it (exit status 3 says so)"))


_SWEEP = SweepOptions.__dataclass_fields__


@dataclass(frozen=True)
class ResumeOptions:
    """The settings a resume may give (the sweep's name, space, MLflow store and retries are fixed)."""

    storage: str | None = field(default=None, metadata=_SWEEP["storage"].metadata)
    data_dir: str | None = field(default=None, metadata=_SWEEP["data_dir"].metadata)
    address: str | None = field(default=None, metadata=_SWEEP["address"].metadata)
    tracking_uri: str | None = field(default=None, metadata=help_text("must be the sweep's own store if given (it is read from the sweep)"))
    cpus_per_trial: float | None = field(default=None, metadata=_SWEEP["cpus_per_trial"].metadata)
    gpus_per_trial: float | None = field(default=None, metadata=_SWEEP["gpus_per_trial"].metadata)
    quiet: bool = field(default=False, metadata=_SWEEP["quiet"].metadata)
    tracking_wait: float | None = field(default=None, metadata=_SWEEP["tracking_wait"].metadata)

    def as_sweep_options(self) -> SweepOptions:
        return SweepOptions(**{k: getattr(self, k) for k in ResumeOptions.__dataclass_fields__})


@dataclass(frozen=True)
class SubmitOptions:
    """Settings of ``kd-tune submit``: the cluster's job server, the sweep flags that make sense there, and
    whether this machine's code goes along. Paths are the head node's: the job runs there, in a temporary folder."""

    address: str | None = field(default=None, metadata=help_text(
        "the cluster's job server: http://HOST:PORT of the head's dashboard (port 8265), e.g. http://127.0.0.1:8265 through "
        "`ray dashboard cluster.yaml` (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)"))
    name: str | None = field(default=None, metadata=_SWEEP["name"].metadata)
    storage: str | None = field(default=None, metadata=help_text(
        "where the sweep lives, as every node sees it: an absolute folder every node mounts or a URI such as s3://bucket/prefix "
        "(default: $KD_TUNE_STORAGE here)"))
    data_dir: str | None = field(default=None, metadata=help_text(
        "dataset folder on the head node, an absolute path (default: the head's $KD_TUNE_DATA_DIR or ~/.cache/kd-tune/data)"))
    tracking_uri: str | None = field(default=None, metadata=help_text(
        "MLflow tracking URI as the head node sees it, e.g. http://127.0.0.1:5000 (the server cluster.yaml starts there) "
        "or sqlite:////ABSOLUTE/PATH.db (default: $MLFLOW_TRACKING_URI here)"))
    cpus_per_trial: float | None = field(default=None, metadata=_SWEEP["cpus_per_trial"].metadata)
    gpus_per_trial: float | None = field(default=None, metadata=_SWEEP["gpus_per_trial"].metadata)
    max_failures: int | None = field(default=None, metadata=_SWEEP["max_failures"].metadata)
    quiet: bool = field(default=False, metadata=_SWEEP["quiet"].metadata)
    resume: bool = field(default=False, metadata=_SWEEP["resume"].metadata)
    no_share_epochs: bool = field(default=False, metadata=_SWEEP["no_share_epochs"].metadata)
    pack: int | None = field(default=None, metadata=_SWEEP["pack"].metadata)
    ship_code: bool = field(default=False, metadata=help_text(
        "send this machine's kd_tune package with the job (Ray's py_modules) instead of running the kd-tune installed on the "
        "cluster; the cluster still needs kd-tune's dependencies (torch, ray[tune], mlflow)"))

    def as_sweep_options(self) -> SweepOptions:
        """The flags the job's ``kd-tune sweep`` gets (``address`` is the job server's, not the driver's)."""
        return SweepOptions(**{k: getattr(self, k) for k in SubmitOptions.__dataclass_fields__ if k not in ("address", "ship_code")})


def apply_overrides(spec: SweepSpec, opts: SweepOptions) -> SweepSpec:
    """The search space with the flags that override it applied.

    Raises :class:`FlagError` for a flag value that is out of range.
    """
    from kd_tune.space.schema import MAX_PACK, NAME_ALLOWED, is_valid_name  # not at import: the parser is built from this module
    res = spec.resources
    if opts.cpus_per_trial is not None:
        if not opts.cpus_per_trial > 0:
            raise FlagError("--cpus-per-trial", opts.cpus_per_trial, "a number > 0")
        res = replace(res, cpu=float(opts.cpus_per_trial))
    if opts.gpus_per_trial is not None:
        if not opts.gpus_per_trial >= 0:
            raise FlagError("--gpus-per-trial", opts.gpus_per_trial, "a number >= 0 (fractions share a GPU)")
        res = replace(res, gpu=float(opts.gpus_per_trial))
    max_failures = spec.max_failures
    if opts.max_failures is not None:
        if opts.max_failures < 0:
            raise FlagError("--max-failures", opts.max_failures, "an integer >= 0")
        max_failures = opts.max_failures
    name = spec.name
    if opts.name is not None:
        if not is_valid_name(opts.name):
            raise FlagError("--name", opts.name, NAME_ALLOWED)
        name = opts.name
    if opts.pack is not None:
        if isinstance(opts.pack, bool) or not isinstance(opts.pack, int) or not 1 <= opts.pack <= MAX_PACK:
            raise FlagError("--pack", opts.pack, f"an integer in [1, {MAX_PACK}]")
        if opts.pack > 1 and spec.is_search:
            raise FlagError("--pack", opts.pack, "1 or none", f"search.algorithm is {spec.search.algorithm}: a search trains one student per trial")
        res = replace(res, pack=opts.pack)
    share = spec.share_epochs and not opts.no_share_epochs
    return replace(spec, name=name, resources=res, max_failures=max_failures, share_epochs=share)
