"""The run folder: where it is, what goes in it, and the final exported weights."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save_file

from cnntrain.config import TrainConfig
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.metrics import write_summary
from cnntrain.errors import CheckpointError, ConfigError

RUNS_ROOT = Path("runs")


@dataclass
class Result:
    """What ``cnntrain.train`` returns: the run folder and headline figures (``summary``: summary.json)."""

    run_dir: Path
    best_top1: float
    final_top1: float
    steps: int
    seconds: float
    img_per_s: float
    summary: dict


def run_meta(cfg: TrainConfig, data) -> dict:
    """What exported weights and checkpoints carry so a model can be rebuilt and fed without the
    data set: model name, classes, input shape, normalisation, and the config."""
    split = data.val or data.train  # streamed sets: how evaluation resized (pretrained weights may set it)
    return {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes,
            "input_shape": list(data.shape), "mean": list(data.mean), "std": list(data.std),
            "eval_resize": getattr(split, "eval_resize", 0),
            "interpolation": getattr(split, "interpolation", "bilinear"),
            "config": cfg.to_dict()}


def finish_run(run_dir: Path, model: nn.Module, meta: dict, summary: dict) -> None:
    """The last files of a run: ``model.safetensors`` and ``summary.json``."""
    export_safetensors(model, run_dir / "model.safetensors", meta)
    write_summary(run_dir / "summary.json", summary)


def default_run_dir(cfg: TrainConfig, timestamp: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(timestamp))
    return RUNS_ROOT / f"{cfg.dataset}-{_slug(cfg.model)}-{stamp}"


def _slug(model: str) -> str:
    return model.replace("/", "-")  # timm/<name>: one folder, not two


def resolve_run_dir(cfg: TrainConfig, timestamp: int) -> Path:
    """``--run-dir``, or for ``--resume auto`` the newest matching run, or a new timestamped one."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if cfg.resume == "auto":
        previous = sorted(RUNS_ROOT.glob(f"{cfg.dataset}-{_slug(cfg.model)}-*"))
        if previous:
            return previous[-1]
    return default_run_dir(cfg, timestamp)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile / AveragedModel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)):
            model = model.module
        else:
            return model


def export_safetensors(model: nn.Module, path: Path, meta: dict) -> Path:
    """Write the model's state (parameters and buffers) to ``path`` with ``meta`` as JSON strings."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a ``model.safetensors`` written by ``export_safetensors``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
        return load_file(str(path)), meta
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad headers
        raise CheckpointError(f"cannot read weights {path}: {exc}") from None


class RunLock:
    """The exclusive claim of a run folder: ``fcntl.flock`` on ``<run_dir>/.lock``, which holds the
    claiming process's pid and host. ``release()`` (or leaving a ``with`` block) ends it; the
    operating system ends it when the process dies, so a lock file left by a killed run never
    blocks the next one. The file itself stays (unlinking it would let two runs lock two files)."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self.path = run_dir / ".lock"
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool) -> RunLock:
    """Take ``run_dir`` for this run, before anything is written into it; returns the held lock.

    A second run in the same folder fails at once (ConfigError naming the holder's pid). A fresh run
    (``resuming`` False) refuses a folder that already holds checkpoints (step files with a manifest,
    or ``best.pt``), unless ``overwrite``: then every checkpoint file, ``best.pt`` and
    ``summary.json`` are deleted first. With several ranks only rank 0 claims (the folder is rank
    0's to write); the others never call this, so rank 0 must tell them when its claim fails.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"run folder {run_dir} is in use by another run (pid {holder}, in {path}): wait for it "
                          "to end, or pass another --run-dir") from None
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(run_dir, fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        folder = run_dir / "checkpoints"
        # A step file without a manifest is an unfinished write, not a checkpoint (a run killed while
        # writing its first one must be able to start again); a damaged one with a manifest counts.
        steps = [(s, p) for s, p in ckpt.list_checkpoints(folder) if ckpt.manifest_path(p).is_file()]
        best = (folder / "best.pt").is_file()
        if (steps or best) and not resuming:
            if not overwrite:
                held = f"{len(steps)} step checkpoint(s), the newest {steps[-1][1].name}" if steps else "best.pt"
                raise ConfigError(f"run folder {run_dir} already holds checkpoints of an earlier run ({held}): "
                                  "continue that run with --resume auto, or start over with --overwrite "
                                  "(deletes them)")
            ckpt.remove_checkpoints(folder)
            (run_dir / "summary.json").unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock
