"""ImageNet-style folder trees (``root/<split>/<class>/<image>``): decoded into memory, or listed for streaming.

:func:`load_image_folder` is for small sets (every image is decoded once into one uint8 tensor);
large sets go through the streaming pipeline, for which :func:`folder_dataset` lists the files.
Images over the pixel limit (``images.py``) are refused from their header, unread, like corrupt ones.

    >>> train = load_image_folder("data/hymenoptera_data", "train", size=(64, 64))  # doctest: +SKIP
    >>> val = load_image_folder("data/hymenoptera_data", find_split("data/hymenoptera_data"),
    ...                         size=(64, 64), classes=train.classes)                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnntrain.data.base import ArrayDataset
from cnntrain.data.cache import FolderCache
from cnntrain.data.images import MAX_IMAGE_PIXELS, open_image, to_rgb
from cnntrain.data.stream_dataset import StreamDataset
from cnntrain.errors import DataError, did_you_mean

log = logging.getLogger("cnntrain")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 512  # images per thread-pool task: amortises the scheduling cost of tiny images


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(
    split_dir: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """List ``(path, class index)`` for every image under ``split_dir/<class>/`` (recursively).

    Classes are the sorted subfolder names, or ``classes`` when given (another split's list:
    then a subfolder not in it is an error, and a class without a folder simply has no samples).
    Hidden entries are ignored; files are sorted by path, so the order is the same on every
    machine. Raises :class:`DataError` naming the folder when it is missing or holds no images.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist")
    folders = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = folders
        if not classes:
            raise DataError(f"{split_dir} has no class subfolders (expected {split_dir}/<class>/<image>)")
    else:
        classes = list(classes)
        index = set(classes)
        for name in folders:
            if name not in index:
                raise DataError(f"{split_dir / name} is a class the training set does not have"
                                f"{did_you_mean(name, classes)}; known classes: {', '.join(classes[:20])}")
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f) and not f.startswith("."))
        if not found:
            empty.append(name)
        # Path order (a separator sorts before any character), sorting strings: Path objects cost 3x more.
        found.sort(key=lambda p: p.replace(os.sep, "\0"))
        samples.extend((Path(path), label) for path in found)
    if not samples:
        raise DataError(f"{split_dir} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if empty:
        log.warning("%s: %d class folder(s) hold no images: %s", split_dir, len(empty), ", ".join(empty[:10]))
    return samples, list(classes)


def find_split(root: str | os.PathLike, names: Sequence[str] = ("val", "validation", "test")) -> str | None:
    """The first of ``names`` that is a folder under ``root``, or None."""
    for name in names:
        if (Path(root) / name).is_dir():
            return name
    return None


def _decode_array(path: Path, size: tuple[int, int] | None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode to uint8 [H, W, 3], resized to ``size=(h, w)`` when given."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is an empty (zero-byte) file")
        with open_image(path, str(path), max_pixels) as image:
            if size is not None and image.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
                image.draft("RGB", (size[1], size[0]))
            image.load()  # decode now, so a truncated file fails here and not later
            image = to_rgb(image)
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # OSError covers PIL's UnidentifiedImageError and "image file is truncated".
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e


def decode_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode one image file (any format PIL reads) to uint8 RGB [3, H, W].

    Greyscale, palette, CMYK and alpha images are converted to RGB (alpha is dropped). Raises
    :class:`DataError` naming the file when it is empty, truncated, not an image or larger than
    ``max_pixels`` (width x height; 0: no limit).
    """
    # The transposed copy is writable; torch warns about read-only arrays such as PIL's buffer.
    return torch.from_numpy(np.ascontiguousarray(_decode_array(Path(path), None, max_pixels).transpose(2, 0, 1)))


class _SizeMismatch(Exception):
    pass


def _check_fits_in_memory(nbytes: int, split_dir: Path) -> None:
    """Fail early, with advice, instead of being killed by the OOM killer half-way through."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return
    if nbytes > 0.7 * total:
        raise DataError(f"{split_dir} would take {nbytes / 2**30:.1f} GiB decoded, more than this machine's "
                        f"memory ({total / 2**30:.1f} GiB) allows; use a smaller --image-size or the "
                        "streaming pipeline")


def load_image_folder(
    root: str | os.PathLike,
    split: str,
    *,
    size: tuple[int, int] | None = None,
    classes: Sequence[str] | None = None,
    workers: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    cache_dir: str | os.PathLike | None = None,
    scan: tuple[list[tuple[Path, int]], list[str]] | None = None,
) -> ArrayDataset:
    """Decode every image of ``root/<split>`` into one uint8 tensor [N, 3, H, W].

    All images must have one size, or ``size=(h, w)`` (pixels) resizes each one (bilinear, aspect
    ratio not kept). Unreadable files, and images of more than ``max_pixels`` (0: no limit), are
    skipped with one warning that counts them and names one; no readable image at all is a
    :class:`DataError`. ``classes`` reuses another split's class list.
    ``workers`` threads decode in parallel (PIL releases the GIL while decoding); default: 2 per core.
    ``cache_dir``: keep the decoded tensor there and map it on the next call while the files and
    options are unchanged (``cache.py``); None: no cache. ``scan``: the split's ``scan_image_folder``
    result when the caller has it already (listing 50k files takes seconds).
    """
    split_dir = Path(root) / split
    samples, class_names = scan or scan_image_folder(split_dir, classes)
    cache = None
    if cache_dir is not None:
        options = {"size": list(size) if size else None, "classes": class_names, "max_pixels": max_pixels}
        cache = FolderCache(cache_dir, split_dir, samples, options)
        cached = cache.load()
        if cached is not None:
            if cached.skipped:
                log.warning("skipped %d unreadable image file(s) in %s, e.g. %s", cached.skipped, split_dir,
                            cached.first_skip)
            return ArrayDataset(torch.from_numpy(cached.images), torch.from_numpy(cached.labels), class_names,
                                source=str(split_dir))
    images, labels, failures = _decode_all(split_dir, samples, size, workers, max_pixels)
    if cache is not None:
        cache.save(images, labels, len(failures), failures[0] if failures else "")
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), class_names, source=str(split_dir))


