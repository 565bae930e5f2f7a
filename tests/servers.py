"""Real servers for the integration tests, on 127.0.0.1, each stopped by PID afterwards.

- :class:`MlflowServer`: ``kd-tune ui`` (``mlflow server``, one worker, job execution off).
- :class:`RayCluster`: a head and a worker node (``ray start --block``, 1 CPU each) on this machine;
  the worker can run in a private mount namespace where one folder is its own (a node that cannot
  see the driver's local disk there).
- :class:`S3Server`: moto's S3-compatible server, for ``s3://`` storage.
- :class:`RayHead`: a one-node cluster whose head runs the dashboard's job server (``ray start --head
  --include-dashboard true``), for sweeps submitted as Ray jobs.

Each server runs in a session of its own (``start_new_session``), so every process it spawns, Ray's
workers included, carries that session id and is found and killed by it, even after its parent died.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The same auth mode in every Ray process of a test (Ray 2.60 turns on token auth in `ray start --head`
# when ~/.ray/auth_token exists, while a driver without the variable may not).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Credentials for the test S3 server (moto accepts any); with them set, no AWS SDK looks for the
# cloud's instance-metadata service, and the metadata lookup is turned off besides.
S3_ENV = {"AWS_ACCESS_KEY_ID": "kd-tune-test", "AWS_SECRET_ACCESS_KEY": "kd-tune-test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Processes (not zombies) of a session."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_session(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Kill every process of the session ``proc`` leads, then make sure none is left."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_pids(proc.pid) and time.monotonic() < deadline:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)  # polling a condition against a deadline
    assert not session_pids(proc.pid), f"processes left behind: {session_pids(proc.pid)}"


def get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until_answers(url: str, proc: subprocess.Popen[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}: {_output(proc)}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (an HTTP error is an answer)
        except OSError:
            time.sleep(0.3)  # polling a condition against a deadline
    raise AssertionError(f"{url} did not answer in {timeout} s")


def _output(proc: subprocess.Popen[Any]) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text()[-3000:] if log and Path(log).exists() else ""


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on port (from /proc/net/tcp), and ipv6 ones marked."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    v6 = Path("/proc/net/tcp6")
    if v6.exists():
        for line in v6.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                found.add("ipv6:" + local.split(":")[0])
    return found


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
           unset: tuple[str, ...] = ()) -> subprocess.Popen[Any]:
    """``cmd`` in a session of its own, its output in ``log``: this process's environment with ``env`` and without ``unset``."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd, env=environ)
    proc.log_path = str(log)  # type: ignore[attr-defined]
    return proc


class MlflowServer:
    """``kd-tune ui`` over a sqlite store, artifacts proxied into a folder: a team's tracking server.

    ``sweep`` is passed as ``kd-tune ui NAME``; :meth:`runs_pages` reads back what it printed.
    """

    def __init__(self, folder: Path, sweep: str | None = None, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, port or free_port()  # a port given: the same server again, after a stop
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{folder / 'mlflow.db'}"
        self.artifacts = folder / "artifacts"
        self.log = folder / "server.log"
        self.proc = _start([sys.executable, "-m", "kd_tune.cli", "ui", *([sweep] if sweep else []), "--tracking-uri", self.store,
                            "--port", str(self.port), "--artifacts-destination", str(self.artifacts)], self.log, cwd=folder)

    def __enter__(self) -> MlflowServer:
        try:
            wait_until_answers(f"{self.url}/health", self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        kill_session(self.proc, signal.SIGTERM)

    def runs_pages(self) -> dict[str, str]:
        """Sweep name -> address of its runs page, as ``kd-tune ui`` printed them before the server started
        (lines ``  NAME  http://...``)."""
        pages = {}
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if line.startswith("  ") and len(parts) == 2 and parts[1].startswith("http://"):
                pages[parts[0]] = parts[1]
        return pages

    def api(self, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> Any:
        """GET (query) or POST (body) on the REST API 2.0."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in query.items())
        return get_json(url, body)


class RayCluster:
    """A two-node Ray cluster on this machine: ``ray start --head`` and ``ray start --address``, 1 CPU each.

    ``private`` is a folder that the worker node sees as an empty tmpfs of its own (mount namespace):
    for it, the driver's files there do not exist, as on a separate machine.
    """

    def __init__(self, folder: Path, private: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        private.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**RAY_ENV, **S3_ENV}  # every node reaches the test S3 server, as with an instance profile
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1", "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        self.folder, self.private, self._ray = folder, private, ray
        self.head = _start([*ray, "--head", "--port", str(self.port), "--include-dashboard", "false"], folder / "head.log", self.env)
        self.worker: subprocess.Popen[Any] | None = None
        self.worker_id = ""
        try:
            self.head_id = self._wait_for_new_node(set())
            self.start_worker()
        except BaseException:
            self.stop()
            raise

    def start_worker(self) -> None:
        """(Re)start the worker node, e.g. after a test killed the last one."""
        if self.worker is not None:
            kill_session(self.worker)
        worker_cmd = " ".join([*self._ray, "--address", self.address])
        self.worker = _start(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs kd-tune-private {self.private} && exec {worker_cmd}"], self.folder / "worker.log", self.env)
        # A killed worker can still count as alive for a while (until Ray's health checks give up on it).
        self.worker_id = self._wait_for_new_node({self.head_id, self.worker_id})

    def worker_alive(self) -> bool:
        return self.worker is not None and any("/raylet/raylet " in cmdline(p) for p in session_pids(self.worker.pid))

    def _wait_for_new_node(self, known: set[str], timeout: float = 120) -> str:
        """The id of a live node not in ``known``, once one has joined (asked through a driver in a subprocess)."""
        script = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                  "print('kd-tune-nodes', json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in (self.head, self.worker):
                assert proc is None or proc.poll() is None, f"ray start exited: {_output(proc)}"
            res = subprocess.run([sys.executable, "-c", script, self.address], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, **self.env})
            if res.returncode == 0:
                # Ray may print its own warnings (e.g. "raylet has lagging heartbeats") after ours: find our line.
                line = next(ln for ln in res.stdout.splitlines() if ln.startswith("kd-tune-nodes "))
                new = set(json.loads(line.removeprefix("kd-tune-nodes "))) - known
                if new:
                    return new.pop()
            time.sleep(0.5)  # polling a condition against a deadline
        raise AssertionError(f"no node joined the Ray cluster beside {known}")

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet, as when the machine dies; its trials' processes die with it."""
        assert self.worker is not None
        raylets = [p for p in session_pids(self.worker.pid) if "/raylet/raylet " in cmdline(p)]
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        return raylets[0]

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                kill_session(proc)


class S3Server:
    """moto's S3 server on 127.0.0.1 with a bucket, and the pyarrow URI options that reach it."""

    CREDENTIALS = S3_ENV

    def __init__(self, folder: Path, bucket: str = "kd-tune") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.bucket = free_port(), bucket
        self.proc = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], folder / "s3.log")
        try:
            wait_until_answers(f"http://127.0.0.1:{self.port}/", self.proc)
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}/{bucket}", method="PUT"), timeout=10).close()
        except BaseException:
            self.stop()
            raise

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def stop(self) -> None:
        kill_session(self.proc)


