"""How processes cooperate. The engine calls only the operations of ``Strategy``.

``SingleProcess`` runs on one device. ``DataParallel`` is synchronous data parallelism on
``torch.distributed``: weights broadcast from rank 0 at wrap time, gradients all-reduced by DDP
(overlapped with backward in buckets), metrics summed over ranks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.dist.env import LaunchEnv, detect_launch, usable_cores
from cnntrain.errors import ConfigError, DistributedError


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise ConfigError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    return torch.device("cpu")


class Strategy:
    """Single-process defaults; subclasses override what differs."""

    name = "single"

    def __init__(self, cfg: TrainConfig, launch: LaunchEnv) -> None:
        self.cfg = cfg
        self.launch = launch
        self.device = pick_device(cfg.device, launch.local_rank)

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        threads = self.cfg.threads or max(1, usable_cores() // max(self.launch.local_world_size, 1))
        torch.set_num_threads(threads)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        """Called between backward and the optimizer step (gradient exchange not done by DDP)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def run_main_first(self, fn):
        """Run ``fn`` on rank 0 first (it may download), then on the others."""
        if self.world_size == 1:
            return fn()
        if not self.is_main:
            self.barrier()
        try:
            return fn()
        finally:
            if self.is_main:
                self.barrier()

    def teardown(self) -> None:
        pass


class SingleProcess(Strategy):
    pass


class DataParallel(Strategy):
    name = "ddp"

    def setup(self) -> None:
        super().setup()
        backend = self.cfg.dist_backend
        if backend == "auto":
            # nccl reports "available" on CPU-only builds too: choose by the device actually used.
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        os.environ.setdefault("MASTER_ADDR", self.launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.launch.master_port))
        try:
            dist.init_process_group(
                backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self.cfg.dist_timeout))
        except Exception as exc:  # noqa: BLE001 - c10d raises several types for the same cause
            raise DistributedError(
                f"rank {self.rank}: could not join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                f"{self.cfg.dist_timeout:.0f} s: {str(exc).splitlines()[0]}") from None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, bucket_cap_mb=self.cfg.bucket_mb, gradient_as_bucket_view=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=0)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def teardown(self) -> None:
        if dist.is_initialized():
            # A barrier before destroying the group avoids gloo aborting at exit (seen on 2.14).
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def make_strategy(cfg: TrainConfig, launch: LaunchEnv | None = None) -> Strategy:
    launch = launch or detect_launch()
    return DataParallel(cfg, launch) if launch.distributed else SingleProcess(cfg, launch)
