"""The run folder: where it is, what goes in it, and the final exported weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save_file

from cnntrain.config import TrainConfig
from cnntrain.errors import CheckpointError

RUNS_ROOT = Path("runs")


def default_run_dir(cfg: TrainConfig, timestamp: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(timestamp))
    return RUNS_ROOT / f"{cfg.dataset}-{cfg.model}-{stamp}"


def resolve_run_dir(cfg: TrainConfig, timestamp: int) -> Path:
    """``--run-dir``, or for ``--resume auto`` the newest matching run, or a new timestamped one."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if cfg.resume == "auto":
        previous = sorted(RUNS_ROOT.glob(f"{cfg.dataset}-{cfg.model}-*"))
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