def _decode_all(split_dir: Path, samples: list[tuple[Path, int]], size: tuple[int, int] | None,
                workers: int | None, max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N, 3, H, W] and labels int64 [N] of the readable files, and one message per
    unreadable one."""
    paths = [path for path, _ in samples]
    workers = workers or min(16, 2 * (os.cpu_count() or 1))

    failures: list[str] = []
    target, first_ok = size, 0
    if target is None:  # the first readable image fixes the size all others must have
        while target is None and first_ok < len(paths):
            try:
                target = _decode_array(paths[first_ok], None, max_pixels).shape[:2]
            except DataError as e:
                failures.append(str(e))
                first_ok += 1
        if target is None:
            raise DataError(f"none of the {len(paths)} image files in {split_dir} is readable "
                            f"(e.g. {failures[0]})")
    height, width = target
    _check_fits_in_memory(len(paths) * 3 * height * width, split_dir)
    buffer = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    ok[:first_ok] = False

    def decode_chunk(start: int) -> None:
        for i in range(max(start, first_ok), min(start + _CHUNK, len(paths))):
            try:
                array = _decode_array(paths[i], size, max_pixels)
            except DataError as e:
                ok[i] = False
                failures.append(str(e))
                continue
            if array.shape[:2] != (height, width):
                raise _SizeMismatch(f"{paths[i]} is {array.shape[0]}x{array.shape[1]} (h x w) but "
                                    f"{paths[first_ok]} is {height}x{width}")
            buffer[i] = array.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(decode_chunk, start) for start in range(0, len(paths), _CHUNK)]
        try:
            for future in futures:
                future.result()
        except _SizeMismatch as e:
            for future in futures:
                future.cancel()
            raise DataError(f"images in {split_dir} have different sizes ({e}); pass --image-size "
                            "(size=(h, w)) to resize them on load, or use the streaming pipeline") from None

    if failures:
        log.warning("skipped %d unreadable image file(s) in %s, e.g. %s",
                    len(failures), split_dir, failures[0])
    if not ok.any():
        raise DataError(f"none of the {len(paths)} image files in {split_dir} is readable "
                        f"(e.g. {failures[0]})")
    labels = np.array([label for _, label in samples], dtype=np.int64)
    if not ok.all():
        buffer, labels = buffer[ok], labels[ok]
    return buffer, labels, failures


def folder_dataset(split_dir: str | os.PathLike, image_size: int, classes: Sequence[str] | None = None,
                   min_scale: float = 0.08) -> StreamDataset:
    """A :class:`StreamDataset` of ``split_dir/<class>/<image>``; zero-byte files are left out now."""
    samples, names = scan_image_folder(split_dir, classes)
    kept = [(p, y) for p, y in samples if p.stat().st_size > 0]
    if len(kept) < len(samples):
        log.warning("%s: skipped %d empty (zero-byte) file(s)", split_dir, len(samples) - len(kept))
    labels = torch.tensor([y for _, y in kept], dtype=torch.int64)
    return StreamDataset([str(p) for p, _ in kept], labels, names, image_size, str(split_dir), min_scale=min_scale)


def needs_streaming(split_dir: str | os.PathLike, limit: int = 64, probe: int = 64,
                    scan: tuple[list[tuple[Path, int]], list[str]] | None = None) -> bool:
    """True when the first ``probe`` images of a folder differ in size or exceed ``limit`` pixels:
    then decoding all of them into one tensor would either fail or waste memory. ``scan``: the
    folder's ``scan_image_folder`` result when the caller has it already."""
    samples, _ = scan or scan_image_folder(split_dir)
    sizes = set()
    step = max(1, len(samples) // probe)  # spread over the classes, not the first class only
    for path, _ in samples[::step][:probe]:
        try:
            with Image.open(path) as image:  # reads the header only
                sizes.add(image.size)
        except Exception:  # noqa: BLE001, S112 - unreadable files are counted later by whichever pipeline
            continue
    return len(sizes) > 1 or any(max(s) > limit for s in sizes)
