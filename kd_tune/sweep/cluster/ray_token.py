"""Ray's token authentication, from the job client's side: where the cluster's token is found, and how a job server
that wants one is told apart from one that does not.

Since Ray 2.52 a cluster may require a token on every request to its dashboard (the job server): ``ray start --head``
turns it on when a token is available (``RAY_AUTH_MODE`` unset and ``~/.ray/auth_token`` present, as ``ray.init()``
of a local cluster leaves it), or when ``RAY_AUTH_MODE=token``. Ray's own job client sends the token only when
``RAY_AUTH_MODE=token`` is set in the client's environment *before* Ray is imported; kd-tune instead asks the server,
and sends the token when (and only when) the server wants it, so a job command works with and without the variable
and a token is never sent to a server that did not ask for it.

The token is found as Ray 2.60 finds it (``src/ray/rpc/authentication/authentication_token_loader.cc``), first
match wins: ``$RAY_AUTH_TOKEN``; the first line of the file ``$RAY_AUTH_TOKEN_PATH`` (an error when that is set but
cannot be read or is empty); ``$HOME/.ray/auth_token``. It goes out as Ray's header, ``Authorization: Bearer <token>``
(``ray/_private/authentication/authentication_constants.py``), on every call of the job client, its log stream
included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kd_tune.errors import UsageError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
WANTS_TOKEN = (401, 403)
"""What Ray's dashboard answers a request without a token (401) or with a wrong one (403) when token auth is on."""


class TokenError(UsageError):
    """The job server wants a token that is missing or that it refuses: one line, exit 2, nothing submitted."""


@dataclass(frozen=True)
class Token:
    """A cluster token and where it was found (said in errors; the token itself never is)."""

    value: str
    source: str

    def headers(self) -> dict[str, str]:
        """The HTTP header Ray's dashboard reads."""
        return {"Authorization": f"Bearer {self.value}"}


def default_token_path(env: Mapping[str, str] | None = None) -> Path:
    """``$HOME/.ray/auth_token``, where ``ray.init()`` and ``ray get-auth-token --generate`` write the token."""
    home = (env if env is not None else os.environ).get("HOME")
    return (Path(home) if home else Path.home()) / ".ray" / "auth_token"


def where_looked(env: Mapping[str, str] | None = None) -> str:
    """The places :func:`find_token` looks, in order, for an error message."""
    return f"${TOKEN_ENV}, ${TOKEN_PATH_ENV} and {default_token_path(env)}"


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return lines[0].strip() if lines else ""


def find_token(env: Mapping[str, str] | None = None) -> Token | None:
    """The cluster token as Ray finds it (see the module's docstring), or None when there is none.

    Raises :class:`TokenError` when ``$RAY_AUTH_TOKEN_PATH`` is set but names a file that cannot be read or is empty
    (Ray refuses that too, rather than looking further)."""
    env = env if env is not None else os.environ
    if value := env.get(TOKEN_ENV, "").strip():
        return Token(value, f"${TOKEN_ENV}")
    if path := env.get(TOKEN_PATH_ENV):
        if not (value := _first_line(Path(path))):
            raise TokenError(f"${TOKEN_PATH_ENV} {path!r} cannot be read or is empty; allowed: the path of a file holding the "
                             "cluster's token (or unset it)")
        return Token(value, f"${TOKEN_PATH_ENV} ({path})")
    default = default_token_path(env)
    if value := _first_line(default):
        return Token(value, str(default))
    return None


def token_required(url: str, env: Mapping[str, str] | None = None) -> TokenError:
    """The error for a job server that wants a token when none can be found."""
    return TokenError(f"the job server at {url} requires a token (Ray's token authentication is on there) and none was found: "
                      f"kd-tune looked in {where_looked(env)}; allowed: the cluster's token in one of them (on the head: "
                      "ray get-auth-token, or its ~/.ray/auth_token)")


def token_refused(url: str, token: Token, answer: str) -> TokenError:
    """The error for a job server that refuses the token found (another cluster's, or an old one)."""
    return TokenError(f"the job server at {url} refused the token from {token.source} ({answer}); allowed: that cluster's own token "
                      f"(on the head: ray get-auth-token), in {where_looked()}")
