"""`kd-tune ui` serves the same store on 127.0.0.1 (a real MLflow server, stopped by PID)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ui_serves_the_store_on_localhost(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("seen-through-the-ui")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd_tune.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=100"
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)  # polling a condition with a deadline, not sleeping in place of one
        assert body is not None, proc.stdout.read().decode() if proc.poll() is not None and proc.stdout else "server did not answer"
        assert "seen-through-the-ui" in {e["name"] for e in body["experiments"]}
        assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only, not 0.0.0.0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on port, read from /proc/net/tcp."""
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
