"""Your own dataset: a folder in torchvision's ``ImageFolder`` layout or a ``.npz`` file of arrays, read into memory as
the registry's datasets are (uint8 images N x C x H x W, int64 labels), its shape, channels and classes read from the
files and checked.

- A folder: ``train/<class>/<image>`` and ``test/<class>/<image>`` (the same class folders in both), or the class
  folders at its top and ``dataset.test_split`` (a fraction, held out seeded and class-stratified) as the test set.
  Classes are the folder names in sorted order (as ``ImageFolder``'s); images are read with Pillow, as grayscale
  where the first one is, else as RGB; every image must have the first one's size.
- A ``.npz`` file: ``x_train``, ``y_train``, ``x_test``, ``y_test``; or ``x`` and ``y`` with ``dataset.test_split``.
  Images are uint8, N x H x W (one channel), N x H x W x C or N x C x H x W (C of 1 or 3); labels integers 0 ... K-1.

Before anything is read in full, :func:`describe` reads the sizes (a folder's file count and first image, an array's
header) and refuses data that would not fit in memory (:func:`check_fits`): kd-tune holds the images as uint8 in the
driver and in Ray's object store, and as float32 (4 bytes a value) in each trial.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_tune.data.registry import DatasetInfo
from kd_tune.data.sampling import stratified_subset
from kd_tune.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
HELD = 6
"""Bytes held per uint8 value: the driver's copy, the object store's, and a trial's float32 (4): the memory check's factor."""


class DataError(UsageError):
    """Own data that cannot be used: one line naming ``dataset.path``, what is wrong and what is allowed (exit 2)."""

    def __init__(self, path: str, problem: str, allowed: str) -> None:
        self.problem, self.allowed = problem, allowed
        super().__init__(f"dataset.path {path!r}: {problem}; allowed: {allowed}")


@dataclass(frozen=True)
class Layout:
    """What :func:`describe` found: the shape of one image, the classes and the image counts, without reading it all."""

    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    train_count: int
    test_count: int
    """0 when the test set is to be split off (``dataset.test_split``)."""

    @property
    def nbytes(self) -> int:
        return (self.train_count + self.test_count) * int(np.prod(self.shape))


def memory_bytes() -> int:
    """This machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def check_fits(path: str, layout: Layout, max_gb: float | None) -> None:
    """Raises :class:`DataError` when the data would not fit: ``HELD`` bytes per value against ``max_gb`` (default: half
    of this machine's memory)."""
    need = layout.nbytes * HELD
    allowed = max_gb * 1e9 if max_gb is not None else memory_bytes() / 2
    if need > allowed:
        where = f"dataset.max_gb = {max_gb:g}" if max_gb is not None else f"half of this machine's {memory_bytes() / 1e9:.1f} GB"
        raise DataError(path, f"{layout.train_count + layout.test_count} images of {'x'.join(map(str, layout.shape))} are "
                              f"{layout.nbytes / 1e9:.2f} GB as uint8, {need / 1e9:.2f} GB as kd-tune holds them (uint8 in the driver and "
                              f"Ray's object store, float32 in a trial)", f"at most {allowed / 1e9:.2f} GB ({where}); a smaller dataset, "
                              "dataset.train_size, or a larger dataset.max_gb on a machine that has it")


