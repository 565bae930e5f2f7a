"""Seeded, class-stratified subsets: the one sampling helper that :mod:`kd_tune.data.split` (the validation split and
the training subset) and :mod:`kd_tune.data.custom` (a test set held out of your own data) share. A leaf (PyTorch
only), so that ``split`` imports ``custom`` and never the other way round."""

from __future__ import annotations

import torch


def stratified_subset(labels: torch.Tensor, size: int, seed: int, num_classes: int) -> torch.Tensor:
    """Indices of a fixed, seeded subset with each class in proportion to its share of labels."""
    n = labels.numel()
    if size >= n:
        return torch.arange(n)
    counts = torch.bincount(labels, minlength=num_classes).double()
    exact = counts * size / n
    quota = exact.floor().long()
    # Largest remainders get the leftover slots, so the quotas add up to exactly `size`.
    leftover = size - int(quota.sum())
    quota[torch.argsort(exact - quota.double(), descending=True, stable=True)[:leftover]] += 1
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[: int(quota[c])]])
    return torch.sort(torch.cat(picks)).values
