"""The Ray cluster a sweep runs on: joining it (or starting an embedded one), checking that it can
serve the sweep (reachable, big enough, every node reaching the storage), and sizing the teacher's task.

Everything here fails fast with one line: ``ray.init`` on a dead address retries for minutes, and
a trial asking for more than any node has waits forever.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import ray

from kd_tune.errors import FlagError, UsageError, first_line
from kd_tune.space.schema import ResourcesSpec
from kd_tune.sweep.state.storage import ALLOWED as STORAGE_ALLOWED
from kd_tune.sweep.state.storage import Storage, filesystem_type, is_network_fs, probe_file

ADDRESS_ALLOWED = "'auto' on a node of a running cluster (ray up / ray start), or the head's HOST:PORT (GCS port, 6379 by default)"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at (ray.init would retry for minutes).

    Raises :class:`FlagError` naming ``--address``.
    """
    if address.startswith("ray://"):
        return  # Ray Client: its own connection error is quick and clear
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)  # "auto": $RAY_ADDRESS or the cluster started on this machine
    except (ConnectionError, ValueError) as e:
        raise FlagError("--address", address, ADDRESS_ALLOWED, first_line(e)) from None
    if resolved is None:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise FlagError("--address", address, ADDRESS_ALLOWED, f"nothing answers at {resolved}") from None


def cluster_address(flag: str | None) -> str | None:
    """The Ray cluster a sweep joins: ``--address``, else ``$RAY_ADDRESS`` (set for a Ray job's driver); None: an embedded one."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def driver_is_the_only_node(address: str | None) -> bool:
    """Whether the Ray this process is connected to is this machine alone: no cluster address (``--address``,
    ``$RAY_ADDRESS``) and exactly one live node, on this machine's IP. A CPU teacher then trains in the driver
    (a task would only start a worker process on the same cores). False for a cluster the caller joined with its
    own ``ray.init(address=...)`` before calling kd-tune, whose teacher runs as a task on the cluster as with ``--address``."""
    if cluster_address(address) is not None:
        return False
    alive = _alive_nodes()
    return len(alive) == 1 and alive[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def _alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes as ``ray.nodes()`` describes them (it lists dead ones too)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def connect_ray(address: str | None) -> bool:
    """Join the given cluster, else start an embedded one; True when this call started Ray.

    Call :func:`check_reachable` on ``address`` first. Raises :class:`FlagError` when no cluster answers at ``address``.
    """
    if ray.is_initialized():
        return False
    # ray.init replaces the SIGTERM handler with a bare sys.exit; the CLI's (stop like Ctrl+C, so the
    # sweep closes its runs and prints how to resume) is put back once Ray is up.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init(address)
    finally:
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()``, a second sooner when this process started the (embedded) cluster.

    Ray stops its processes one after another, the GCS before the autoscaler's monitor; the monitor,
    told to stop, first tries to report its own end to that gone GCS and so uses all of Ray's one-second
    grace period (Ray 2.x): a second with the machine idle at the end of every sweep. An embedded
    cluster has nothing to autoscale, so its monitor is killed first. Ray's node object is not public
    API: when it is not found, this is a plain ``ray.shutdown()``.
    """
    node = getattr(getattr(ray._private, "worker", None), "_global_node", None)
    processes = getattr(node, "all_processes", None)
    for info in processes.get("monitor", []) if isinstance(processes, dict) else []:
        try:
            info.process.kill()
            info.process.wait(timeout=1)
        except Exception:  # noqa: BLE001 - gone already, or not what Ray 2.60 keeps there: ray.shutdown() handles it
            pass
    ray.shutdown()


def _init(address: str | None) -> None:
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True, "configure_logging": True}
    if address:
        try:  # the caller has run check_reachable(address): ray.init on a dead address would retry for minutes
            ray.init(address=address, **quiet)  # type: ignore[arg-type]
        except ConnectionError as e:
            raise FlagError("--address", address, ADDRESS_ALLOWED, f"no Ray cluster answers there ({first_line(e)})") from None
    else:
        # "local" always starts a fresh embedded Ray, whatever a stale /tmp/ray says. Not prestarted: the idle
        # worker per CPU Ray would start for this driver's tasks (80 MiB and 0.5-2 core-s each, while the sweep
        # starts on the same cores). Tune's trial actors never take them (they start workers of their own),
        # and the one task a sweep may run, the teacher's, starts its worker when it needs one.
        # Ray 2.60 turns token authentication on for every new local cluster and warns each time that it did: a
        # secure default, said on every sweep's first line. Its errors still show.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=False, _system_config={"prestart_worker_first_driver": False}, **quiet)  # type: ignore[arg-type]


