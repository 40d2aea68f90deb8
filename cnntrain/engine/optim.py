"""Optimizer construction and the learning rate as a pure function of the step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.engine.finetune import scale_groups

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool, norm_lr_scale: float = 1.0,
                 larc_bn_bias: bool = False) -> list[dict]:
    """Weights that decay, and (unless ``decay_bn_bias``) 1-d parameters that do not.

    1-d parameters are biases and normalisation scales; decaying them hurts more than it helps on
    large-batch recipes, and LARC skips them too, in whichever group they are (``larc_exclude`` marks
    a group of them; ``apply_larc`` skips 1-d parameters of the others), unless ``larc_bn_bias``
    (``larc_1d`` on every group): their norms are tiny and noisy, so LARC's ratio is too. With
    ``norm_lr_scale`` != 1 the normalisation layers' parameters get a group of their own whose LR is
    that multiple of the schedule's (``lr_scale``, applied by ``set_lr``): fast CIFAR recipes train
    BatchNorm shifts tens of times faster than the weights.
    """
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    decay, no_decay, norm, timed = [], [], [], []
    # A model may train some parameters for its first epochs only (fastnet's whitening bias): a
    # group of their own whose LR set_lr zeroes after ``until_epoch`` (a frozen flag would upset DDP).
    limits = getattr(model, "trainable_epochs", {})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in limits:
            timed.append({"params": [p], "weight_decay": weight_decay, "larc_exclude": True,
                          "until_epoch": float(limits[name])})
        elif norm_lr_scale != 1 and id(p) in norm_ids:
            norm.append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    # With decay_bn_bias the 1-d parameters share the weights' group and apply_larc skips them one by
    # one: a group of their own would change the layout, and older optimizer state would not load.
    larc = {"larc_1d": larc_bn_bias}
    if decay_bn_bias:
        groups = [{"params": decay + no_decay, "weight_decay": weight_decay, "larc_exclude": False, **larc}]
    else:
        groups = [{"params": decay, "weight_decay": weight_decay, "larc_exclude": False, **larc}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "larc_exclude": not larc_bn_bias, **larc})
    if norm:
        # Decay per step is lr * weight_decay: divided by the scale, a faster LR does not decay faster.
        groups.append({"params": norm, "weight_decay": weight_decay / norm_lr_scale if decay_bn_bias else 0.0,
                       "larc_exclude": not larc_bn_bias, "lr_scale": norm_lr_scale, **larc})
    return [g for g in groups if g["params"]] + timed


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW over ``param_groups``; multi-tensor kernels."""
    return optimizer_for(model_param_groups(model, cfg), cfg, device_type)


def model_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """``param_groups`` with the config's options (a parameter server regroups a shard after it)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_bn_bias, cfg.norm_lr_scale, cfg.larc_bn_bias)
    return scale_groups(groups, model, cfg)  # --layer-decay / --head-lr-mult


def optimizer_for(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (as ``param_groups`` makes them)."""
    if cfg.larc_mode != "none":
        # LARC needs the decayed gradient (g + wd * w), as nvcnn adds the L2 term to the loss; it
        # folds the decay in itself, so the optimizer must not apply it again.
        for g in groups:
            g["larc_weight_decay"], g["weight_decay"] = g["weight_decay"], 0.0
    fused = device_type == "cuda"
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.optimizer == "nesterov" and cfg.momentum > 0,
                               foreach=not fused, fused=fused or None)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, foreach=not fused, fused=fused or None)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """``--lr`` after the linear scaling rule (``--scale-lr B``: times global batch / B)."""
    return cfg.lr * (global_batch / cfg.scale_lr if cfg.scale_lr else 1.0)


def lr_at(step: int, cfg: TrainConfig, base_lr: float, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then the schedule.

    Depends on nothing but its arguments, so a resumed run gets exactly the same rates.
    """
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    epoch = step / steps_per_epoch
    t = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
    final = base_lr * cfg.lr_final
    kind = cfg.lr_schedule
    if kind in ("constant", "plateau"):  # plateau: the loop multiplies by its factor (engine/early_stop.py)
        return base_lr
    if kind == "step":
        return base_lr * cfg.lr_gamma ** math.floor(epoch / cfg.lr_step_epochs)
    if kind == "multistep":
        return base_lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    if kind == "cosine":
        return final + (base_lr - final) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "poly":
        return final + (base_lr - final) * (1 - t) ** cfg.lr_power
    if kind == "onecycle":
        # Triangular one-cycle: up from lr/25 over the first 25% of the steps, then linearly down.
        peak = 0.25
        if t < peak:
            return base_lr * (0.04 + 0.96 * t / peak)
        return final + (base_lr - final) * (1 - t) / (1 - peak)
    raise ValueError(f"unknown schedule {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, epoch: float = 0.0) -> None:
    """Each group's LR: ``lr`` times its ``lr_scale``, or 0 from its ``until_epoch`` on."""
    for group in optimizer.param_groups:
        live = epoch < group.get("until_epoch", math.inf)
        group["lr"] = lr * group.get("lr_scale", 1.0) if live else 0.0
