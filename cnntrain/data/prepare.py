"""``cnntrain data prepare``: an image folder tree -> TFRecord (or tar) shards; ``data verify`` checks them.

    cnntrain data prepare photos/ shards/ --shards 8 --resize 256          # train-*, validation-*
    cnntrain data prepare photos/ shards/ --shards 8 --format tar
    cnntrain data verify shards/                                           # counts records, checks CRCs

The output is a pure function of the input files and the options: samples are shuffled with a
fixed seed (so each shard mixes classes), images re-encoded with fixed settings, tar members
carry fixed metadata. ``index.json`` lists the classes and, per shard, its size, record offsets
and 0-based labels, so readers need not scan the shards. Unreadable images, and images over the
pixel limit (``images.py``), are skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cnntrain.data.folder import find_split, scan_image_folder
from cnntrain.data.images import MAX_IMAGE_PIXELS, open_image, to_rgb
from cnntrain.data.tfrecord import TFRecordWriter, encode_example, iter_records, shard_paths
from cnntrain.errors import ConfigError, DataError

log = logging.getLogger("cnntrain")

SHUFFLE_SEED = 20151  # fixed: the same folder always gives the same shards
JPEG_QUALITY = 90


@dataclass
class PrepareResult:
    dest: Path
    counts: dict[str, int]  # split prefix -> records written
    skipped: int  # unreadable source images
    shards: list[Path]


def _encode(path: Path, resize: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, int, int]:
    """JPEG bytes (h, w) of one image: the original file when it is already an RGB JPEG that needs
    no resizing, else decoded, converted to RGB, shorter side shrunk to ``resize`` and re-encoded."""
    data = path.read_bytes()
    with open_image(io.BytesIO(data), str(path), max_pixels) as image:
        if resize and min(image.size) > resize and image.format == "JPEG":
            image.draft("RGB", (resize, resize))  # decode at reduced scale when much larger
        image.load()
        if image.format == "JPEG" and image.mode == "RGB" and not (resize and min(image.size) > resize):
            return data, image.height, image.width
        rgb = to_rgb(image)
    if resize and min(rgb.size) > resize:  # shrink only: enlarging adds bytes, not information
        scale = resize / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), rgb.height, rgb.width


def _shard_name(prefix: str, k: int, n: int, fmt: str) -> str:
    return f"{prefix}-{k:05d}-of-{n:05d}" + (".tar" if fmt == "tar" else "")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0  # fixed: deterministic
    tar.addfile(info, io.BytesIO(data))


def prepare(src: str | os.PathLike, dest: str | os.PathLike, *, shards: int = 8, resize: int = 0,
            fmt: str = "tfrecord", workers: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> PrepareResult:
    """Convert ``src/train`` (and ``src/val|validation|test`` when present) into ``shards`` shards
    per split in ``dest``: ``train-NNNNN-of-MMMMM`` and ``validation-NNNNN-of-MMMMM``.

    ``resize`` (pixels, 0: keep) shrinks each image's shorter side; ``fmt`` is ``tfrecord``
    (``image/encoded``, 1-based ``image/class/label``, ...) or ``tar`` (``NNNNNNNN.jpg`` +
    ``NNNNNNNN.cls`` members). Images of more than ``max_pixels`` (0: no limit) are skipped like
    unreadable ones. Returns the counts; raises :class:`DataError` for a bad source.
    """
    if fmt not in ("tfrecord", "tar"):
        raise ConfigError(f"--format {fmt!r} is not one of tfrecord, tar")
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    splits = [("train", "train")]
    val = find_split(src)
    if val:
        splits.append((val, "validation"))
    train_samples, classes = scan_image_folder(src / "train")
    index: dict = {"classes": classes, "format": fmt, "resize": resize, "shards": {}, "counts": {}}
    written: list[Path] = []
    skipped = 0
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    for folder, prefix in splits:
        samples = train_samples if folder == "train" else scan_image_folder(src / folder, classes)[0]
        order = list(range(len(samples)))
        random.Random(SHUFFLE_SEED).shuffle(order)
        samples = [samples[i] for i in order]
        n_shards = min(shards, len(samples))

        def encode(sample, root=src):
            path, label = sample
            try:
                return _encode(path, resize, max_pixels), label, path.relative_to(root).as_posix()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, DataError) as exc:
                return exc, label, str(path)

        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while coding
            results = pool.map(encode, samples)
            count = 0
            for k in range(n_shards):
                lo, hi = k * len(samples) // n_shards, (k + 1) * len(samples) // n_shards
                path = dest / _shard_name(prefix, k, n_shards, fmt)
                offsets, labels = _write_shard(path, fmt, [next(results) for _ in range(lo, hi)], classes)
                skipped += (hi - lo) - len(labels)
                count += len(labels)
                index["shards"][path.name] = {"bytes": path.stat().st_size, "offsets": offsets, "labels": labels}
                written.append(path)
        index["counts"][prefix] = count
        log.info("%s: %d images -> %d %s shard(s) in %s", src / folder, count, n_shards, fmt, dest)
    index["skipped"] = skipped
    tmp = dest / ".index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(dest / "index.json")
    if skipped:
        log.warning("skipped %d unreadable image file(s) in %s", skipped, src)
    return PrepareResult(dest, dict(index["counts"]), skipped, written)


def _write_shard(path: Path, fmt: str, results: list, classes: list[str]) -> tuple[list[int], list[int]]:
    """Write one shard; returns (record offsets, 0-based labels) of the images written."""
    offsets, labels = [], []
    if fmt == "tar":
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for n, (encoded, label, name) in enumerate(results):
                if isinstance(encoded, Exception):
                    log.debug("skipping %s: %s", name, encoded)
                    continue
                _tar_add(tar, f"{n:08d}.jpg", encoded[0])
                _tar_add(tar, f"{n:08d}.cls", str(label).encode())
                offsets.append(n)
                labels.append(label)
        tmp.replace(path)
        return offsets, labels
    with TFRecordWriter(path) as writer:
        for encoded, label, name in results:
            if isinstance(encoded, Exception):
                log.debug("skipping %s: %s", name, encoded)
                continue
            jpeg, height, width = encoded
            offsets.append(writer.write(encode_example({
                "image/encoded": [jpeg], "image/format": [b"JPEG"], "image/filename": [name.encode()],
                "image/class/label": [label + 1],  # 1-based: 0 is "background" in TF's ImageNet scripts
                "image/class/text": [classes[label].encode()], "image/height": [height], "image/width": [width],
            })))
            labels.append(label)
    return offsets, labels


@dataclass
class ShardStatus:
    path: Path
    records: int
    error: str = ""  # empty when every record's CRCs match


def verify(folder: str | os.PathLike) -> list[ShardStatus]:
    """Read every record of every shard in ``folder``, checking both CRCs (TFRecord) or the tar
    structure; also compares counts with ``index.json``. Raises DataError when there are no shards."""
    folder = Path(folder)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    paths = shard_paths(folder, "train") + shard_paths(folder, "validation")
    if not paths:
        raise DataError(f"{folder} holds no train-* or validation-* shards")
    out = []
    for path in paths:
        count, error = 0, ""
        try:
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    count = sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
            else:
                for _ in iter_records(path):
                    count += 1
        except (DataError, tarfile.TarError, OSError) as exc:
            error = str(exc)
        expected = index.get("shards", {}).get(path.name, {}).get("labels")
        if not error and expected is not None and len(expected) != count:
            error = f"{path}: {count} records but index.json lists {len(expected)}"
        out.append(ShardStatus(path, count, error))
    return out
