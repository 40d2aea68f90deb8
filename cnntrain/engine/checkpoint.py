"""Checkpoints: atomic writes, a checksum manifest written last, keep-last-N and best, safe loads.

A checkpoint ``step-00001234.pt`` is valid only when its manifest ``step-00001234.json`` exists and
the file's size and SHA-256 match it. The manifest is written after the checkpoint is in place, so
a crash at any moment leaves either a complete pair or an ignorable leftover. Files hold tensors
and plain Python data only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import CheckpointError

log = logging.getLogger("cnntrain")
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(file)`` to a temp file beside ``path``, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, *, keep_last: int = 3,
                    best: bool = False) -> Path:
    """Write ``state`` as ``folder/step-<step>.pt`` plus its manifest; prune old ones; copy to best."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
        meta = {"file": path.name, "step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        _atomic_write(manifest_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        if best:
            _copy_pair(path, folder / "best.pt")
    except OSError as exc:
        previous = latest_valid(folder, quiet=True)
        kept = f"; the newest valid checkpoint {previous} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}{kept}") from None
    prune(folder, keep_last)
    return path


def _copy_pair(src: Path, dst: Path) -> None:
    _atomic_write(dst, lambda f: f.write(src.read_bytes()))
    meta = json.loads(manifest_path(src).read_text())
    meta["file"] = dst.name
    _atomic_write(manifest_path(dst), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint file in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints, and drop temp files a killed writer left."""
    for _, path in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        path.unlink(missing_ok=True)
        manifest_path(path).unlink(missing_ok=True)
    mine = f".tmp{os.getpid()}"
    for leftover in folder.glob(".*.tmp*"):
        if not leftover.name.endswith(mine):
            leftover.unlink(missing_ok=True)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless ``path`` matches its manifest (size and SHA-256)."""
    man = manifest_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not man.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest {man.name}: incomplete write")
    try:
        meta = json.loads(man.read_text())
        expected_size, expected_sha = int(meta["bytes"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"manifest {man} is corrupt") from None
    size = path.stat().st_size
    if size != expected_size:
        raise CheckpointError(f"checkpoint {path} is {size} bytes, its manifest says {expected_size}: truncated")
    if sha256_file(path) != expected_sha:
        raise CheckpointError(f"checkpoint {path} does not match its SHA-256 in {man.name}: corrupt")


def load_checkpoint(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, tensors and plain data only."""
    path = Path(path)
    if verify and manifest_path(path).exists():
        verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def latest_valid(folder: Path, *, quiet: bool = False) -> Path | None:
    """The newest step checkpoint in ``folder`` that verifies; warns about each bad one skipped."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            if not quiet:
                log.warning("skipping %s", exc)
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Turn ``--resume`` (auto, a run folder or a file) into a checkpoint path, or None to start fresh."""
    if not resume:
        return None
    if resume == "auto":
        return latest_valid(run_dir / "checkpoints")
    target = Path(resume)
    if target.is_dir():
        folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found = latest_valid(folder)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {folder}")
        return found
    if not target.is_file():
        raise CheckpointError(f"checkpoint {target} does not exist")
    return target
