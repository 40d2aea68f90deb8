"""The streaming pipeline for sets too large (or too varied in size) to decode into memory.

DataLoader workers read and decode each image of a :class:`StreamDataset` (``stream_dataset.py``:
from a file, a TFRecord shard or a tar shard), crop and flip it on the host as uint8 (``crops.py``
draws the boxes); normalisation happens on the training device. With ``decode="device"`` the workers
pass JPEGs on undecoded, with their boxes, and the main process decodes, crops and flips each batch
on the training device. The interface is the one :class:`cnntrain.data.pipeline.DeviceLoader` has,
so the engine does not know which it got:

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

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from cnntrain.data.augment import apply_seeded
from cnntrain.data.folder import folder_dataset, needs_streaming
from cnntrain.data.pipeline import BatchPlan, mix_seed
from cnntrain.data.stream_dataset import IMAGENET_STATS, Encoded, StreamDataset
from cnntrain.hardware import usable_cores

log = logging.getLogger("cnntrain")

# Imported from here by older code (and bench.py): the set types now live in stream_dataset.py,
# the folder lister in folder.py.
__all__ = ["IMAGENET_STATS", "Encoded", "StreamDataset", "StreamLoader", "balance_threads", "decode_on_device",
           "default_workers", "folder_dataset", "needs_streaming", "usable_cores"]


def decode_on_device(encoded: Sequence[Encoded], size: int, device: torch.device,
                     policy: Callable | None = None) -> list[torch.Tensor | None]:
    """Decode JPEGs on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU) in one batched call, then
    crop, resize (antialiased bilinear, as PIL's) and mirror each there, then apply ``policy``
    (``--auto-augment``) with each one's seed: uint8 [3, S, S] each, or None for one that does not
    decode. The pixel limit was checked from each JPEG's header (PIL reads it without decoding) when
    :meth:`StreamDataset.load` made the :class:`Encoded`."""
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
        crop = crop.flip(-1) if e.flip else crop
        out.append(apply_seeded(policy, crop[None], [e.seed])[0] if policy is not None else crop)
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
            if getattr(self, "order", None) is None:
                return [[(i, mix_seed(self.seed, epoch, i)) for i in self.step_indices(epoch, s, perm).tolist()]
                        for s in steps]
            # An order may hold an image several times (--repeated-aug, a balanced draw): each copy its own crop.
            return [[(i, mix_seed(self.seed, epoch, i, s, self.rank, k))
                     for k, i in enumerate(self.step_indices(epoch, s, perm).tolist())] for s in steps]
        return [[(i, 0) for i in self.step_indices(epoch, s).tolist()] for s in steps]

    def _merge_decoded(self, batch: _Batch, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch in its order with the device-decoded JPEGs in their places; (images, labels, failed)."""
        size = self.data.image_size
        decoded = decode_on_device(batch.encoded, size, self.device, self.data.policy if self.shuffle else None)
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
