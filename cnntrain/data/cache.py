"""Decoded in-memory image folders kept on disk: the next run maps the file instead of decoding again.

Decoding 50,000 small JPEGs into one uint8 tensor takes about 14 s on two cores; mapping the cached
copy takes well under one. The cache is a folder (``--cache-dir``; default ``$CNNTRAIN_CACHE``,
else ``~/.cache/cnntrain``) holding ``decoded/<name>.bin``, one file per image folder and decoding
options (resize, class list, pixel limit), so a folder that changes replaces its own file instead
of adding one. Deleting the folder clears the cache; ``--no-cache`` neither reads nor writes it.

A cache file is used only when everything it was made from is unchanged: the list of files with
each one's size, modification and change times (ns) and label, the decoding options, this format
and the Pillow version. Anything else (a file touched, added or removed, other options) decodes
again and replaces the file. Nothing in it is trusted before it is checked: its header, the
SHA-256 of its metadata, the file's exact size and the CRC-32 of the pixels and labels; a damaged
file is decoded again with a warning. Files are written to a temporary name, synced and renamed
(``os.replace``), so a crash never leaves a half-written cache where a later run reads it.

Layout: ``MAGIC``, metadata length (8 bytes, little endian), SHA-256 of the metadata, the metadata
(JSON), zero padding to a 4 KiB boundary, the images (uint8 [N, 3, H, W]), the labels (int64 [N]).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

log = logging.getLogger("cnntrain")

CACHE_ENV = "CNNTRAIN_CACHE"
FORMAT = 1  # bump when the layout or the decoding changes: older files are then decoded again
MAGIC = b"CNNTRAIN DECODED\n"
_PREFIX = len(MAGIC) + 8 + 32  # magic, metadata length, metadata SHA-256
_MAX_METADATA = 1 << 20  # bytes; a larger length is a damaged header, not a reason to allocate
_ALIGN = 4096  # pixels start on a page, so they can be mapped
_CRC_CHUNK = 1 << 24  # bytes per CRC-32 update
_STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died


def cache_root(cache_dir: str | os.PathLike = "") -> Path:
    """The cache folder: ``cache_dir``, else ``$CNNTRAIN_CACHE``, else ``~/.cache/cnntrain``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnntrain").expanduser()


@dataclass
class Decoded:
    """A decoded folder as the cache holds it (images memory-mapped, copy on write)."""

    images: np.ndarray  # uint8 [N, 3, H, W]
    labels: np.ndarray  # int64 [N]
    skipped: int  # unreadable files left out when it was decoded
    first_skip: str  # the message of one of them, to repeat in the warning


class DamagedCache(Exception):
    """A cache file that cannot be trusted; the message says why."""


