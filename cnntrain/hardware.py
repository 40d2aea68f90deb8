"""Facts about this machine that every layer needs: usable cores, the training device, peak memory."""

from __future__ import annotations

import os
import resource

import torch

from cnntrain.errors import ConfigError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``--device`` (auto | cpu | cuda) as a torch device; auto takes CUDA when there is one. On a
    node with several GPUs local rank ``r`` takes GPU ``r`` (modulo their number)."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise ConfigError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated on ``device``; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
