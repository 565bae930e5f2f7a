from __future__ import annotations

import pytest
import torch

from kd_tune.distill.models import count_parameters
from kd_tune.distill.models.cnn import SeedCNN, build_cnn


@pytest.mark.parametrize(
    "widths,expected",
    [
        # conv1 w1*9+w1, conv2 w2*w1*9+w2, dense 7*7*w2*10+10: the Keras example's own counts.
        ((256, 512), 2_560 + 1_180_160 + 250_890),
        ((16, 32), 160 + 4_640 + 15_690),
    ],
)
def test_parameter_counts_match_the_keras_models(widths: tuple[int, int], expected: int) -> None:
    assert count_parameters(SeedCNN(widths)) == expected


@pytest.mark.parametrize("shape,spatial", [((1, 28, 28), (14, 7)), ((3, 32, 32), (16, 8)), ((1, 7, 9), (4, 2))])
def test_same_padding_shapes(shape: tuple[int, int, int], spatial: tuple[int, int]) -> None:
    model = SeedCNN((4, 6), shape, num_classes=10)
    x = torch.zeros(3, *shape)
    first = model.layers[:2](x)  # pad + conv1
    assert first.shape[-2:] == (spatial[0], -(-shape[2] // 2))
    assert model(x).shape == (3, 10)


def test_maxpool_same_keeps_size_and_takes_window_max() -> None:
    model = SeedCNN((1, 1), (1, 4, 4))
    pool = model.layers[3:5]  # replicate pad + 2x2 stride-1 max
    x = torch.arange(4.0).view(1, 1, 2, 2)
    out = pool(x)
    assert out.shape == x.shape
    # bottom/right windows see the replicated edge: same result as TF's -inf padding
    assert out.flatten().tolist() == [3.0, 3.0, 3.0, 3.0]
    x = torch.tensor([[[[1.0, -5.0], [-7.0, -2.0]]]])
    assert pool(x).flatten().tolist() == [1.0, -2.0, -2.0, -2.0]


def test_seed_fixes_initial_weights_without_touching_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a = build_cnn((4, 8), (1, 28, 28), 10, seed=7)
    torch.manual_seed(123)
    b = build_cnn((4, 8), (1, 28, 28), 10, seed=7)
    assert torch.rand(1) == before  # build_cnn forked the RNG
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = build_cnn((4, 8), (1, 28, 28), 10, seed=8)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
