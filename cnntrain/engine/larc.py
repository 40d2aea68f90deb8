"""LARC (layer-wise adaptive rate control) as NVIDIA's nvcnn_hvd.py defines it.

For each weight tensor: ``local = eta * ||w|| / (||g|| + eps)``, where ``g`` already includes the
weight decay term. Mode ``clip``: ``g *= min(local / lr, 1)``; mode ``scale``: ``g *= local``.
Groups flagged ``larc_exclude`` (biases, BatchNorm) are left alone.
"""

from __future__ import annotations

import torch


def apply_larc(optimizer: torch.optim.Optimizer, lr: float, mode: str, eta: float, eps: float) -> None:
    """Rescale every gradient in ``optimizer`` in place (after unscaling, before ``step``)."""
    for group in optimizer.param_groups:
        wd = group.get("larc_weight_decay", 0.0)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if wd:
            torch._foreach_add_([p.grad for p in params], [p.detach() for p in params], alpha=wd)
        if group.get("larc_exclude"):
            continue
        for p in params:
            g = p.grad
            w_norm = torch.linalg.vector_norm(p.detach().float())
            g_norm = torch.linalg.vector_norm(g.float())
            local = eta * w_norm / (g_norm + eps)
            factor = torch.clamp(local / lr, max=1.0) if mode == "clip" else local
            g.mul_(factor.to(g.dtype))
