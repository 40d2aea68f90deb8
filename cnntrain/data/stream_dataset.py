"""The samples of a streamed set: what each one is, how its bytes are read and how it is decoded.

A :class:`StreamDataset` lists its samples and reads one at a time with the reader the format
module gave it (:func:`read_file` here, ``tfrecord.read_example``, ``tarshards.read_member``), so
this module knows no format and every format module can build one. Decoding, the pixel limit
(``images.py``) and the crop (``crops.py``) are the same for all formats. The loader that batches
samples across worker processes is in ``streaming.py``.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnntrain.data.augment import POLICY_TAG, apply_one
from cnntrain.data.crops import (
    centre_crop_box,
    crop_resize,
    eval_resize_side,
    resize_centre_crop,
    sample_distorted_box,
    sample_resized_crop_box,
)
from cnntrain.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, open_image, to_rgb
from cnntrain.data.pipeline import mix_seed
from cnntrain.errors import DataError

log = logging.getLogger("cnntrain")

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_CLASSES = 1 << 20  # class names made up from the largest label (no class list given) stop here

Box = tuple[float, float, float, float]  # ymin, xmin, ymax, xmax in [0, 1]


def read_file(data: StreamDataset, item: str) -> tuple[bytes, list[Box]]:
    """The reader of samples that are image files: ``item`` is the path."""
    return Path(item).read_bytes(), []


@dataclass
class Encoded:
    """A JPEG for the training device to decode: its bytes, the box to show and the mirror flag."""

    data: torch.Tensor  # uint8 [n], the file's bytes
    box: tuple[int, int, int, int]  # left, top, right, bottom in the full image
    flip: bool
    seed: int = 0  # of the --auto-augment policy the device applies after the crop


@dataclass
class StreamDataset:
    """A list of samples read lazily: ``items[i]`` is a file path, ``(shard, offset)`` of a
    TFRecord record, or ``(shard, offset, size)`` of a tar member, and ``reader(self, items[i])``
    gives its encoded bytes and object boxes. ``labels`` int64 [N] in [0, classes); ``shape`` is
    the crop (3, S, S)."""

    items: list
    labels: torch.Tensor
    classes: list[str]
    image_size: int
    source: str = ""
    train: bool = True  # random crop + flip (True) or resize + centre crop (False)
    min_scale: float = 0.08  # smallest crop area, as a fraction of the image
    crop: str = "random-resized"  # training crop: random-resized | bbox-distort (crops.sample_distorted_box)
    decode: str = "host"  # host: workers decode; device: workers pass JPEGs on, the device decodes them
    reader: Callable[[StreamDataset, Any], tuple[bytes, list[Box]]] = read_file
    max_pixels: int = MAX_IMAGE_PIXELS  # larger images are refused unread (images.open_image); 0: no limit
    policy: Callable | None = None  # --auto-augment's transform (augment.py), applied to each training crop
    eval_resize: int = 0  # evaluation's shorter side before the centre crop (0: image_size * 256/224)
    interpolation: str = "bilinear"  # of every host resize: bilinear | bicubic | nearest (crops.INTERPOLATIONS)
    _files: dict = field(default_factory=dict, repr=False)  # open shard handles, per worker process

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, index: torch.Tensor) -> StreamDataset:
        idx = index.tolist()
        return replace(self, items=[self.items[i] for i in idx], labels=self.labels[index],
                       classes=list(self.classes), _files={})

    def as_eval(self) -> StreamDataset:
        """The same samples with the evaluation transform."""
        return replace(self, train=False, _files={})

    def handle(self, shard: str):
        """An open binary handle on ``shard``, kept for reuse by the process that opened it."""
        # Keyed by process: a handle inherited through fork shares its file offset with the parent.
        key = (os.getpid(), shard)
        handle = self._files.get(key)
        if handle is None:
            handle = self._files[key] = open(shard, "rb")  # noqa: SIM115 - kept open for reuse
        return handle

    def where(self, i: int) -> str:
        """Sample ``i`` for messages: its file, or its shard and byte offset."""
        item = self.items[i]
        if isinstance(item, tuple):
            return f"{item[0]}: {'record' if len(item) == 2 else 'member'} at byte {item[1]}"
        return str(item)

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (CRC-checked for TFRecord)."""
        return self.read_with_boxes(i)[0]

    def read_with_boxes(self, i: int) -> tuple[bytes, list[Box]]:
        """The encoded bytes of sample ``i`` and its object boxes (TFRecord Examples that carry them)."""
        return self.reader(self, self.items[i])

    def load(self, i: int, seed: int) -> torch.Tensor | Encoded | None:
        """Sample ``i`` as uint8 [3, S, S]; with ``decode="device"`` an RGB or grey JPEG comes back
        :class:`Encoded` instead (the same crop, left to ``streaming.decode_on_device``); None when
        it cannot be read or is over the pixel limit (checked from the header, before decoding)."""
        try:
            data, boxes = self.read_with_boxes(i)
            with open_image(io.BytesIO(data), self.where(i), self.max_pixels) as image:  # reads the header only
                if self.decode == "device" and image.format == "JPEG" and image.mode in ("RGB", "L"):
                    box, flip = self._crop(image.size, boxes, seed)
                    return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip,
                                   mix_seed(seed, POLICY_TAG))
                if not self.train and image.format == "JPEG":
                    # libjpeg can decode at 1/2..1/8 scale: much faster when the image is large.
                    resize = eval_resize_side(self.image_size, self.eval_resize)
                    image.draft("RGB", (resize, resize))
                image.load()
                image = to_rgb(image)
                if self.train:
                    box, flip = self._crop(image.size, boxes, seed)
                    out = crop_resize(image, box, self.image_size, flip, self.interpolation)
                else:
                    out = resize_centre_crop(image, self.image_size, self.eval_resize, self.interpolation)
            pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)))
            if self.train and self.policy is not None:
                pixels = apply_one(self.policy, pixels, mix_seed(seed, POLICY_TAG))
            return pixels
        except ImageTooLarge as exc:  # skipped like a corrupt file, but said at once: the limit may need raising
            log.warning("skipping %s", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a bad image must not kill a worker; it is counted
            log.debug("skipping sample %s: %s", self.items[i], exc)
            return None

    def _crop(self, size: tuple[int, int], boxes: list, seed: int) -> tuple[tuple[int, int, int, int], bool]:
        """(box of the original image to show, mirror it?) for one sample: a function of ``seed``."""
        if not self.train:
            return centre_crop_box(*size, self.image_size, self.eval_resize), False
        rng = random.Random(seed)
        box = sample_distorted_box(*size, rng, boxes, self.min_scale) if self.crop == "bbox-distort" else \
            sample_resized_crop_box(*size, rng, self.min_scale)
        return box, rng.random() < 0.5


def class_names(labels: list[int], classes: list[str] | None, source: str, first: int = 0) -> list[str]:
    """``classes`` when given, else names made up from the largest label: "0".."K-1" (``first``
    0) or "1".."K" (1-based files). Refuses a made-up list longer than :data:`MAX_CLASSES`: a
    corrupt label must not allocate millions of names."""
    if classes:
        return list(classes)
    count = max(labels) + 1
    if count > MAX_CLASSES:
        raise DataError(f"{source}: largest label {max(labels) + first} would make {count:,} classes, more than "
                        f"{MAX_CLASSES:,}; the label is corrupt, or list the classes in index.json")
    return [str(k + first) for k in range(count)]
