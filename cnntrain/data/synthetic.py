"""Synthetic, learnable image data of any shape, for smoke tests and throughput benchmarks.

Each class has its own smooth random mean image; samples are that mean plus pixel noise, so a
small CNN fits them within a few epochs while the data still costs nothing to produce.

    >>> data = make_synthetic(1000, shape=(3, 224, 224), num_classes=1000, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnntrain.data.base import ArrayDataset
from cnntrain.errors import ConfigError

_COARSE = 4  # side of the random grid each class mean is upsampled from: low frequency, easy for convs
_MEAN_LOW, _MEAN_HIGH = 48.0, 208.0  # grey levels of the class means (uint8 units)
_NOISE_STD = 32.0  # grey levels; large enough that single pixels do not give the class away
_SCRATCH = 1 << 24  # float32 elements of scratch per step (64 MiB), whatever the image size


def make_synthetic(
    n: int,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> ArrayDataset:
    """``n`` uint8 images of ``shape`` (C, H, W) with balanced labels in [0, num_classes).

    The same ``(n, shape, num_classes, seed)`` always gives the same tensors, on every machine
    (CPU generator). Class names are ``class0``, ``class1``, ...
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"synthetic image shape must be (C, H, W) with positive sizes, got {shape}")
    if n < 1 or num_classes < 1:
        raise ConfigError(f"synthetic data needs n >= 1 and num_classes >= 1, got n={n}, "
                          f"num_classes={num_classes}")
    channels, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    coarse = _MEAN_LOW + (_MEAN_HIGH - _MEAN_LOW) * torch.rand(num_classes, channels, _COARSE, _COARSE,
                                                               generator=gen)
    # Balanced classes in a shuffled order, so any prefix of the set is roughly balanced too.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, channels, height, width), dtype=torch.uint8)
    # Upsampling the class means per chunk (not once for all classes) keeps memory bounded even
    # for 1000 classes at 224x224.
    chunk = max(1, _SCRATCH // (channels * height * width))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        means = F.interpolate(coarse[labels[start:stop]], size=(height, width), mode="bilinear",
                              align_corners=False)
        noisy = torch.randn((stop - start, channels, height, width), generator=gen)
        noisy.mul_(_NOISE_STD).add_(means).round_().clamp_(0, 255)  # in place: one float buffer per chunk
        images[start:stop] = noisy
    source = f"synthetic {n}x{channels}x{height}x{width}, {num_classes} classes, seed {seed}"
    return ArrayDataset(images, labels, [f"class{i}" for i in range(num_classes)], source=source)