def check_local_fits(res: ResourcesSpec) -> None:
    """Refuse per-trial resources this machine can never grant (Tune would wait forever).

    Raises :class:`UsageError` naming the resource, the request and the machine's count.
    """
    cpus = os.cpu_count() or 1
    if res.cpu > cpus:
        raise UsageError(f"resources.cpu = {res.cpu:g} per trial, but this machine has {cpus} CPUs; allowed: at most {cpus}")
    if res.gpu == 0:
        return  # no need for torch (seconds to import) to count the GPUs
    import torch

    gpus = torch.cuda.device_count()
    if res.gpu > gpus:
        raise UsageError(f"resources.gpu = {res.gpu:g} per trial, but this machine has {gpus} GPUs; allowed: at most {gpus}")


def teacher_cpus(res: ResourcesSpec, log: Callable[[str], None]) -> int:
    """CPUs for the teacher task: a whole node of the kind that runs the trials (the biggest GPU node
    when trials use GPUs, else the biggest node). Warns when no live node fits a trial yet."""
    nodes = [n["Resources"] for n in _alive_nodes()]
    if not any(r.get("CPU", 0.0) >= res.cpu and r.get("GPU", 0.0) >= res.gpu for r in nodes):
        log(f"warning: no Ray node has {res.cpu:g} CPUs and {res.gpu:g} GPUs yet; trials wait until the autoscaler adds one")
    if res.gpu > 0:
        nodes = [r for r in nodes if r.get("GPU", 0.0) >= 1]
        if not nodes:  # GPU workers not up yet: ask for what one trial needs, the autoscaler can grant that
            return max(1, int(res.cpu))
    return max(1, int(max((r.get("CPU", 0.0) for r in nodes), default=1.0)))


def assigned_device() -> Any:
    """The device of this Ray worker (a trial or the teacher's task): the GPU Ray assigned, else the CPU."""
    import torch

    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned, so the first visible one is ours.
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def assigned_threads() -> int:
    """Threads = CPUs Ray gave this worker, so concurrent trials do not oversubscribe the cores."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def check_shared(storage: Storage, log: Callable[[str], None]) -> None:
    """On a Ray cluster, make sure every live node reaches the storage; refuse it up front if not.

    The driver writes a probe file, a zero-CPU task pinned to each live node reads it back through
    the same filesystem the trials will use (a local path, or the object store with that node's
    credentials); the file is removed again, so a refusal leaves nothing behind.
    Raises :class:`FlagError` naming ``--storage`` and the nodes that cannot reach it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes()
    if len(nodes) <= 1:
        if storage.is_local and not is_network_fs(storage.root):
            log(f"note: storage {storage.root} is on a local disk ({filesystem_type(storage.root)}); nodes the "
                f"autoscaler adds later will not see it: use {STORAGE_ALLOWED}")
        return
    with probe_file(storage) as (probe, token):
        reader = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = {n["NodeID"]: reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            storage, probe, token) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        seen = {node: ref in ready and _answer(ref) for node, ref in refs.items()}
    blind = [n for n in nodes if not seen[n["NodeID"]]]
    if blind:
        names = ", ".join(f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})" for n in blind)
        what = "is a folder that" if storage.is_local else "is out of reach (no access or no credentials) for"
        raise FlagError("--storage", storage.given, STORAGE_ALLOWED, f"{what} {len(blind)} of the cluster's {len(nodes)} nodes"
                        f"{' cannot see' if storage.is_local else ''}: {names}; trials there could not save checkpoints")


def _read_probe(storage: Storage, probe: str, token: str) -> bool:
    try:
        return storage.read_text(probe) == token
    except OSError:
        return False


def _answer(ref: Any) -> bool:
    try:
        return bool(ray.get(ref))
    except Exception:  # noqa: BLE001 - a node whose task failed (say, cannot build the filesystem) does not reach it
        return False
