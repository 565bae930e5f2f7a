"""A pre-trained teacher named by an MLflow model URI, fetched as a file the training layer reads
(:mod:`kd_tune.distill.pretrained`): MLflow 3's ``torch.export`` archive of the model (``data/model.pt2``), or a
kd-tune weights file (``model/teacher.pt``, ``model/student.pt``) that a ``runs:/`` URI names.

A PyTorch model MLflow saved as a pickle is refused, not loaded: unpickling it could run any code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kd_tune.process import QUIET_DOWNLOADS, environment
from kd_tune.tracking.logged_models import using_tracking_uri

PT2 = Path("data") / "model.pt2"
"""Where MLflow 3 keeps a PyTorch model's ``torch.export`` archive inside the model's folder."""
WEIGHTS = ("teacher.pt", "student.pt", "state.pt")


def fetch(uri: str, tracking_uri: str, into: Path | None = None) -> Path:
    """The local file of the model at ``uri`` (``models:/<model id>``, ``models:/<name>/<version>``, ``runs:/<run id>/<path>``),
    downloaded from the store ``tracking_uri`` into ``into`` (a new temporary folder by default).

    Raises ValueError saying what was found instead (nothing at that URI, a pickled model, no model file)."""
    import mlflow

    folder = into or Path(tempfile.mkdtemp(prefix="kd-tune-teacher-"))
    try:
        with using_tracking_uri(tracking_uri), environment(QUIET_DOWNLOADS):  # one model: its bar is noise in the sweep's log
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except Exception as e:  # noqa: BLE001 - MLflow's errors for a URI it cannot resolve vary by store and scheme
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"nothing to download at that URI in {tracking_uri} ({first[:200]})") from None
    if local.is_file():
        if local.suffix not in (".pt", ".pt2"):
            raise ValueError(f"{local.name} is not a model file (.pt2, or kd-tune's .pt)")
        return local
    if (local / PT2).is_file():
        return local / PT2
    for name in WEIGHTS:
        if (local / name).is_file():
            return local / name
    if (local / "MLmodel").is_file():
        raise ValueError("an MLflow PyTorch model saved as a pickle (not loaded: unpickling could run code); log it in MLflow 3's "
                         "torch.export format, or name its weights file")
    raise ValueError(f"no model file there (looked for {PT2} and {', '.join(WEIGHTS)})")
