"""A sweep: validate, start Ray while the data loads, then hand over to the driver (:mod:`kd_tune.sweep.driver`).

Order matters: everything the user can get wrong is checked before Ray starts or a file is written.
This module is light to import (no torch, no MLflow client, no Ray Tune): the checks run at once, and
the heavy modules load on a thread beside Ray's start, which is mostly waiting for Ray's processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_tune.errors import FlagError, UsageError
from kd_tune.process import sweep_process
from kd_tune.space.options import SweepOptions, apply_overrides
from kd_tune.space.parse import load_space, load_space_text, parse_space
from kd_tune.space.schema import SweepSpec
from kd_tune.sweep.checks import check_models
from kd_tune.sweep.cluster.connect import check_local_fits, check_reachable, check_shared, cluster_address, connect_ray, shutdown_ray
from kd_tune.sweep.state.storage import Storage, check_writable
from kd_tune.sweep.state.sweep_files import SPACE_FILE, SweepRecord, refuse_second_driver, resume_command, sweep_path
from kd_tune.sweep.state.tune_state import can_restore, require_sweep, torn_tune_states
from kd_tune.tracking.store import resolve_tracking_uri
from kd_tune.tracking.store_checks import check_tracking_store

if TYPE_CHECKING:
    from kd_tune.sweep.driver import Loaded
    from kd_tune.sweep.results import SweepOutcome

Log = Callable[[str], None]
DEFAULT_OPTIONS = SweepOptions()
DEFAULT_TRACKING_WAIT_S = 120.0
SpaceInput = str | Path | Mapping[str, Any] | SweepSpec
"""A search space: a YAML file's path, the same data as a dict (what the file would load as), or a validated spec."""
DICT_SOURCE = "<dict>"
"""What a search space given as a dict is called in its errors (a file's are named by its path)."""


class SweepExistsError(UsageError):
    """``sweep`` on a name that already has a sweep (the message gives the resume command)."""


def read_space(space: SpaceInput) -> tuple[SweepSpec, str]:
    """The validated search space and what its errors call it: a file by its path (:func:`~kd_tune.space.parse.load_space`),
    a dict as :data:`DICT_SOURCE` (:func:`~kd_tune.space.parse.parse_space`: the same checks, the same messages).

    Raises :class:`~kd_tune.errors.SpaceError` for a bad space."""
    if isinstance(space, SweepSpec):
        return space, f"<space {space.name}>"
    if isinstance(space, Mapping):
        return parse_space(dict(space), DICT_SOURCE), DICT_SOURCE
    return load_space(space), str(space)


def run_sweep(space: SpaceInput, storage: Storage, opts: SweepOptions = DEFAULT_OPTIONS, log: Log = print,
              progress: str | None = "table") -> SweepOutcome:
    """Start a new sweep from a search space (a file, a dict or a spec: :func:`read_space`) or, with ``opts.resume``,
    continue one of that name. ``progress``: what the trials show while they run
    (:func:`kd_tune.sweep.driver.progress_style`; ``opts.quiet`` shows nothing).

    Raises :class:`~kd_tune.errors.SpaceError` for a bad space, :class:`~kd_tune.errors.FlagError` for a
    bad flag, :class:`SweepExistsError` when the name is taken (without ``resume``).
    """
    spec, source = read_space(space)
    spec = apply_overrides(spec, opts)
    sweep_path(storage, spec.name)
    if can_restore(storage, spec.name):
        if opts.resume:
            return resume_sweep(spec.name, storage, replace(opts, name=None), log, progress)
        raise SweepExistsError(f"a sweep named {spec.name!r} already exists in {storage.show()}; "
                               f"to continue it: {resume_command(spec.name, storage)} (or add --resume; or choose another --name)")
    # Killed before Ray saved any state: start over, but keep the MLflow parent run made then.
    record = SweepRecord.load(storage, spec.name) if SweepRecord.exists(storage, spec.name) else None
    # Nothing to continue: ``resume`` has done its part, and the sweep says it is starting (not "resuming (0 of N ...)").
    return _execute(spec, storage, replace(opts, resume=False), record, log, source, progress)


