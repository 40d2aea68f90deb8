"""Hex digests of files, read in 1 MiB blocks (downloads, checkpoints, cached weights, calibration)."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike, algo: str = "md5") -> str:
    """Hex digest of the file at ``path``; ``algo`` is any :mod:`hashlib` name (md5, sha256, ...)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
