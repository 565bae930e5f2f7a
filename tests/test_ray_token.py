"""Where kd-tune's job client finds a cluster's token: Ray 2.60's sources in Ray's order (pure logic; the real job
server with token authentication on is in tests/test_jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_tune.sweep.cluster.ray_token import (
    TOKEN_ENV,
    TOKEN_PATH_ENV,
    Token,
    TokenError,
    find_token,
    token_refused,
    token_required,
    where_looked,
)


def _home(tmp_path: Path, token: str | None) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token + "\n")
    return {"HOME": str(home)}


def test_the_token_file_in_home(tmp_path: Path) -> None:
    env = _home(tmp_path, "abc123")
    assert find_token(env) == Token("abc123", str(tmp_path / "home" / ".ray" / "auth_token"))


def test_no_token_anywhere(tmp_path: Path) -> None:
    env = _home(tmp_path, None)
    assert find_token(env) is None
    (tmp_path / "home" / ".ray" / "auth_token").write_text("\n")  # an empty file is no token
    assert find_token(env) is None


def test_ray_auth_token_then_its_path_then_the_file(tmp_path: Path) -> None:
    env = _home(tmp_path, "from-home")
    path = tmp_path / "token.txt"
    path.write_text("from-path\nsecond line ignored\n")
    assert find_token({**env, TOKEN_ENV: " from-env ", TOKEN_PATH_ENV: str(path)}) == Token("from-env", "$RAY_AUTH_TOKEN")
    assert find_token({**env, TOKEN_PATH_ENV: str(path)}) == Token("from-path", f"$RAY_AUTH_TOKEN_PATH ({path})")
    assert find_token({**env, TOKEN_ENV: "  "}) == Token("from-home", str(tmp_path / "home" / ".ray" / "auth_token"))  # blank: unset


@pytest.mark.parametrize("content", [None, ""])
def test_a_token_path_that_cannot_be_read_is_an_error_not_a_fallback(tmp_path: Path, content: str | None) -> None:
    env = _home(tmp_path, "from-home")
    path = tmp_path / "token.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenError) as e:
        find_token({**env, TOKEN_PATH_ENV: str(path)})
    assert str(e.value) == (f"$RAY_AUTH_TOKEN_PATH {str(path)!r} cannot be read or is empty; allowed: the path of a file holding the "
                            "cluster's token (or unset it)")
    assert e.value.exit_code == 2


def test_the_errors_say_where_kd_tune_looked_and_never_the_token(tmp_path: Path) -> None:
    env = _home(tmp_path, None)
    assert where_looked(env) == f"$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH and {tmp_path / 'home' / '.ray' / 'auth_token'}"
    required = str(token_required("http://127.0.0.1:8265", env))
    assert required.startswith("the job server at http://127.0.0.1:8265 requires a token") and where_looked(env) in required
    refused = str(token_refused("http://h:1", Token("s3cret", "$RAY_AUTH_TOKEN"), "Forbidden: Invalid authentication token"))
    assert "refused the token from $RAY_AUTH_TOKEN (Forbidden: Invalid authentication token)" in refused and "s3cret" not in refused
    assert "\n" not in required + refused
    assert Token("s3cret", "x").headers() == {"Authorization": "Bearer s3cret"}


class _JobServer:
    """A stand-in for the dashboard's HTTP API, on 127.0.0.1, that records the Authorization header of every request:
    ``token`` None answers everything (token auth off), else it answers as Ray's token middleware does (401 without a
    token, 403 with a wrong one)."""

    def __init__(self, token: str | None) -> None:
        import http.server
        import json
        import threading

        seen: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                got = self.headers.get("Authorization")
                seen.append(got)
                if token is not None and got != f"Bearer {token}":
                    status, body = (401, b"Unauthorized: Missing authentication token") if got is None else (403, b"Forbidden: Invalid authentication token")
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                else:
                    status, body = 200, json.dumps({"version": "4", "ray_version": "2.60.0"}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_token_goes_only_to_a_server_that_asks_for_it(tmp_path: Path) -> None:
    """kd-tune's job client in a fresh process, as a user's shell runs it ($RAY_AUTH_MODE unset, the token in ~/.ray): a
    server that does not ask gets no token, one that asks gets it on every request, a wrong one is refused in one line.
    (Ray itself adds its token to every request where $RAY_AUTH_MODE=token was set before it was imported; the real CLI
    with and without that variable is driven against a real head in tests/test_jobs.py.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")} | _home(tmp_path, "t0ken")
    open_server, token_server = _JobServer(None), _JobServer("t0ken")
    code = ("import sys; from kd_tune.sweep.cluster.job_server import connect; from kd_tune.sweep.cluster.ray_token import TokenError\n"
            "connect(sys.argv[1]); connect(sys.argv[2])\n"
            "try:\n    connect(sys.argv[3])\nexcept TokenError as e:\n    print(e)")
    try:
        found = subprocess.run([sys.executable, "-c", code, open_server.url, token_server.url, open_server.url], env=env,
                               capture_output=True, text=True, timeout=120)
        assert found.returncode == 0 and not found.stdout, found.stdout + found.stderr
        assert open_server.seen and set(open_server.seen) == {None}  # never sent where nobody asked
        first = token_server.seen[:]
        assert first[0] is None and set(first[1:]) == {"Bearer t0ken"}  # asked, then sent on every request
        res = subprocess.run([sys.executable, "-c", code, open_server.url, open_server.url, token_server.url], env=env | {"RAY_AUTH_TOKEN": "wrong"},
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "refused the token from $RAY_AUTH_TOKEN (Forbidden: Invalid authentication token)" in res.stdout and "wrong" not in res.stdout
    finally:
        open_server.close()
        token_server.close()
