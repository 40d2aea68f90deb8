"""Build the training and evaluation batch sources for a loaded data set.

Every source has the same interface the engine uses: ``len(loader)`` (steps per epoch, equal on
every rank), ``loader.iterate(epoch, start_step)`` yielding (images, labels) on the device, and
``loader.global_batch``.
"""

from __future__ import annotations

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.balance import BalancedOrder
from cnntrain.data.datasets import DataBundle
from cnntrain.data.mixing import with_augmentation
from cnntrain.data.pipeline import Augment, DeviceLoader
from cnntrain.data.stream_dataset import StreamDataset
from cnntrain.data.streaming import StreamLoader, balance_threads, default_workers


def build_loaders(cfg: TrainConfig, data: DataBundle, device: torch.device, rank: int = 0, world_size: int = 1,
                  local_world_size: int = 1) -> tuple[DeviceLoader | StreamLoader, DeviceLoader | StreamLoader | None]:
    """(train, val) batch sources for ``data``; val is None when the set has no held-out split.

    ``local_world_size`` is the number of ranks on this machine (the launcher says:
    ``parallel.env.detect_launch().local_world_size``): streamed sets share its cores among them.
    """
    if isinstance(data.train, StreamDataset):
        return build_stream_loaders(cfg, data, device, rank, world_size, local_world_size)
    augment = Augment.from_name(data.augment, cfg.pad, cfg.cutout, cfg.alternate_flip, cfg.rotate)
    train = DeviceLoader(data.train, cfg.batch_size, device=device, mean=data.mean, std=data.std,
                         shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size, augment=augment,
                         drop_last=cfg.drop_last, channels_last=cfg.channels_last)
    _balance(cfg, data, train)
    train = with_augmentation(cfg, data.num_classes, train, world_size)
    val = None
    if data.val is not None:
        val = DeviceLoader(data.val, max(cfg.batch_size, 256), device=device, mean=data.mean, std=data.std,
                           shuffle=False, rank=rank, world_size=world_size, channels_last=cfg.channels_last)
    return train, val


def _balance(cfg: TrainConfig, data: DataBundle, train: DeviceLoader | StreamLoader) -> None:
    """``--balanced-sampler``: the training order becomes a class-balanced draw (data/balance.py)."""
    if cfg.balanced_sampler:
        train.order = BalancedOrder(data.train.labels, data.num_classes, cfg.seed)


def build_stream_loaders(cfg: TrainConfig, data: DataBundle, device: torch.device, rank: int = 0,
                         world_size: int = 1, local_world_size: int = 1) -> tuple[StreamLoader, StreamLoader | None]:
    """(train, val) :class:`StreamLoader` s with ``--workers`` processes each (auto: see
    :func:`default_workers`, which splits the cores among the ``local_world_size`` ranks of this
    machine); intra-op threads are lowered so workers + threads fit the cores."""
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device.type, local_world_size)
    balance_threads(workers, cfg.threads, local_world_size)
    train = StreamLoader(data.train, cfg.batch_size, device=device, mean=data.mean, std=data.std, shuffle=True,
                         seed=cfg.seed, rank=rank, world_size=world_size, workers=workers,
                         drop_last=cfg.drop_last, channels_last=cfg.channels_last)
    _balance(cfg, data, train)
    train = with_augmentation(cfg, data.num_classes, train, world_size)
    val = None
    if data.val is not None:
        val = build_eval_loader(cfg, data.val, device, data.mean, data.std, rank, world_size, workers,
                                local_world_size)
    return train, val


def build_eval_loader(cfg: TrainConfig, data, device: torch.device, mean, std, rank: int = 0,
                      world_size: int = 1, workers: int | None = None,
                      local_world_size: int = 1) -> DeviceLoader | StreamLoader:
    """An evaluation loader over ``data`` (in memory or streamed): every image once across ranks.
    ``workers`` (None: ``--workers``, auto as in :func:`build_stream_loaders`) only acts on streamed sets."""
    batch = max(cfg.batch_size, 256)
    if isinstance(data, StreamDataset):
        if workers is None:
            workers = cfg.workers if cfg.workers >= 0 else default_workers(device.type, local_world_size)
        # Decoded full-size crops are large: keep eval batches at the training size.
        return StreamLoader(data, cfg.batch_size, device=device, mean=mean, std=std, shuffle=False, rank=rank,
                            world_size=world_size, workers=workers, channels_last=cfg.channels_last)
    return DeviceLoader(data, batch, device=device, mean=mean, std=std, shuffle=False, rank=rank,
                        world_size=world_size, channels_last=cfg.channels_last)
