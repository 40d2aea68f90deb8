"""Training straight from tar shards in the WebDataset layout: ``<key>.jpg`` (or ``.jpeg``/``.png``)
with ``<key>.cls`` holding the 0-based class index, as ``cnntrain data prepare --format tar`` writes.

Shards are read in place, never extracted: the member headers are scanned once for each image's
byte offset and size, and workers read those bytes directly. Only plain (uncompressed) tar is
accepted, since a compressed member cannot be read at an offset. Any member that is not a regular
file (link, device, folder) is refused, as are an image without its label and a label that is not
an integer, is negative or is not one of the classes, each naming the shard and the member.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import torch

from cnntrain.data.stream_dataset import Box, StreamDataset, class_names
from cnntrain.data.tfrecord import shard_paths
from cnntrain.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def scan_shard(path: str | os.PathLike, num_classes: int | None = None) -> list[tuple[int, int, int]]:
    """(byte offset, size, label) of each image in the tar shard ``path``, in key order. Labels
    must be in [0, ``num_classes``) (when given; else only >= 0)."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = os.path.splitext(member.name)
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name!r} is not a regular file (links and folders are "
                                    f"refused)")
                if ext.lower() in IMAGE_EXTENSIONS:
                    images[key] = (member.offset_data, member.size)
                elif ext == ".cls":
                    text = tar.extractfile(member).read(64).strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise DataError(f"{path}: {member.name} holds {text[:20]!r}, not a class index") from None
                    if label < 0 or (num_classes is not None and label >= num_classes):
                        allowed = f"[0, {num_classes})" if num_classes is not None else "0 or more"
                        raise DataError(f"{path}: {member.name} holds class index {label}, outside {allowed}")
                    labels[key] = label
    except (tarfile.TarError, EOFError) as exc:
        if "end of data" in str(exc) or isinstance(exc, EOFError):
            raise DataError(f"{path}: truncated tar shard ({exc})") from None
        raise DataError(f"{path}: not a readable uncompressed tar shard ({exc})") from None
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"{path}: image {missing[0]!r} has no {missing[0]}.cls label ({len(missing)} without one)")
    size = os.path.getsize(path)
    for key, (offset, length) in images.items():
        if offset + length > size:
            raise DataError(f"{path}: truncated: image {key!r} ends at byte {offset + length} of {size}")
    return [(*images[key], labels[key]) for key in sorted(images)]


def read_member(data: StreamDataset, item: tuple[str, int, int]) -> tuple[bytes, list[Box]]:
    """The reader of tar samples: ``item`` is (shard, byte offset of the member's data, its size)."""
    shard, offset, size = item
    handle = data.handle(shard)
    handle.seek(offset)
    encoded = handle.read(size)
    if len(encoded) != size:
        raise DataError(f"{shard}: truncated: member at byte {offset} has {len(encoded)} of {size} bytes")
    return encoded, []


def tar_dataset(root: str | os.PathLike, prefix: str, image_size: int, classes: list[str] | None = None,
                min_scale: float = 0.08) -> StreamDataset:
    """A :class:`~cnntrain.data.stream_dataset.StreamDataset` over the shards ``root/<prefix>-*.tar``.
    Class names come from ``root/index.json`` (written by ``data prepare``), else ``classes``, else
    "0".."K-1"."""
    shards = [p for p in shard_paths(root, prefix) if p.suffix == ".tar"]
    if not shards:
        raise DataError(f"no tar shards {Path(root) / prefix}-*.tar (make them with `cnntrain data prepare "
                        f"--format tar`)")
    index_path = Path(root) / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    known = index.get("classes") or classes
    items, labels = [], []
    for shard in shards:
        for offset, size, label in scan_shard(shard, len(known) if known else None):
            items.append((str(shard), offset, size))
            labels.append(label)
    if not items:
        raise DataError(f"tar shards {Path(root) / prefix}-*.tar hold no images")
    source = f"{Path(root) / prefix}-*.tar"
    return StreamDataset(items, torch.tensor(labels, dtype=torch.int64), class_names(labels, known, source),
                         image_size, source, min_scale=min_scale, reader=read_member)