def descendants(pids: list[int]) -> list[int]:
    """The processes below ``pids`` (by parent pid), whatever their session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class RayHead:
    """A one-node Ray cluster with the job server: ``ray start --head --include-dashboard true`` on 127.0.0.1,
    what ``ray up`` makes of a cluster's head. ``url`` is the job server, ``address`` the GCS.

    Every port is a free one and the temp folder is its own (short: Ray's socket paths must fit 107 bytes):
    a job's driver finds its cluster through ``<temp dir>/ray_current_cluster``, which another ``ray start``
    on this machine would overwrite in the shared /tmp/ray. Ray's job supervisor starts each driver in a
    session of its own, so :meth:`stop` kills the head's session and every descendant of it, by PID.

    With a ``token`` the head has Ray's token authentication on, exactly as ``ray start --head`` turns it on by itself
    (Ray 2.60): ``RAY_AUTH_MODE`` unset and the token in ``$HOME/.ray/auth_token`` (where ``ray.init()`` of a local
    cluster or ``ray get-auth-token --generate`` writes it), ``home`` a folder of its own. Without one, it is off
    (``RAY_AUTH_MODE=disabled``, whatever token files exist).
    """

    def __init__(self, folder: Path, num_cpus: int = 2, env: dict[str, str] | None = None, token: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(RAY_ENV) | (env or {})  # inherited by the head's jobs and their trials
        self.token, self.home = token, folder / "home"
        unset: tuple[str, ...] = ()
        if token is not None:
            (self.home / ".ray").mkdir(parents=True, exist_ok=True)
            (self.home / ".ray" / "auth_token").write_text(token + "\n")
            del self.env["RAY_AUTH_MODE"]
            self.env["HOME"] = str(self.home)
            unset = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        self.temp_dir = tempfile.mkdtemp(prefix="kdj-", dir="/tmp")
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(self.port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats",
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()), "--temp-dir", self.temp_dir]
        self.proc = _start(cmd, folder / "head.log", self.env, cwd=folder, unset=unset)
        try:
            wait_until_answers(f"{self.url}/api/version", self.proc)  # with token auth on: 401, an answer
        except BaseException:
            self.stop()
            raise

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends this head: Ray's token header, with token authentication on."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stop(self) -> None:
        tree = descendants(session_pids(self.proc.pid))  # jobs' drivers, in sessions of their own
        kill_session(self.proc)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while [p for p in tree if Path(f"/proc/{p}").exists() and cmdline(p)] and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a condition against a deadline
        left = [p for p in tree if Path(f"/proc/{p}").exists() and cmdline(p)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"processes left behind: {left}"
