"""Where a streamed image is cropped: the box of the full image each sample shows, drawn from a
seeded ``random.Random`` so a crop is a function of (seed, epoch, index) alone.

- training: torchvision's RandomResizedCrop (:func:`sample_resized_crop_box`) or TensorFlow's
  ``sample_distorted_bounding_box`` as nvcnn uses it (:func:`sample_distorted_box`), then a
  resize to the crop side and a random mirror;
- evaluation: shorter side to ``size * 256/224`` (or a given resize side, e.g. pretrained weights'
  own), then the central square (:func:`centre_crop_box`).

The PIL functions apply them on the host; ``streaming.decode_on_device`` applies the same boxes on
the training device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import Image

EVAL_RESIZE_RATIO = 256 / 224  # resize-256 / centre-crop-224; gives 342 / 299 for Inception V3
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def eval_resize_side(size: int, resize: int = 0) -> int:
    """The shorter side evaluation resizes to before its ``size`` crop: ``resize``, or ``size * 256/224``."""
    return resize or round(size * EVAL_RESIZE_RATIO)


def sample_resized_crop_box(width: int, height: int, rng: random.Random, min_scale: float = 0.08,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom), drawn from ``rng``."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    # fall back to a centre crop at the nearest allowed aspect, as torchvision does
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def sample_distorted_box(width: int, height: int, rng: random.Random,
                         boxes: Sequence[tuple[float, float, float, float]], min_scale: float = 0.05,
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), min_object_covered: float = 0.1,
                         attempts: int = 100) -> tuple[int, int, int, int]:
    """A crop (left, top, right, bottom) as TensorFlow's ``sample_distorted_bounding_box`` draws
    it (used by nvcnn and the TF ImageNet scripts), from ``rng``.

    Each attempt picks one object box (``boxes``: (ymin, xmin, ymax, xmax) in [0, 1]; none: the
    whole image), an aspect ratio uniform in ``ratio`` and a height uniform over those whose area
    is in [``min_scale``, 1] of the image and that fit, then a position; it is kept when it covers
    at least ``min_object_covered`` of that box. After ``attempts`` misses: the whole image."""
    area = width * height
    objects = list(boxes) or [(0.0, 0.0, 1.0, 1.0)]
    for _ in range(attempts):
        ymin, xmin, ymax, xmax = objects[rng.randrange(len(objects))]
        aspect = rng.uniform(*ratio)
        low = math.sqrt(min_scale * area / aspect)
        high = min(math.sqrt(area / aspect), height, width / aspect)
        if low > high:
            continue
        h = max(1, round(rng.uniform(low, high)))
        w = max(1, round(h * aspect))
        if w > width or h > height:
            continue
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        x0, y0, x1, y1 = xmin * width, ymin * height, xmax * width, ymax * height
        covered = max(0.0, min(left + w, x1) - max(left, x0)) * max(0.0, min(top + h, y1) - max(top, y0))
        if covered >= min_object_covered * (x1 - x0) * (y1 - y0):
            return left, top, left + w, top + h
    return 0, 0, width, height


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool,
                interpolation: str = "bilinear") -> Image.Image:
    """``box`` of ``image`` resized to ``size`` x ``size``, mirrored when ``flip``."""
    out = image.resize((size, size), INTERPOLATIONS[interpolation], box=box)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def centre_crop_box(width: int, height: int, size: int, resize: int = 0) -> tuple[int, int, int, int]:
    """The box of the original image that :func:`resize_centre_crop` ends up showing."""
    side = min(width, height) * size / eval_resize_side(size, resize)
    w, h = min(width, max(1, round(side))), min(height, max(1, round(side)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resize_centre_crop(image: Image.Image, size: int, resize: int = 0, interpolation: str = "bilinear") -> Image.Image:
    """Shorter side to ``resize`` (0: ``size * 256/224``), then the central ``size`` x ``size`` square."""
    resize = eval_resize_side(size, resize)
    width, height = image.size
    scale = resize / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((w, h), INTERPOLATIONS[interpolation])
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
