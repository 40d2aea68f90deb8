"""LARC (layer-wise adaptive rate control) as NVIDIA's nvcnn_hvd.py defines it.

For each weight tensor: ``local = eta * ||w|| / (||g|| + eps)``, where ``g`` already includes the
weight decay term. Mode ``clip``: ``g *= min(local / lr, 1)``; mode ``scale``: ``g *= local``.
Where ``||w||`` or ``||g||`` is 0 the factor is 1, as in nvcnn: a weight that starts at zero (a
zero-initialised last BN scale or classifier) would otherwise get factor 0 and never move.
Groups flagged ``larc_exclude`` are left alone, and so are 1-d parameters (biases, normalisation
scales) unless their group sets ``larc_1d`` (``--larc-bn-bias``).
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
        with_1d = group.get("larc_1d", False)
        for p in params:
            if p.ndim <= 1 and not with_1d:
                continue
            g = p.grad
            w_norm = torch.linalg.vector_norm(p.detach().float())
            g_norm = torch.linalg.vector_norm(g.float())
            local = eta * w_norm / (g_norm + eps)
            factor = torch.clamp(local / lr, max=1.0) if mode == "clip" else local
            # No host sync: the zero-norm case is chosen on the device.
            factor = torch.where((w_norm > 0) & (g_norm > 0), factor, torch.ones_like(factor))
            g.mul_(factor.to(g.dtype))
