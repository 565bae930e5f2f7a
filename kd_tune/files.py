"""Atomic file writes and an exclusive file lock, with the standard library alone: the data files, a local sweep
folder's files, the first creation of a local MLflow store.

Its own module because the training path (``kd_tune.data.sources``) needs it and must import with PyTorch alone
(``benchmarks/pack_bench.py`` runs on a bare GPU machine), while :mod:`kd_tune.sweep.state.storage` needs pyarrow.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: say which one (a full disk's error then says where)
        raise


@contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the block, waiting for any other holder; yields whether it is held.

    The lock file is made when missing and never removed: unlinking it while another process waits on it would let a
    third lock a new file of the same name at the same time. Where it cannot be made (a read-only folder) the block
    runs unlocked: whoever can write nothing there cannot race anyone to create anything there either."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
