"""Atomic file writes, with the standard library alone: the data files, a local sweep folder's files.

Its own module because the training path (``kd_tune.data.sources``) needs it and must import with PyTorch alone
(``benchmarks/pack_bench.py`` runs on a bare GPU machine), while :mod:`kd_tune.sweep.storage` needs pyarrow.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, content: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide shared data from other users of a cluster
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
