"""MLflow's UI over a sweeps' store: the address of each sweep's runs page, and the server itself."""

from __future__ import annotations

from kd_tune.errors import FlagError

UI_HOST = "127.0.0.1"


def runs_page(host: str, port: int, experiment_id: str) -> str:
    """The address of an experiment's runs page in MLflow's UI, in its "Model training" view.

    MLflow 3.17's UI takes the view from the page address or the browser's last choice, by default
    GenAI (it no longer reads the experiment's ``mlflow.experimentKind`` tag for that): without
    ``workflowType=machine_learning`` the runs table opens beside a GenAI side bar (traces, judges,
    prompts) and the experiment's own link leads to the GenAI overview.
    """
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_lines(uri: str, host: str, port: int, name: str | None = None) -> list[str]:
    """What ``kd-tune ui`` prints before the server starts: where it serves, then the runs page of each
    sweep (:func:`runs_page`), or of sweep NAME only.

    Sweeps are the experiments holding a kd-tune parent run; older ones get the experiment tag that
    makes MLflow's UI open on their runs on the way. Raises FlagError for a NAME that is not a sweep in the store.
    """
    from kd_tune.tracking.runs import sweep_experiments
    from kd_tune.tracking.store import open_store

    sweeps = sweep_experiments(open_store(uri))
    if name is not None:
        if name not in sweeps:
            known = ", ".join(sorted(sweeps)) if sweeps else "none yet (start one with kd-tune sweep)"
            raise FlagError("sweep", name, f"one of the sweeps there: {known}", f"is not tracked in {uri}")
        sweeps = {name: sweeps[name]}
    lines = [f"MLflow UI for {uri} on http://{host}:{port} (Ctrl+C stops it)"]
    if sweeps:
        width = max(map(len, sweeps))
        lines.append("runs of each sweep:" if name is None else f"runs of sweep {name!r}:")
        lines += [f"  {n:<{width}}  {runs_page(host, port, i)}" for n, i in sorted(sweeps.items())]
    return lines


def serve(uri: str, host: str, port: int, artifacts_destination: str | None = None, name: str | None = None) -> None:
    """Replace this process with MLflow's server over the database store ``uri``, after printing :func:`ui_lines`.

    One worker and no job execution keep it at ~0.5 GB. Raises :class:`FlagError` for a store the UI cannot serve
    (a server's URI, a folder) or a ``name`` that is not a sweep there.
    """
    import os
    import sys

    if "://" not in uri or uri.startswith(("http://", "https://")):
        raise FlagError("--tracking-uri", uri, "sqlite:///PATH or another SQLAlchemy URI", "the UI serves a database store")
    lines = ui_lines(uri, host, port, name)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        # The server stores the artifacts clients send it (proxied uploads): drivers need no access to that storage.
        cmd += ["--artifacts-destination", artifacts_destination]
    print("\n".join(lines), flush=True)
    os.execve(sys.executable, cmd, env)
