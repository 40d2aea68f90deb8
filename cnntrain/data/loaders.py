"""Build the training and evaluation batch sources for a loaded data set.

Every source has the same interface the engine uses: ``len(loader)`` (steps per epoch, equal on
every rank), ``loader.iterate(epoch, start_step)`` yielding (images, labels) on the device, and
``loader.global_batch``.
"""

from __future__ import annotations

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.datasets import DataBundle
from cnntrain.data.pipeline import Augment, DeviceLoader


def build_loaders(cfg: TrainConfig, data: DataBundle, device: torch.device, rank: int = 0,
                  world_size: int = 1) -> tuple[DeviceLoader, DeviceLoader | None]:
    """(train, val) batch sources for ``data``; val is None when the set has no held-out split."""
    augment = Augment.from_name(data.augment, cfg.pad, cfg.cutout)
    train = DeviceLoader(data.train, cfg.batch_size, device=device, mean=data.mean, std=data.std,
                         shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size, augment=augment,
                         drop_last=cfg.drop_last, channels_last=cfg.channels_last)
    val = None
    if data.val is not None:
        val = DeviceLoader(data.val, max(cfg.batch_size, 256), device=device, mean=data.mean, std=data.std,
                           shuffle=False, rank=rank, world_size=world_size, channels_last=cfg.channels_last)
    return train, val