def resume_sweep(name: str, storage: Storage, opts: SweepOptions = DEFAULT_OPTIONS, log: Log = print,
                 progress: str | None = "table") -> SweepOutcome:
    """Continue an interrupted sweep: finished trials stay, the others go on from their checkpoints (``progress``: as
    :func:`run_sweep`'s).

    Raises :class:`~kd_tune.errors.UsageError` when there is no such sweep, :class:`~kd_tune.errors.FlagError`
    for a ``--tracking-uri`` that is not the sweep's own.
    """
    require_sweep(storage, name, " (start one with kd-tune sweep)")  # repairs Ray's state cut by a kill where it can
    torn = torn_tune_states(storage, name)
    if torn:
        raise UsageError(f"sweep {name!r} cannot be resumed: Ray Tune's saved state {torn[0]} was cut short by a kill while Ray "
                          "copied it there, and no whole copy is left in Ray's temporary folder on this machine; resume it on the "
                          "machine its last driver ran on, or start the sweep again under another name")
    record = SweepRecord.load(storage, name)
    if opts.tracking_uri and resolve_tracking_uri(opts.tracking_uri) != record.tracking_uri:
        raise FlagError("--tracking-uri", opts.tracking_uri, "that URI or none", f"sweep {name!r} is tracked in {record.tracking_uri}")
    source = storage.show(name, SPACE_FILE)
    spec = apply_overrides(load_space_text(storage.read_text(name, SPACE_FILE), source), replace(opts, name=None, max_failures=None))
    return _execute(spec, storage, opts, record, log, source, progress)


def _execute(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None, log: Log, source: str,
             progress: str | None = "table") -> SweepOutcome:
    """The checks that need no Ray, then Ray (joined or started here) while the data loads, then the sweep."""
    started = time.perf_counter()
    wait = tracking_wait(opts)  # validated before anything is touched
    address = cluster_address(opts.address)
    if not address:
        check_local_fits(spec.resources)
    refuse_second_driver(storage, spec.name)
    check_writable(storage)
    with sweep_process() as startup:  # environment, loggers, the collector: each put back when the sweep ends
        tracking_uri = record.tracking_uri if record else resolve_tracking_uri(opts.tracking_uri)
        check_tracking_store(tracking_uri, "nothing started")
        check_models(spec, source, tracking_uri)  # a user's factory, a pre-trained teacher: built and checked once, here
        # Starting Ray is mostly waiting for its processes to come up (benchmarks/RESULTS.md, session 7: "a sweep's
        # start and end"): import the driver and read the data meanwhile. The MLflow record is opened then too when Ray
        # is started here; joining a cluster can still fail on a bad --address, which must leave nothing written.
        if address:
            check_reachable(address)  # a bad --address is said at once, not after the data has loaded
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-tune-load") as pool:
            loading = pool.submit(_load, spec, storage, opts, record, log, open_record=not address)
            started_ray = connect_ray(address)
            try:
                if address:
                    # Every node must reach the storage; on a cluster find that out now, not at the first checkpoint.
                    check_shared(storage, log)
                loaded = loading.result()
                from kd_tune.sweep.driver import drive, progress_style  # imported by the loading thread by now

                with progress_style(progress, spec.name):
                    return drive(spec, storage, opts, loaded, log, started=started, wait=wait, startup=startup)
            finally:
                if started_ray:
                    shutdown_ray()


def _load(spec: SweepSpec, storage: Storage, opts: SweepOptions, record: SweepRecord | None, log: Log, *, open_record: bool) -> Loaded:
    # Here, on the loading thread, the driver's imports (torch, MLflow's client, Ray Tune: seconds) overlap Ray's start.
    from kd_tune.sweep.driver import load

    return load(spec, storage, opts, record, log, open_record=open_record)


def tracking_wait(opts: SweepOptions) -> float:
    """Seconds a sweep's end waits for tracking writes held back by an unreachable store (``--tracking-wait``)."""
    if opts.tracking_wait is None:
        return DEFAULT_TRACKING_WAIT_S
    if not opts.tracking_wait >= 0:
        raise FlagError("--tracking-wait", opts.tracking_wait, "seconds >= 0")
    return float(opts.tracking_wait)
