"""The dataset registry's facts: names, image shapes, classes, sizes and normalization.

Plain Python (no torch), so that validating a search space or printing ``--help`` costs nothing;
how each dataset's files are fetched and read lives in :mod:`kd_tune.data.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry: where torchvision keeps the files, their shape and normalization."""

    name: str
    torchvision_class: str
    """Class in ``torchvision.datasets`` that reads (and downloads) the files."""
    shape: tuple[int, int, int]
    """(channels, height, width) of one image."""
    num_classes: int
    train_count: int
    test_count: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_provide: str = ""
    """What to do when no source can fetch the files (shown in the error)."""


REGISTRY: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        torchvision_class="MNIST",
        shape=(1, 28, 28),
        num_classes=10,
        train_count=60000,
        test_count=10000,
        mean=(0.1307,),
        std=(0.3081,),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        torchvision_class="FashionMNIST",
        shape=(1, 28, 28),
        num_classes=10,
        train_count=60000,
        test_count=10000,
        mean=(0.2860,),
        std=(0.3530,),
        how_to_provide="install Debian's dataset-fashion-mnist, or put torchvision's FashionMNIST/raw files there",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        torchvision_class="CIFAR10",
        shape=(3, 32, 32),
        num_classes=10,
        train_count=50000,
        test_count=10000,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        how_to_provide="download cifar-10-python.tar.gz (the CIFAR-10 python version) and extract it there, "
                       "so that cifar-10-batches-py/ holds data_batch_1..5 and test_batch",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        torchvision_class="CIFAR100",
        shape=(3, 32, 32),
        num_classes=100,
        train_count=50000,
        test_count=10000,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        how_to_provide="download cifar-100-python.tar.gz (the CIFAR-100 python version) and extract it there, "
                       "so that cifar-100-python/ holds train and test",
    ),
}
