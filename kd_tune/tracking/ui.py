"""MLflow's UI over a sweeps' store: the pages `kd-tune ui` and a sweep's end print, and the server itself.

Each sweep's runs page opens on the view of its grid points that :mod:`kd_tune.tracking.grid_view` keeps on its
experiment (``viewStateShareKey``: what MLflow 3.17's UI lets an address open; the columns themselves an address cannot
choose), and the second line printed opens the report's figure of accuracy against alpha on the parent run. The
Assistant panel MLflow opens on a browser's first visit to a local server (``isLocalServer``, local storage
``mlflow.assistant.fab.autoOpenedOnFirstLoad``) is out of an address's reach: the view's columns fit beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_tune.errors import FlagError
from kd_tune.tracking.grid_view import save_grid_view
from kd_tune.tracking.store_checks import shown_uri
from kd_tune.tracking.tags import TAG_ROLE, TAG_SWEEP

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

UI_HOST = "127.0.0.1"
REPORT_FIGURES = ("accuracy_vs_alpha.png", "accuracy_vs_alpha_by_model.png", "search_accuracy_vs_alpha_T.png", "accuracy_vs_method_knob.png")
"""The report's figure of accuracy against alpha, by the kind of sweep (kd_tune.report): the first one the parent run has
is the one printed."""


def runs_page(host: str, port: int, experiment_id: str, view: str | None = None) -> str:
    """The address of an experiment's runs page in MLflow's UI, in its "Model training" view, opening the saved ``view``
    (:data:`kd_tune.tracking.grid_view.GRID_VIEW`) when given.

    MLflow 3.17's UI takes the view from the page address or the browser's last choice, by default
    GenAI (it no longer reads the experiment's ``mlflow.experimentKind`` tag for that): without
    ``workflowType=machine_learning`` the runs table opens beside a GenAI side bar (traces, judges,
    prompts) and the experiment's own link leads to the GenAI overview. A saved view is opened only by an address
    without a sort or filter of its own (MLflow's shared-view hook skips it then), so this one names none.
    """
    page = f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return page if view is None else f"{page}&viewStateShareKey={view}"


def run_page(host: str, port: int, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """The address of a run's artifacts in MLflow's UI, ``artifact`` (a path in them) shown when given; in the
    "Model training" view, as :func:`runs_page`."""
    path = "artifacts" if artifact is None else f"artifacts/{artifact}"
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}/{path}?workflowType=machine_learning"


def report_figure(client: MlflowClient, parent_run_id: str) -> str | None:
    """The artifact path of the report's figure of accuracy against alpha on the parent run (``report/...png``; its
    ``summary.md`` for a report without one), or None when it has no report (no ``kd-tune report`` yet) or its
    artifacts cannot be listed from here."""
    try:
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent_run_id, "report")}
    except Exception:  # noqa: BLE001 - artifacts this process cannot read before the server runs (proxied, cloud): unknown
        return None
    return next((f"report/{f}" for f in (*REPORT_FIGURES, "summary.md") if f in names), None)


def _parent_run(client: MlflowClient, experiment_id: str, name: str) -> str | None:
    """The sweep's parent run: its latest, as the report takes it (two storages may hold a sweep of this name)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def sweep_lines(client: MlflowClient, host: str, port: int, name: str, experiment_id: str, width: int = 0) -> list[str]:
    """A sweep's two lines: the runs page on the view of its grid points (the view saved on the way), and its report's
    figure of accuracy against alpha on the parent run (else the parent run's artifacts, where ``kd-tune report`` puts
    its figures). ``width``: the names' column."""
    parent = _parent_run(client, experiment_id, name)
    if parent is None:
        return [f"  {name:<{width}}  {runs_page(host, port, experiment_id)}"]
    lines = [f"  {name:<{width}}  {runs_page(host, port, experiment_id, save_grid_view(client, experiment_id, parent))}"]
    figure = report_figure(client, parent)
    pad = " " * width
    if figure is not None:
        lines.append(f"  {pad}  report figures: {run_page(host, port, experiment_id, parent, figure)}")
    else:
        lines.append(f"  {pad}  report figures, after kd-tune report {name}: {run_page(host, port, experiment_id, parent)}")
    return lines


def ui_lines(uri: str, host: str, port: int, name: str | None = None) -> list[str]:
    """What ``kd-tune ui`` prints before the server starts: where it serves, then each sweep's pages
    (:func:`sweep_lines`), or sweep NAME's only.

    Sweeps are the experiments holding a kd-tune parent run; older ones get the experiment tag that makes MLflow's UI
    open on their runs on the way, and each sweep its view of its grid points. Raises FlagError for a NAME that is not a
    sweep in the store.
    """
    from kd_tune.tracking.runs import sweep_experiments
    from kd_tune.tracking.store import open_store

    client = open_store(uri)
    sweeps = sweep_experiments(client)
    if name is not None:
        if name not in sweeps:
            known = ", ".join(sorted(sweeps)) if sweeps else "none yet (start one with kd-tune sweep)"
            raise FlagError("sweep", name, f"one of the sweeps there: {known}", f"is not tracked in {uri}")
        sweeps = {name: sweeps[name]}
    lines = [f"MLflow UI for {shown_uri(uri)} on http://{host}:{port} (Ctrl+C stops it)"]
    if sweeps:
        width = max(map(len, sweeps))
        what = "its grid points (best first), then its report's figures"
        lines.append(f"each sweep: {what}:" if name is None else f"sweep {name!r}: {what}:")
        for n, i in sorted(sweeps.items()):
            lines += sweep_lines(client, host, port, n, i, width)
    return lines


def sweep_page(tracking_uri: str, experiment_id: str, parent_run_id: str, host: str = UI_HOST, port: int = 5000) -> str:
    """The runs page a sweep's end prints: on the view of its grid points, saved now (a team's server, which ``kd-tune
    ui`` started before the sweep, has no other moment to get it); the plain runs page when the store refuses it."""
    from mlflow.tracking import MlflowClient

    from kd_tune.process import tracking_client

    try:
        with tracking_client():  # a server gone meanwhile: a few seconds of retries, not MLflow's minutes
            view: str | None = save_grid_view(MlflowClient(tracking_uri), experiment_id, parent_run_id)
    except Exception:  # noqa: BLE001 - the sweep's record is complete without its view; `kd-tune ui` saves it again
        view = None
    return runs_page(host, port, experiment_id, view)


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
