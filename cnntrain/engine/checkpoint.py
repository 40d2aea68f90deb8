"""Checkpoints: atomic writes, a checksum manifest written last, keep-last-N and best, safe loads.

A checkpoint ``step-00001234.pt`` is valid only when its manifest ``step-00001234.json`` exists and
the file's size and SHA-256 match it. The manifest is written after the checkpoint is in place, so
a crash at any moment leaves either a complete pair or an ignorable leftover. Files hold tensors
and plain Python data only and are read with ``torch.load(weights_only=True)``.

Each manifest names the run that wrote it (``run_id``; a resumed run keeps the id of the checkpoint
it resumed from). Pruning deletes only verified checkpoints of its own run, so a leftover, another
run's checkpoint or another writer's temp file in the same folder is never counted or removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnntrain.digest import file_digest
from cnntrain.errors import CheckpointError

log = logging.getLogger("cnntrain")
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# ``.<name>.tmp-<pid>-<run id or _>-<random>``: a writer only ever cleans up its own run's leftovers.
_TMP = re.compile(r"^\..+\.tmp-(\d+)-(\w+)-[0-9a-f]{8}$")
# Everything a checkpoint writer puts in its folder (temp files also in the pre-run-id form ``.<name>.tmp<pid>``).
_OWNED = re.compile(r"^(step-\d{8,}|best)\.(pt|json)$|^\..+\.tmp(\d+$|-)")


def new_run_id() -> str:
    """A fresh run id (12 hex digits) for a run that starts from scratch."""
    return secrets.token_hex(6)


def run_id_of(path: Path) -> str | None:
    """The run id in the manifest of checkpoint ``path``; None when it has no readable manifest or
    was written before run ids existed. A resumed run adopts this id (or a new one if None)."""
    meta = _read_manifest(Path(path))
    return str(meta["run_id"]) if meta is not None and meta.get("run_id") else None


def temp_path(path: Path, run_id: str | None = None) -> Path:
    """Where a writer puts ``path``'s bytes before renaming them into place. The name carries the
    pid, the run id and a random part: two writers in one folder never share (or delete) one."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{run_id or '_'}-{secrets.token_hex(4)}")


