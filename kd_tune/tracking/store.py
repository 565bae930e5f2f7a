"""Which MLflow tracking store a command writes to, and whether it answers: settled before anything starts.

Light to import (MLflow itself is imported only when a URI is resolved), so that a sweep can check
its store before Ray starts, while the heavy modules load on a thread beside Ray's start.
"""

from __future__ import annotations

import logging
import os

from kd_tune.errors import TrackingUnavailableError, first_line


def resolve_tracking_uri(uri: str | None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else MLflow's default store (``mlflow.get_tracking_uri()``).

    MLflow is imported (0.8 s) only for its default: a given URI is used as it is, as MLflow would. Code
    that uses MLflow's fluent API sets the URI itself (see :func:`kd_tune.tracking.models.using_tracking_uri`).
    """
    if uri:
        return uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    import mlflow

    return str(mlflow.get_tracking_uri())


# The MLflow client retries a failed request inside the call, for about 4 minutes by default. kd-tune's
# own outbox retries tracking writes without blocking training, so the client should give up fast and
# leave the waiting to it (a user's own setting of these variables wins).
CLIENT_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def configure_client_retries() -> None:
    """Short client-side retries for this process's MLflow requests (see ``CLIENT_RETRY_DEFAULTS``); urllib3's
    line per failed attempt is silenced (kd-tune says once that the store is away, and when it is back)."""
    for k, v in CLIENT_RETRY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def check_tracking_store(uri: str, doing: str) -> None:
    """Make sure a tracking server at ``uri`` answers; raises :class:`TrackingUnavailableError` (one line saying
    what was not done) when it does not. A database or folder store is not probed: the command opens (and, when
    new, makes) it itself, and a refused command must not leave a new store behind."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - whatever the store or the network says, the user gets one line
        raise TrackingUnavailableError(f"the tracking store {uri} cannot be reached ({first_line(e)[:200]}); {doing}") from e
