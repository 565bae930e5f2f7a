"""Where sweeps and the teacher cache live: a local folder, a shared (NFS) folder, or an object store.

``--storage`` is a path or a URI (``s3://bucket/prefix``, ``gs://bucket/prefix``, any scheme
``pyarrow.fs`` reads, with its query options such as ``?endpoint_override=...``). Ray Tune writes
its experiment state and the trials' checkpoints through that pyarrow filesystem; kd-tune's own
files (the validated space, the sweep record, the teacher cache) go through the same one, so every
node of a cluster finds them. Writes are atomic: a temporary file renamed into place on a local or
NFS folder, one PUT on an object store (an object appears whole or not at all).

A storage the driver cannot write to is refused before anything starts (:func:`check_writable`).
On a multi-node cluster a folder that only the driver's machine sees, or a bucket some node has
no credentials for, would fail at the first checkpoint a remote trial persists;
:func:`kd_tune.sweep.cluster.connect.check_shared` finds that out up front by asking every node to read a probe file.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs as pafs

from kd_tune.errors import FlagError, first_line
from kd_tune.files import atomic_write_bytes

STORAGE_ENV = "KD_TUNE_STORAGE"
DEFAULT_STORAGE = "kd_tune_results"
ALLOWED = "a local folder, a folder every node mounts (NFS), or a URI such as s3://bucket/prefix or gs://bucket/prefix"
# File systems that every node of a cluster can mount; a local path on anything else is seen by one machine only.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.", "9p", "efs", "wekafs", "panfs")


@dataclass(frozen=True)
class Storage:
    """A storage root: ``fs`` is the pyarrow filesystem, ``root`` the path inside it."""

    given: str
    """The path or URI as the user wrote it (local paths made absolute): what a resume command repeats."""
    fs: pafs.FileSystem
    root: str

    @property
    def is_local(self) -> bool:
        """A path of this machine's file system (which may be an NFS mount), not an object store."""
        return bool(self.fs.type_name == "local")

    @property
    def ray_filesystem(self) -> pafs.FileSystem | None:
        """What Ray Tune takes as ``storage_filesystem`` (None: a local path, Ray's default)."""
        return None if self.is_local else self.fs

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def show(self, *parts: str) -> str:
        """A path to print: local as it is, remote as scheme://path."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.fs.type_name}://{p}"

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound)

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the folders directly below ``parts`` (none if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return bytes(f.read())

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Atomic: a reader sees the old content or the new, never a part."""
        if self.is_local:
            atomic_write_bytes(Path(self.path(*parts)), data)
            return
        target = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        with self.fs.open_output_stream(target) as f:  # the object appears when the stream closes
            f.write(data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def delete(self, *parts: str) -> None:
        """Remove a file or a whole folder; nothing if it is not there."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type != pafs.FileType.NotFound:
            self.fs.delete_file(info.path)

    def torch_load(self, *parts: str) -> Any:
        """A tensor file (weights only: no code is unpickled)."""
        import torch

        return torch.load(io.BytesIO(self.read_bytes(*parts)), map_location="cpu", weights_only=True)


def resolve_storage(raw: str | None) -> Storage:
    """``--storage``, else ``$KD_TUNE_STORAGE``, else ``./kd_tune_results``; a URI goes through pyarrow."""
    given = raw or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if "://" not in given:
        path = str(Path(given).expanduser().resolve())
        return Storage(path, pafs.LocalFileSystem(), path)
    try:
        fs, root = pafs.FileSystem.from_uri(given)
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise FlagError("--storage", given, ALLOWED, first_line(e)) from None
    root = root.rstrip("/")
    if not root:
        raise FlagError("--storage", given, ALLOWED, "no bucket or folder in it")
    if fs.type_name == "local":  # file:///path
        return Storage(root, fs, root)
    return Storage(given, fs, root)


def filesystem_type(path: str, mounts: str | None = None) -> str:
    """The type of the file system a local path lives on: that of its longest mount point in
    ``mounts`` (the text of /proc/mounts, read when not given)."""
    best, kind = "", "unknown"
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return kind
    real = os.path.realpath(path)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def is_network_fs(path: str, mounts: str | None = None) -> bool:
    """Whether a local path is on a file system that other machines can mount too (NFS, Lustre, ...)."""
    kind = filesystem_type(path, mounts)
    return any(kind == n or (n.endswith(".") and kind.startswith(n)) for n in NETWORK_FS)


@contextmanager
def probe_file(storage: Storage) -> Iterator[tuple[str, str]]:
    """A file with a random token in the storage root, removed afterwards (with any folder made for it)."""
    made = [p for p in (Path(storage.root), *Path(storage.root).parents) if not p.exists()] if storage.is_local else []
    token = uuid.uuid4().hex
    probe = f".kd_tune_probe-{token}"
    try:
        try:
            storage.write_text(token, probe)
        except OSError as e:
            raise FlagError("--storage", storage.given, ALLOWED, f"cannot write there ({first_line(e)})") from None
        yield probe, token
    finally:
        storage.delete(probe)
        for p in made:  # deepest first: only the folders made for the probe, and only if empty
            try:
                p.rmdir()
            except OSError:
                break


FULL_BELOW_BYTES = 1 << 20
"""A disk with less room than this is full for a sweep (a checkpoint, a state file or a teacher does not fit)."""


def free_bytes(path: str | Path) -> int | None:
    """Room left for this user on the disk of a local ``path`` (or of its nearest existing folder); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_writable(storage: Storage) -> None:
    """Refuse a storage the driver cannot write to (a missing bucket, no credentials, a read-only
    folder) before anything is started or written."""
    with probe_file(storage):
        pass