def _folder_images(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    return {c.name: sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}


def _open(path: str, file: Path) -> tuple[int, int, int, str]:
    from PIL import Image

    try:
        with Image.open(file) as image:
            mode = "L" if image.mode in ("L", "1", "I;16", "I") else "RGB"
            return (1 if mode == "L" else 3, image.height, image.width, mode)
    except OSError as e:
        raise DataError(path, f"{file} is not an image Pillow reads ({e})", "image files (png, jpg, ...)") from None


def describe(path: str, test_split: float = 0.0) -> Layout:
    """The dataset's layout from its files' headers. Raises :class:`DataError` for a path that is neither layout."""
    p = Path(path)
    if p.is_dir():
        parts = {"train": p / "train", "test": p / "test"} if (p / "train").is_dir() else {"train": p}
        if (p / "train").is_dir() and not (p / "test").is_dir():
            raise DataError(path, "has train/ but no test/", "train/ and test/ class folders, or class folders and dataset.test_split")
        found = {k: _folder_images(v) for k, v in parts.items()}
        classes = tuple(found["train"])
        if not classes or not any(found["train"].values()):
            raise DataError(path, "holds no class folders of images", "ImageFolder's layout: <class>/<image> (under train/ and test/)")
        if "test" in found and tuple(found["test"]) != classes:
            raise DataError(path, f"test/ has the classes {list(found['test'])}, train/ {list(classes)}", "the same class folders in both")
        if "test" not in found and not test_split:
            raise DataError(path, "has no test/ folder", "train/ and test/, or dataset.test_split (a fraction of the images as the test set)")
        first = next(f for files in found["train"].values() for f in files)
        c, h, w, _ = _open(path, first)
        counts = {k: sum(len(v) for v in files.values()) for k, files in found.items()}
        return Layout((c, h, w), classes, counts["train"], counts.get("test", 0))
    if p.suffix == ".npz" and p.is_file():
        try:
            with zipfile.ZipFile(p) as z:
                headers = {}
                for name in z.namelist():
                    with z.open(name) as f:
                        version = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                        shape, _, dtype = read(f)  # the header only: no image is read
                        headers[name.removesuffix(".npy")] = (shape, dtype)
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise DataError(path, f"is not a readable .npz file ({e})", "a .npz of x_train, y_train, x_test, y_test (or x, y)") from None
        keys = ("x_train", "y_train", "x_test", "y_test") if "x_train" in headers else ("x", "y")
        missing = [k for k in keys if k not in headers]
        if missing or (keys == ("x", "y") and not test_split):
            raise DataError(path, f"holds {sorted(headers)}" + (f", without {missing}" if missing else ", no test arrays"),
                            "x_train, y_train, x_test, y_test; or x, y with dataset.test_split")
        x_shape = headers[keys[0]][0]
        shape = _nchw_shape(path, x_shape)
        test = headers["x_test"][0][0] if "x_test" in headers else 0
        with np.load(p, allow_pickle=False) as z:  # the labels (small): how many classes
            top = max(int(z[k].max()) if z[k].size else 0 for k in keys[1::2])
        return Layout(shape, tuple(str(i) for i in range(top + 1)), int(x_shape[0]), int(test))
    raise DataError(path, "is neither a folder nor a .npz file", "a folder in ImageFolder's layout or a .npz file of arrays")


def _nchw_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (1, int(shape[1]), int(shape[2]))
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return (int(shape[3]), int(shape[1]), int(shape[2]))
    if len(shape) == 4 and shape[1] in (1, 3):
        return (int(shape[1]), int(shape[2]), int(shape[3]))
    raise DataError(path, f"its images have shape {tuple(shape[1:])}", "N x H x W, N x H x W x C or N x C x H x W with C = 1 or 3")


def _stack_folder(path: str, files: dict[str, list[Path]], classes: tuple[str, ...], shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    mode = "L" if shape[0] == 1 else "RGB"
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in files.get(name, []):
            with Image.open(f) as image:
                a = np.asarray(image.convert(mode), dtype=np.uint8)
            if a.shape[:2] != shape[1:]:
                raise DataError(path, f"{f} is {a.shape[1]}x{a.shape[0]} pixels, the first image {shape[2]}x{shape[1]}", "images of one size")
            images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _as_images(path: str, x: np.ndarray, key: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(path, f"{key} is {x.dtype}", "uint8 images (0-255)")
    shape = _nchw_shape(path, x.shape)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.shape[1:] != shape:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def _as_labels(path: str, y: np.ndarray, key: str, n: int) -> torch.Tensor:
    if y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(path, f"{key} has shape {y.shape} and dtype {y.dtype} for {n} images", "one integer label >= 0 per image")
    return torch.from_numpy(y.astype(np.int64))


def load_own(path: str, name: str, test_split: float, seed: int) -> tuple[DatasetInfo, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dataset at ``path`` as (info, train_x, train_y, test_x, test_y), as ``kd_tune.data.sources.load`` gives a
    registry's. With ``test_split``, that fraction of the images (seeded, class-stratified) is the test set."""
    layout = describe(path, test_split)
    p = Path(path)
    if p.is_dir():
        if (p / "train").is_dir():
            train_x, train_y = _stack_folder(path, _folder_images(p / "train"), layout.classes, layout.shape)
            test_x, test_y = _stack_folder(path, _folder_images(p / "test"), layout.classes, layout.shape)
        else:
            train_x, train_y = _stack_folder(path, _folder_images(p), layout.classes, layout.shape)
            test_x, test_y = train_x[:0], train_y[:0]
        classes = len(layout.classes)
    else:
        with np.load(p, allow_pickle=False) as z:  # arrays only: a pickled object in the file is refused
            keys = ("x_train", "y_train", "x_test", "y_test") if "x_train" in z else ("x", "y")
            train_x = _as_images(path, z[keys[0]], keys[0])
            train_y = _as_labels(path, z[keys[1]], keys[1], train_x.shape[0])
            if len(keys) == 4:
                test_x = _as_images(path, z["x_test"], "x_test")
                test_y = _as_labels(path, z["y_test"], "y_test", test_x.shape[0])
                if test_x.shape[1:] != train_x.shape[1:]:
                    raise DataError(path, f"x_test's images are {tuple(test_x.shape[1:])}, x_train's {tuple(train_x.shape[1:])}", "one image shape")
            else:
                test_x, test_y = train_x[:0], train_y[:0]
        classes = len(layout.classes)
    if test_x.shape[0] == 0:
        test_idx = stratified_subset(train_y, round(test_split * train_y.numel()), seed + 3_000_017, classes)
        keep = torch.ones(train_y.numel(), dtype=torch.bool)
        keep[test_idx] = False
        train_x, train_y, test_x, test_y = train_x[keep], train_y[keep], train_x[test_idx], train_y[test_idx]
    if train_y.numel() < classes or test_y.numel() == 0:
        raise DataError(path, f"{train_y.numel()} training and {test_y.numel()} test images for {classes} classes", "enough images for both")
    pixels = train_x.float().div_(255)
    mean = tuple(float(v) for v in pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in pixels.std(dim=(0, 2, 3)).clamp(min=1e-6))
    info = DatasetInfo(name, "", tuple(train_x.shape[1:]), classes, int(train_y.numel()), int(test_y.numel()), mean, std)  # type: ignore[arg-type]
    return info, train_x, train_y, test_x, test_y