class FolderCache:
    """The cache file of one image folder decoded with given options.

    ``files`` are ``(path, label)`` in the order their images are stacked; ``options`` are whatever
    else changes the decoded result (JSON-serialisable)."""

    def __init__(self, root: str | os.PathLike, folder: str | os.PathLike, files: Sequence[tuple[Path, int]],
                 options: dict) -> None:
        self.folder = Path(folder).resolve()
        where = json.dumps({"folder": str(self.folder), "options": options}, sort_keys=True)
        self.path = Path(root) / "decoded" / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.bin"
        self.key = _content_key(Path(folder), files, options)

    def load(self) -> Decoded | None:
        """The cached decoding when it matches the folder as it is now, else None (out of date,
        missing, or damaged: then with a warning)."""
        try:
            meta, images_at, labels_at = self._read_header()
        except FileNotFoundError:
            return None
        except DamagedCache as exc:
            log.warning("decoded-image cache %s is damaged (%s): decoding %s again", self.path, exc, self.folder)
            return None
        except OSError as exc:
            log.warning("cannot read the decoded-image cache %s (%s): decoding %s again", self.path, exc, self.folder)
            return None
        if meta["key"] != self.key:
            log.info("%s changed since it was cached: decoding it again", self.folder)
            return None
        shape = tuple(meta["shape"])
        try:
            images = np.memmap(self.path, dtype=np.uint8, mode="c", offset=images_at, shape=shape)
            labels = np.fromfile(self.path, dtype="<i8", count=shape[0], offset=labels_at).astype(np.int64)
            crc = _crc32(labels, _crc32(images))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the decoded-image cache %s (%s): decoding %s again", self.path, exc, self.folder)
            return None
        if crc != meta["crc32"]:
            log.warning("decoded-image cache %s is damaged (its pixels do not match their CRC-32): decoding %s "
                        "again", self.path, self.folder)
            return None
        log.info("%s: %d decoded images from the cache %s", self.folder, shape[0], self.path)
        return Decoded(images, labels, int(meta["skipped"]), str(meta["first_skip"]))

    def _read_header(self) -> tuple[dict, int, int]:
        """The metadata and where the images and labels start, all checked against the file."""
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX)
            if len(prefix) < _PREFIX or not prefix.startswith(MAGIC):
                raise DamagedCache("not a cnntrain cache file, or cut short in its header")
            (length,) = struct.unpack("<Q", prefix[len(MAGIC):len(MAGIC) + 8])
            if length > _MAX_METADATA:
                raise DamagedCache(f"metadata length {length} in the header")
            text = f.read(length)
            if len(text) != length or hashlib.sha256(text).digest() != prefix[len(MAGIC) + 8:]:
                raise DamagedCache("its metadata does not match their SHA-256")
            size = os.fstat(f.fileno()).st_size
        try:
            meta = json.loads(text)
            shape = [int(v) for v in meta["shape"]]
            meta["crc32"], meta["skipped"] = int(meta["crc32"]), int(meta["skipped"])
            if meta["format"] != FORMAT or len(shape) != 4 or min(shape) < 0 or shape[1] != 3:
                raise ValueError(shape)
        except (ValueError, KeyError, TypeError):
            raise DamagedCache("its metadata are not what this version writes") from None
        images_at, labels_at, end = _layout(_PREFIX + length, shape)
        if size != end:
            raise DamagedCache(f"{size} bytes where its metadata say {end}")
        return meta, images_at, labels_at

    def save(self, images: np.ndarray, labels: np.ndarray, skipped: int = 0, first_skip: str = "") -> None:
        """Write the cache file atomically. A cache that cannot be written (read-only or full disk)
        is a warning, not a failure: the run goes on with what it decoded."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.ascontiguousarray(labels, dtype="<i8")
        meta = {"format": FORMAT, "key": self.key, "folder": str(self.folder), "shape": list(images.shape),
                "crc32": _crc32(labels, _crc32(images)), "skipped": skipped, "first_skip": first_skip,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        text = json.dumps(meta).encode()
        images_at, labels_at, _ = _layout(_PREFIX + len(text), list(images.shape))
        temp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(self.path)
            fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.stem}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(text)) + hashlib.sha256(text).digest() + text)
                f.write(b"\0" * (images_at - _PREFIX - len(text)))
                f.write(memoryview(images.reshape(-1)))
                f.write(b"\0" * (labels_at - images_at - images.nbytes))
                f.write(memoryview(labels))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
            temp = None
        except OSError as exc:
            log.warning("cannot write the decoded-image cache %s (%s); go on without it (--no-cache stops trying)",
                        self.path, exc)
        finally:
            if temp is not None:
                Path(temp).unlink(missing_ok=True)


def _content_key(folder: Path, files: Sequence[tuple[Path, int]], options: dict) -> str:
    """SHA-256 of everything a decoding depends on: files (name, label, size, times), options, versions."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "pillow": PIL.__version__, "options": options},
                                       sort_keys=True).encode())
    prefix = os.path.join(os.fspath(folder), "")
    for path, label in files:
        st = os.stat(path)
        text = os.fspath(path)
        # The files were listed under ``folder``: cutting its prefix is relpath without its cost (50k files).
        name = text[len(prefix):] if text.startswith(prefix) else os.path.relpath(text, folder)
        digest.update(f"{name}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def _layout(header_bytes: int, shape: list[int]) -> tuple[int, int, int]:
    """Byte offsets of the images and labels, and the file's size."""
    images_at = -(-header_bytes // _ALIGN) * _ALIGN
    n = shape[0]
    labels_at = -(-(images_at + int(np.prod(shape, dtype=np.int64))) // 8) * 8
    return images_at, labels_at, labels_at + 8 * n


def _crc32(array: np.ndarray, crc: int = 0) -> int:
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start:start + _CRC_CHUNK], crc)
    return crc


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of writers that died (a live writer's file is younger than an hour)."""
    now = time.time()
    for temp in path.parent.glob(f"{path.stem}.*.tmp"):
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                temp.unlink()
        except OSError:
            continue
