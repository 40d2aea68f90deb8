"""Gradient exchange pieces used by ``DataParallel``: DDP communication hooks for compressed
all-reduce, and the after-backward coalesced all-reduce of ``--no-overlap``.

    cnntrain train ... --grad-compression fp16      # DDP buckets cast to fp16 on the wire
    cnntrain train ... --grad-compression powersgd  # low-rank (rank 1) after 10 plain steps
    cnntrain train ... --no-overlap                 # one flat all-reduce after backward
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

log = logging.getLogger("cnntrain")

# PowerSGD needs a few exact all-reduce steps first (its error feedback and warm start start from
# them); the torch default of 1000 would mean short runs never compress at all.
POWERSGD_START_ITER = 10
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def bucket_mb_for(model: nn.Module, compression: str, backend: str, bucket_mb: float) -> float:
    """The DDP bucket size to use: PowerSGD on gloo crashes with more than one bucket (torch
    2.14), so it gets one bucket large enough for every gradient; others keep ``bucket_mb``."""
    if compression != "powersgd" or backend != "gloo":
        return bucket_mb
    total_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    needed = total_mb + 1.0
    if needed > bucket_mb:
        log.info("--grad-compression powersgd on gloo works with one gradient bucket only: "
                 "--bucket-mb raised from %g to %.1f (all %.1f MB of gradients)", bucket_mb, needed, total_mb)
        return needed
    return bucket_mb


def register_compression(ddp: nn.parallel.DistributedDataParallel, compression: str) -> None:
    """Install the DDP communication hook for ``compression`` (none: DDP's own all-reduce)."""
    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=POWERSGD_START_ITER)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (one flat tensor per dtype)."""
    tensors = [t.data for t in (*model.parameters(), *model.buffers())]
    for group in _by_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        _scatter_back(flat, group)


def all_reduce_mean(grads: list[torch.Tensor], world_size: int, compression: str = "none") -> None:
    """Average ``grads`` over ranks in place with one all-reduce per dtype (``--no-overlap``).

    Coalescing into one flat tensor costs a copy but turns dozens of small messages into one,
    which is what matters on a slow link. fp16/bf16 compression casts the flat tensor for the wire.
    """
    wire = WIRE_DTYPES[compression]
    for group in _by_dtype(grads):
        flat = torch.cat([g.reshape(-1) for g in group])
        sent = flat.to(wire) if wire is not None else flat
        # Divide before summing (as DDP does) so fp16 sums of large gradients do not overflow.
        sent.div_(world_size)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM)
        _scatter_back(sent.to(flat.dtype) if wire is not None else sent, group)


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` split by dtype, each group in the original order (the same on every rank)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _scatter_back(flat: torch.Tensor, group: list[torch.Tensor]) -> None:
    offset = 0
    for t in group:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
