"""The streaming pipeline for sets too large (or too varied in size) to decode into memory.

DataLoader workers read and decode each image (from a file, a TFRecord shard or a tar shard), crop
and flip it on the host as uint8 (``crops.py`` draws the boxes); normalisation happens on the
training device. With ``decode="device"`` the workers pass JPEGs on undecoded, with their boxes,
and the main process decodes, crops and flips each batch on the training device. The interface is the one
:class:`cnntrain.data.pipeline.DeviceLoader` has, so the engine does not know which it got:

- the global batch of step ``s`` of epoch ``e`` is ``perm(seed, e)[s*B*W:(s+1)*B*W]``, and rank
  ``r`` takes its ``r``-th slice, so ranks see disjoint images and ``len()`` is equal on all;
- each image's crop and flip come from ``mix_seed(seed, epoch, index)``, not from a worker's RNG,
  so the batches do not depend on the number of workers and a resumed run sees the same pixels;
- evaluation gives rank ``r`` a contiguous ``1/W`` of the set: every image scored exactly once.

A file that cannot be decoded is skipped inside the worker (never a crash there) and counted; the
count is logged at the end of each pass.

    cnntrain train --dataset imagenet --data-dir /data/imagenet -n resnet50 --workers 8
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from cnntrain.data.crops import (
    EVAL_RESIZE_RATIO,
    centre_crop_box,
    crop_resize,
    resize_centre_crop,
    sample_distorted_box,
    sample_resized_crop_box,
)
from cnntrain.data.folder import _to_rgb
from cnntrain.data.pipeline import BatchPlan, mix_seed
from cnntrain.errors import DataError

log = logging.getLogger("cnntrain")

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class StreamDataset:
    """A list of samples read lazily: ``items[i]`` is a file path, ``(shard, offset)`` of a
    TFRecord record, or ``(shard, offset, size)`` of a tar member. ``labels`` int64 [N] in
    [0, classes); ``shape`` is the crop (3, S, S)."""

    items: list
    labels: torch.Tensor
    classes: list[str]
    image_size: int
    source: str = ""
    train: bool = True  # random crop + flip (True) or resize + centre crop (False)
    min_scale: float = 0.08  # smallest crop area, as a fraction of the image
    crop: str = "random-resized"  # training crop: random-resized | bbox-distort (crops.sample_distorted_box)
    decode: str = "host"  # host: workers decode; device: workers pass JPEGs on, the device decodes them
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

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (CRC-checked for TFRecord)."""
        return self.read_with_boxes(i)[0]

    def read_with_boxes(self, i: int) -> tuple[bytes, list[tuple[float, float, float, float]]]:
        """The encoded bytes of sample ``i`` and its object boxes (TFRecord Examples that carry them)."""
        item = self.items[i]
        if isinstance(item, tuple):
            from cnntrain.data.tfrecord import example_fields, read_record_at

            shard, offset = item[:2]
            # Keyed by process: a handle inherited through fork shares its file offset with the parent.
            key = (os.getpid(), shard)
            handle = self._files.get(key)
            if handle is None:
                handle = self._files[key] = open(shard, "rb")  # noqa: SIM115 - kept open for reuse
            if len(item) == 3:  # a tar member: (shard, offset, size)
                handle.seek(offset)
                data = handle.read(item[2])
                if len(data) != item[2]:
                    raise DataError(f"{shard}: truncated: member at byte {offset} has {len(data)} of {item[2]} bytes")
                return data, []
            where = f"{shard}: record at byte {offset}"
            image, _, boxes = example_fields(read_record_at(handle, offset, shard, f"at byte {offset}"), where)
            return image, boxes
        return Path(item).read_bytes(), []

    def load(self, i: int, seed: int) -> torch.Tensor | Encoded | None:
        """Sample ``i`` as uint8 [3, S, S]; with ``decode="device"`` an RGB or grey JPEG comes back
        :class:`Encoded` instead (the same crop, left to :func:`decode_on_device`); None when it
        cannot be read."""
        try:
            data, boxes = self.read_with_boxes(i)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                if self.decode == "device" and image.format == "JPEG" and image.mode in ("RGB", "L"):
                    box, flip = self._crop(image.size, boxes, seed)
                    return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)
                if not self.train and image.format == "JPEG":
                    # libjpeg can decode at 1/2..1/8 scale: much faster when the image is large.
                    resize = round(self.image_size * EVAL_RESIZE_RATIO)
                    image.draft("RGB", (resize, resize))
                image.load()
                image = _to_rgb(image)
                if self.train:
                    box, flip = self._crop(image.size, boxes, seed)
                    out = crop_resize(image, box, self.image_size, flip)
                else:
                    out = resize_centre_crop(image, self.image_size)
            return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)))
        except Exception as exc:  # noqa: BLE001 - a bad image must not kill a worker; it is counted
            log.debug("skipping sample %s: %s", self.items[i], exc)
            return None

    def _crop(self, size: tuple[int, int], boxes: list, seed: int) -> tuple[tuple[int, int, int, int], bool]:
        """(box of the original image to show, mirror it?) for one sample: a function of ``seed``."""
        if not self.train:
            return centre_crop_box(*size, self.image_size), False
        rng = random.Random(seed)
        box = sample_distorted_box(*size, rng, boxes, self.min_scale) if self.crop == "bbox-distort" else \
            sample_resized_crop_box(*size, rng, self.min_scale)
        return box, rng.random() < 0.5


