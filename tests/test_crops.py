"""Crop boxes of the streamed pipeline: RandomResizedCrop, nvcnn's distorted bounding box, centre crop."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from cnntrain.data.crops import (
    centre_crop_box,
    crop_resize,
    resize_centre_crop,
    sample_distorted_box,
    sample_resized_crop_box,
)


def test_crops_are_a_function_of_the_seed() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))

    def crop(seed: int) -> np.ndarray:  # as StreamDataset draws it: the box, then the mirror flag
        rng = random.Random(seed)
        box = sample_resized_crop_box(*image.size, rng)
        return np.asarray(crop_resize(image, box, 32, rng.random() < 0.5))

    a, b, c = crop(7), crop(7), crop(8)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert resize_centre_crop(image, 299).size == (299, 299)


def test_distorted_box_crops_keep_a_tenth_of_an_object_box_and_respect_the_area_range() -> None:
    rng = random.Random(3)
    width, height = 200, 120
    car = (0.6, 0.7, 0.9, 0.95)  # ymin, xmin, ymax, xmax: a small object near the bottom-right corner
    x0, y0, x1, y1 = 0.7 * width, 0.6 * height, 0.95 * width, 0.9 * height
    for boxes in ([car], []):
        crops = [sample_distorted_box(width, height, rng, boxes, min_scale=0.05) for _ in range(300)]
        assert len(set(crops)) > 250  # random, not the whole-image fallback
        for left, top, right, bottom in crops:
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert (right - left) * (bottom - top) >= 0.045 * width * height
            if boxes:
                inside = max(0, min(right, x1) - max(left, x0)) * max(0, min(bottom, y1) - max(top, y0))
                assert inside >= 0.1 * (x1 - x0) * (y1 - y0)
            else:  # the whole image is the object
                assert (right - left) * (bottom - top) >= 0.1 * width * height - 1
    # No crop can satisfy the constraints: the whole image, as TensorFlow does.
    assert sample_distorted_box(width, height, rng, [car], min_scale=1.0) == (0, 0, width, height)


def test_the_centre_box_is_what_resize_then_centre_crop_shows():
    ys, xs = np.mgrid[0:120, 0:200]
    image = Image.fromarray(np.stack([xs, ys * 2, xs // 2 + ys], -1).clip(0, 255).astype(np.uint8))
    assert centre_crop_box(200, 120, 56) == (47, 7, 152, 112)  # 120 * 56 / 64 = 105 px square in the middle
    shown = np.asarray(crop_resize(image, centre_crop_box(200, 120, 56), 56, False), dtype=np.int16)
    expected = np.asarray(resize_centre_crop(image, 56), dtype=np.int16)
    assert np.abs(shown - expected).max() <= 3  # the same region, resampled once instead of twice
    assert np.abs(np.asarray(crop_resize(image, (0, 0, 105, 105), 56, False), dtype=np.int16) - expected).max() > 20


def test_evaluation_with_pretrained_weights_resize_equals_torchvision_s_transform():
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8))
    ours = np.asarray(resize_centre_crop(image, 48, resize=56, interpolation="bicubic"))
    theirs = tvf.center_crop(tvf.resize(image, 56, InterpolationMode.BICUBIC), 48)  # weights.transforms()'s steps
    assert np.array_equal(ours, np.asarray(theirs))
    assert centre_crop_box(70, 60, 48, resize=56) == (9, 4, 60, 55)  # 60 * 48 / 56 = 51 px square in the middle
    default = np.asarray(resize_centre_crop(image, 48), dtype=np.int16)  # 48 * 256 / 224 = 55 px, bilinear
    assert not torch.equal(torch.from_numpy(default), torch.from_numpy(ours.astype(np.int16)))