def _atomic_write(path: Path, write, run_id: str | None = None) -> None:
    """Write via ``write(file)`` to ``temp_path(path)``, fsync, then rename over ``path``."""
    tmp = temp_path(path, run_id)
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


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, *, keep_last: int = 3, best: bool = False,
                    run_id: str | None = None, protect: Callable[[int], bool] | None = None) -> Path:
    """Write ``state`` as ``folder/step-<step>.pt`` plus its manifest (naming ``run_id``), copy it to
    ``best.pt`` when ``best``, then ``prune(folder, keep_last, run_id, protect)``.

    The checkpoint just written always stays. ``run_id`` None writes a manifest without one and
    prunes only such checkpoints (as before run ids existed; callers should pass one).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    try:
        _atomic_write(path, lambda f: torch.save(state, f), run_id)
        meta = {"file": path.name, "step": step, "bytes": path.stat().st_size, "sha256": file_digest(path, "sha256"),
                "run_id": run_id}
        _atomic_write(manifest_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()), run_id)
        if best:
            _copy_pair(path, folder / "best.pt", run_id)
    except OSError as exc:
        previous = latest_valid(folder, quiet=True)
        kept = f"; the newest valid checkpoint {previous} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}{kept}") from None
    _prune(folder, keep_last, run_id, protect, written=path)
    return path


def _copy_pair(src: Path, dst: Path, run_id: str | None) -> None:
    _atomic_write(dst, lambda f: f.write(src.read_bytes()), run_id)
    meta = json.loads(manifest_path(src).read_text())
    meta["file"] = dst.name
    _atomic_write(manifest_path(dst), lambda f: f.write(json.dumps(meta, indent=1).encode()), run_id)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint file in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune(folder: Path, keep_last: int, run_id: str | None,
          protect: Callable[[int], bool] | None = None) -> list[Path]:
    """Delete run ``run_id``'s older checkpoints: keep its newest ``keep_last`` that verify, and every
    step for which ``protect(step)`` is true; returns the paths deleted. ``keep_last`` <= 0 keeps all.

    Only checkpoints whose manifest names ``run_id`` count, so files of another run, leftovers
    without a manifest and unreadable files are never deleted nor counted among the kept. ``best.pt``
    is a separate copy and always stays. Temp files that an earlier (killed) process of the same run
    left are removed; other runs' temp files are never touched.

    The async chief keeps what its evaluator has not scored yet:
    ``protect=lambda step: scored_step is not None and step > scored_step``.
    """
    return _prune(folder, keep_last, run_id, protect)


def _prune(folder: Path, keep_last: int, run_id: str | None, protect: Callable[[int], bool] | None,
           written: Path | None = None) -> list[Path]:
    deleted: list[Path] = []
    # A run resumed from an older checkpoint of its own may find its earlier future above ``written``:
    # left alone (not deleted, not counted) until the run writes those steps again.
    ceiling = int(_NAME.match(written.name).group(1)) if written is not None else None
    if keep_last > 0:
        kept = 0
        for step, path in reversed(list_checkpoints(folder)):
            meta = _read_manifest(path)
            if meta is None or (meta.get("run_id") or None) != run_id or (ceiling is not None and step > ceiling):
                continue
            if kept < keep_last:
                try:
                    if path != written:  # just hashed while writing it
                        verify_checkpoint(path)
                    kept += 1
                    continue
                except CheckpointError:
                    pass  # this run's, but damaged: useless, so it goes and does not count as kept
                except OSError:
                    continue  # unreadable right now: leave it alone
            if protect is not None and protect(step):
                continue
            path.unlink(missing_ok=True)
            manifest_path(path).unlink(missing_ok=True)
            deleted.append(path)
    if run_id is not None and folder.is_dir():
        for leftover in folder.iterdir():
            m = _TMP.match(leftover.name)
            if m and m.group(2) == run_id and int(m.group(1)) != os.getpid():
                leftover.unlink(missing_ok=True)
    return deleted


def _read_manifest(path: Path) -> dict | None:
    try:
        meta = json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def remove_checkpoints(folder: Path) -> list[Path]:
    """Delete every checkpoint, manifest, ``best.pt`` and temp file in ``folder`` (``--overwrite``)."""
    if not folder.is_dir():
        return []
    removed = [p for p in sorted(folder.iterdir()) if p.is_file() and _OWNED.match(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    _fsync_dir(folder)
    return removed


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
    if file_digest(path, "sha256") != expected_sha:
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
    return _newest_valid(folder, quiet)[0]


def _newest_valid(folder: Path, quiet: bool) -> tuple[Path | None, list[str]]:
    """The newest valid step checkpoint, and why each newer one was skipped."""
    problems = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint(path)
            return path, problems
        except CheckpointError as exc:
            problems.append(str(exc))
            if not quiet:
                log.warning("skipping %s", exc)
    return None, problems


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Turn ``--resume`` (auto, a run folder or a file) into a checkpoint path, or None to start fresh.

    ``auto`` starts fresh only when ``run_dir/checkpoints`` holds no step checkpoint at all; when it
    holds some but none verifies, that is a CheckpointError naming each file and what is wrong with it
    (starting over would truncate the run's metrics.csv and later prune its files).
    """
    if not resume:
        return None
    if resume == "auto":
        folder = run_dir / "checkpoints"
        found, problems = _newest_valid(folder, quiet=False)
        if found is None and problems:
            raise CheckpointError(f"--resume auto: none of the {len(problems)} checkpoint(s) in {folder} is valid: "
                                  f"{'; '.join(problems)}. Move them away to start over, or start over with "
                                  "--overwrite instead of --resume")
        return found
    target = Path(resume)
    if target.is_dir():
        folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found, problems = _newest_valid(folder, quiet=False)
        if found is None:
            why = f": {'; '.join(problems)}" if problems else ""
            raise CheckpointError(f"no valid checkpoint in {folder}{why}")
        return found
    if not target.is_file():
        raise CheckpointError(f"checkpoint {target} does not exist")
    return target