@dataclass
class Encoded:
    """A JPEG for the training device to decode: its bytes, the box to show and the mirror flag."""

    data: torch.Tensor  # uint8 [n], the file's bytes
    box: tuple[int, int, int, int]  # left, top, right, bottom in the full image
    flip: bool


def decode_on_device(encoded: Sequence[Encoded], size: int, device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU) in one batched call, then
    crop, resize (antialiased bilinear, as PIL's) and mirror each there: uint8 [3, S, S] each, or
    None for one that does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    def one(data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return None

    try:
        images = decode_jpeg([e.data for e in encoded], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole call: find it
        images = [one(e.data) for e in encoded]
    out: list[torch.Tensor | None] = []
    for image, e in zip(images, encoded):
        if image is None:
            out.append(None)
            continue
        left, top, right, bottom = e.box
        crop = F.resized_crop(image, top, left, bottom - top, right - left, [size, size], antialias=True)
        out.append(crop.flip(-1) if e.flip else crop)
    return out


class _Batches(torch.utils.data.Dataset):
    """Worker-side view: item ``(i, seed)`` -> (uint8 image or None, label)."""

    def __init__(self, data: StreamDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        return self.data.load(i, seed), int(self.data.labels[i])


class _Batch(NamedTuple):
    pixels: torch.Tensor  # uint8 [n, 3, S, S]: the samples decoded by the workers
    encoded: list  # Encoded: the samples the device decodes
    is_encoded: torch.Tensor  # bool [n + len(encoded)]: which positions of the batch those fill
    labels: torch.Tensor
    skipped: int


def _collate(items: Sequence[tuple[torch.Tensor | Encoded | None, int]]) -> _Batch:
    good = [(x, y) for x, y in items if x is not None]
    pixels = [x for x, _ in good if not isinstance(x, Encoded)]
    return _Batch(torch.stack(pixels) if pixels else torch.empty(0, dtype=torch.uint8),
                  [x for x, _ in good if isinstance(x, Encoded)],
                  torch.tensor([isinstance(x, Encoded) for x, _ in good], dtype=torch.bool),
                  torch.tensor([y for _, y in good], dtype=torch.int64), len(items) - len(good))


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; more intra-op threads would only oversubscribe cores.
    torch.set_num_threads(1)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device_type: str, local_world_size: int = 1) -> int:
    """Workers per rank. On GPU the host only feeds data: all but one core decode. On CPU the model
    needs cores too: half decode, half compute (see :func:`balance_threads`)."""
    cores = max(1, usable_cores() // max(local_world_size, 1))
    return min(16, max(1, cores - 1)) if device_type == "cuda" else min(8, max(1, cores // 2))


def balance_threads(workers: int, explicit_threads: int, local_world_size: int = 1) -> None:
    """Keep intra-op threads + workers <= cores (unless ``--threads`` was given explicitly)."""
    if explicit_threads or workers == 0:
        return
    cores = max(1, usable_cores() // max(local_world_size, 1))
    torch.set_num_threads(max(1, cores - workers))


class StreamLoader(BatchPlan):
    """Batches of a :class:`StreamDataset`, normalised floats on ``device`` (see the module doc and
    ``BatchPlan``, which decides each rank's samples exactly as for in-memory sets)."""

    def __init__(self, data: StreamDataset, batch_size: int, *, device: torch.device, mean, std, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0, drop_last: bool = False,
                 channels_last: bool = False, prefetch: int = 2) -> None:
        super().__init__(len(data), batch_size, device=device, mean=mean, std=std, shuffle=shuffle, seed=seed,
                         rank=rank, world_size=world_size, drop_last=drop_last, channels_last=channels_last)
        self.data = data if shuffle else data.as_eval()
        self.workers = workers
        self.prefetch = prefetch
        self.skipped = 0  # undecodable samples met so far (summed over passes)

    def _batch_keys(self, epoch: int, start_step: int) -> list[list[tuple[int, int]]]:
        steps = range(start_step, len(self))
        if self.shuffle:
            perm = self.permutation(epoch)
            return [[(i, mix_seed(self.seed, epoch, i)) for i in self.step_indices(epoch, s, perm).tolist()]
                    for s in steps]
        return [[(i, 0) for i in self.step_indices(epoch, s).tolist()] for s in steps]

    def _merge_decoded(self, batch: _Batch, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch in its order with the device-decoded JPEGs in their places; (images, labels, failed)."""
        size = self.data.image_size
        decoded = decode_on_device(batch.encoded, size, self.device)
        images = torch.empty(len(batch.labels), 3, size, size, dtype=torch.uint8, device=self.device)
        if pixels.numel():
            images[~batch.is_encoded.to(self.device)] = pixels
        keep = torch.ones(len(batch.labels), dtype=torch.bool)
        where = batch.is_encoded.nonzero().squeeze(1).tolist()
        for position, image in zip(where, decoded):
            if image is None:
                keep[position] = False
            else:
                images[position] = image
        failed = int((~keep).sum())
        if failed:
            return images[keep.to(self.device)], batch.labels[keep], failed
        return images, batch.labels, 0

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) on the device for steps ``start_step..`` of ``epoch``."""
        keys = self._batch_keys(epoch, start_step)
        if not keys:
            return
        loader = torch.utils.data.DataLoader(
            _Batches(self.data), batch_sampler=keys, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=self.prefetch if self.workers else None,
            multiprocessing_context="fork" if self.workers and hasattr(os, "fork") else None)
        skipped = 0
        for batch in loader:
            images, labels = batch.pixels.to(self.device, non_blocking=True), batch.labels
            if batch.encoded:
                images, labels, failed = self._merge_decoded(batch, images)
                skipped += failed
            skipped += batch.skipped
            if labels.numel() == 0:
                continue
            yield self.normalise(images), labels.to(self.device, non_blocking=True)
        self.skipped += skipped
        if skipped:
            log.warning("%s: skipped %d unreadable or corrupt image(s) in this pass (%s)", self.data.source,
                        skipped, f"epoch {epoch}" if self.shuffle else "evaluation")



def folder_dataset(split_dir: str | os.PathLike, image_size: int, classes: Sequence[str] | None = None,
                   min_scale: float = 0.08) -> StreamDataset:
    """A :class:`StreamDataset` of ``split_dir/<class>/<image>``; zero-byte files are left out now."""
    from cnntrain.data.folder import scan_image_folder

    samples, names = scan_image_folder(split_dir, classes)
    kept = [(p, y) for p, y in samples if p.stat().st_size > 0]
    if len(kept) < len(samples):
        log.warning("%s: skipped %d empty (zero-byte) file(s)", split_dir, len(samples) - len(kept))
    labels = torch.tensor([y for _, y in kept], dtype=torch.int64)
    return StreamDataset([str(p) for p, _ in kept], labels, names, image_size, str(split_dir), min_scale=min_scale)


def needs_streaming(split_dir: str | os.PathLike, limit: int = 64, probe: int = 64) -> bool:
    """True when the first ``probe`` images of a folder differ in size or exceed ``limit`` pixels:
    then decoding all of them into one tensor would either fail or waste memory."""
    from cnntrain.data.folder import scan_image_folder

    samples, _ = scan_image_folder(split_dir)
    sizes = set()
    step = max(1, len(samples) // probe)  # spread over the classes, not the first class only
    for path, _ in samples[::step][:probe]:
        try:
            with Image.open(path) as image:  # reads the header only
                sizes.add(image.size)
        except Exception:  # noqa: BLE001, S112 - unreadable files are counted later by whichever pipeline
            continue
    return len(sizes) > 1 or any(max(s) > limit for s in sizes)
