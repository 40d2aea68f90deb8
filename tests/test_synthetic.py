"""Synthetic data: deterministic, balanced, the requested shape, and learnable."""

from __future__ import annotations

import pytest
import torch

from cnntrain.data.synthetic import make_synthetic
from cnntrain.errors import ConfigError


def test_shape_dtype_balance() -> None:
    data = make_synthetic(103, shape=(1, 28, 20), num_classes=10)
    assert data.images.shape == (103, 1, 28, 20) and data.images.dtype == torch.uint8
    assert data.labels.bincount().tolist() == [11, 11, 11] + [10] * 7
    assert data.classes == [f"class{i}" for i in range(10)] and data.num_classes == 10


def test_deterministic_from_seed() -> None:
    a, b, c = make_synthetic(64, seed=3), make_synthetic(64, seed=3), make_synthetic(64, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_learnable_by_nearest_class_mean() -> None:
    # Class means estimated on one half classify the other half: a CNN has far more to go on.
    data = make_synthetic(1000, shape=(3, 16, 16), num_classes=10, seed=0)
    x, y = data.images.flatten(1).float(), data.labels
    means = torch.stack([x[:500][y[:500] == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x[500:], means).argmin(1) == y[500:]).float().mean()
    assert accuracy > 0.9
    # ... but no single pixel gives the class away: noise is large next to the class differences.
    assert data.images.float().std() > 30


def test_large_images_and_many_classes() -> None:
    data = make_synthetic(6, shape=(3, 224, 224), num_classes=1000)
    assert data.images.shape == (6, 3, 224, 224) and int(data.labels.max()) < 1000


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=4, num_classes=0), dict(n=4, shape=(32, 32)),
                                    dict(n=4, shape=(3, 0, 8))])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_synthetic(**kwargs)
