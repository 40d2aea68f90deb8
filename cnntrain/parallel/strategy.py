"""How processes cooperate. The engine calls only the operations of ``Strategy``.

``SingleProcess`` runs on one device. ``DataParallel`` is synchronous data parallelism on
``torch.distributed``: weights broadcast from rank 0 at wrap time, gradients all-reduced by DDP
(overlapped with backward in buckets, optionally compressed or sparsified by a comm hook) or, with
``--no-overlap``, in one coalesced all-reduce after backward; with ``--partial-update`` no
gradients are exchanged and one chunk of the parameters is averaged after each optimizer step;
metrics summed over ranks. A failed
collective anywhere in the run becomes a ``DistributedError`` naming the rank and the operation.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.errors import CnnTrainError, ConfigError, DistributedError
from cnntrain.parallel.env import LaunchEnv, detect_launch, usable_cores
from cnntrain.parallel.hooks import all_reduce_mean, broadcast_state, bucket_mb_for, register_compression
from cnntrain.parallel.partial import PartialAverager

log = logging.getLogger("cnntrain")


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
        resume_after_restart(self.cfg, self.is_main)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def accumulating(self, local: bool):
        """Context for one micro-batch's forward and backward; ``local``: more micro-batches follow
        before the optimizer step, so the gradients need not be exchanged yet."""
        return contextlib.nullcontext()

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        """Called between backward and the optimizer step (gradient exchange not done by DDP)."""

    def after_step(self, step: int) -> None:
        """Called on every rank after optimizer step ``step`` (0-based), taken or skipped."""

    def synchronize(self) -> None:
        """Called on every rank before an evaluation or checkpoint: make the ranks' weights equal."""

    def comm_stats(self) -> dict[str, float]:
        """Bytes per step this rank contributes to the gradient / parameter exchange
        (``comm_bytes_per_step``) against a dense fp32 exchange (``dense_bytes_per_step``); empty
        when there is no exchange or it is not measured."""
        return {}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def state_dict(self) -> dict:
        """What the strategy keeps per rank that a checkpoint needs for exact resume (a collective)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @contextlib.contextmanager
    def guard(self):
        """Wraps the whole training run; distributed strategies translate peer failures here."""
        yield

    def teardown(self) -> None:
        pass


class SingleProcess(Strategy):
    pass


class DataParallel(Strategy):
    """Synchronous data parallelism: DDP (overlapped bucketed all-reduce) or, with
    ``--no-overlap``, one coalesced all-reduce after backward."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, launch: LaunchEnv) -> None:
        super().__init__(cfg, launch)
        self.backend = "none"
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._plain: nn.Module | None = None
        self._sparse = None  # top-k / threshold hook state (bytes counted there)
        self._partial: PartialAverager | None = None
        self._op = "setup"
        self._failed = False

    def setup(self) -> None:
        super().setup()
        backend = self.cfg.dist_backend
        if backend == "auto":
            # nccl reports "available" on CPU-only builds too: choose by the device actually used.
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.backend = backend
        if self.cfg.grad_compression in ("powersgd", "topk", "threshold") and not self.cfg.overlap:
            raise ConfigError(f"--grad-compression {self.cfg.grad_compression} is a DDP hook: it needs --overlap "
                              f"(drop --no-overlap)")
        if self.cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel): "
                              "drop --sync-bn on CPU")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # The launch env already ranks flags over the launcher's variables over defaults.
        os.environ["MASTER_ADDR"] = self.launch.master_addr
        os.environ["MASTER_PORT"] = str(self.launch.master_port)
        try:
            dist.init_process_group(
                backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self.cfg.dist_timeout))
        except Exception as exc:  # noqa: BLE001 - c10d raises several types for the same cause
            self._failed = True
            where = f"{self.launch.master_addr}:{self.launch.master_port}"
            if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
                raise DistributedError(
                    f"rank {self.rank} of {self.world_size}: port {self.launch.master_port} at {where} is already "
                    f"in use by another process; pick a free one with --master-port (or MASTER_PORT)") from None
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} ({self.launch.launcher}): could not complete the "
                f"rendezvous at {self.launch.master_addr}:{self.launch.master_port} within "
                f"{self.cfg.dist_timeout:.0f} s (--dist-timeout); a peer did not join or the address is wrong: "
                f"{str(exc).splitlines()[0]}") from None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cfg.partial_update:
            with self.collective("broadcast of the initial weights"):
                broadcast_state(model)
            self._partial = PartialAverager(model, self.world_size, round(1 / self.cfg.compression_ratio))
            return model
        if not self.cfg.overlap:
            with self.collective("broadcast of the initial weights"):
                broadcast_state(model)
            self._plain = model
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        bucket = bucket_mb_for(model, self.cfg.grad_compression, self.backend, self.cfg.bucket_mb)
        with self.collective("broadcast of the initial weights (DDP)"):
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, bucket_cap_mb=bucket, gradient_as_bucket_view=True)
        self._sparse = register_compression(ddp, self.cfg.grad_compression, self.cfg.compression_ratio,
                                            self.cfg.compression_threshold)
        # DDP's all-reduce runs inside forward/backward: name it for errors raised there.
        ddp.register_forward_pre_hook(lambda *_: setattr(self, "_op", "DDP forward/backward (gradient all-reduce)"))
        self._ddp = ddp
        return ddp

    def accumulating(self, local: bool):
        return self._ddp.no_sync() if local and self._ddp is not None else contextlib.nullcontext()

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        if self._plain is None:
            return
        with self.collective("all-reduce of gradients (--no-overlap)"):
            all_reduce_mean([p.grad for p in params if p.grad is not None], self.world_size,
                            self.cfg.grad_compression)
            # DDP broadcasts buffers (BatchNorm statistics) from rank 0 each step; do the same.
            buffers = list(self._plain.buffers())
            if buffers:
                broadcast_state(_Buffers(buffers))

    def after_step(self, step: int) -> None:
        if self._partial is not None:
            with self.collective("average of a parameter chunk (--partial-update)"):
                self._partial.average_chunk(step)

    def synchronize(self) -> None:
        if self._partial is not None:
            with self.collective("average of all parameters (--partial-update)"):
                self._partial.average_all()

    def comm_stats(self) -> dict[str, float]:
        counted = self._sparse or self._partial
        if counted is not None:
            if not counted.steps:
                return {}
            sent, dense = counted.sent_bytes / counted.steps, counted.dense_bytes
            if self._sparse is not None:
                dense /= counted.steps
        else:
            model = self._ddp.module if self._ddp is not None else self._plain
            compression = self.cfg.grad_compression
            if model is None or compression == "powersgd":
                return {}
            dense = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
            sent = dense / 2 if compression in ("fp16", "bf16") else dense
        return {"comm_bytes_per_step": sent, "dense_bytes_per_step": dense, "compression": dense / max(sent, 1e-9)}

    def state_dict(self) -> dict:
        """Top-k / threshold: every rank's unsent remainder, one row per rank, gathered on rank 0."""
        if self._sparse is None:
            return {}
        mine = self._sparse.remainder_of(self._sparse_params())
        rows = [torch.empty_like(mine) for _ in range(self.world_size)] if self.rank == 0 else None
        with self.collective("gather of the unsent gradient remainders (--grad-compression)"):
            dist.gather(mine, rows, dst=0)
        return {"remainders": torch.stack(rows).cpu()} if self.rank == 0 else {}

    def load_state_dict(self, state: dict) -> None:
        rows = state.get("remainders")
        if self._sparse is None or rows is None:
            return
        if rows.shape[0] != self.world_size:
            if self.rank == 0:
                log.warning("the checkpoint's unsent gradient remainders are from %d processes, not %d: they "
                            "are dropped (resume is not exact)", rows.shape[0], self.world_size)
            return
        self._sparse.load_remainder(self._sparse_params(), rows[self.rank])

    def _sparse_params(self) -> list[torch.Tensor]:
        return [p for p in self._ddp.module.parameters() if p.requires_grad]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.collective("all-reduce of metrics"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.collective("broadcast from rank 0"):
            dist.broadcast(tensor, src=0)
        return tensor

    def barrier(self) -> None:
        with self.collective("barrier"):
            dist.barrier()

    @contextlib.contextmanager
    def collective(self, op: str):
        """Name the collective ``op`` for errors raised inside the block."""
        self._op = op
        yield

    @contextlib.contextmanager
    def guard(self):
        """Turn a collective failure anywhere in the block into a ``DistributedError`` naming this
        rank and the operation that failed (a dead or stalled peer)."""
        try:
            yield
        except BaseException as exc:
            # Any failure on this rank: skip the exit barrier, which would pair with whatever
            # collective the peers are in (mismatched, or a wait for --dist-timeout).
            self._failed = True
            if isinstance(exc, CnnTrainError) or not is_collective_failure(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {self._op} failed ({type(exc).__name__}: {first[:300]}); "
                f"a peer died, was killed or stalled longer than --dist-timeout {self.cfg.dist_timeout:.0f} s: "
                f"see the other ranks' output") from exc

    def teardown(self) -> None:
        # Drop DDP first, then barrier, then destroy: without this gloo sometimes aborts at exit
        # (SIGABRT, torch 2.14). After a failure a barrier would only wait on the dead peer.
        self._ddp = self._plain = self._sparse = self._partial = None
        gc.collect()
        if not dist.is_initialized():
            return
        try:
            if not self._failed:
                dist.barrier()
        except Exception as exc:  # noqa: BLE001 - never mask the error that ended training
            log.warning("rank %d: barrier at exit failed: %s", self.rank, str(exc).splitlines()[0])
        finally:
            dist.destroy_process_group()


class _Buffers(nn.Module):
    """Holds tensors as buffers so ``broadcast_state`` can send them in one message."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"b{i}", t, persistent=False)


_COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket", "c10d",
                     "processgroup", "broken pipe", "store")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed collective or store (c10d raises plain RuntimeErrors too)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _COLLECTIVE_WORDS)


def resume_after_restart(cfg: TrainConfig, main: bool) -> None:
    """Under an elastic launcher that may restart workers, continue from the newest valid
    checkpoint in ``--run-dir`` when there is one. Decided by the checkpoint, not by
    TORCHELASTIC_RESTART_COUNT: a membership change restarts workers without bumping it."""
    if cfg.resume or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) <= 0:
        return
    if not cfg.run_dir:
        if main:
            log.warning("elastic restarts are on but --run-dir is not given: a restarted job cannot find "
                        "its checkpoints and starts over; pass --run-dir")
        return
    from cnntrain.engine.checkpoint import latest_valid  # dist stays importable without the engine

    found = latest_valid(Path(cfg.run_dir) / "checkpoints", quiet=True)
    if found is not None:
        cfg.resume = "auto"
        if main:
            log.info("elastic launch (restart %s): resuming from %s",
                     os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"), found)


def make_strategy(cfg: TrainConfig, launch: LaunchEnv | None = None) -> Strategy:
    launch = launch or detect_launch()
    return DataParallel(cfg, launch) if launch.distributed else SingleProcess(cfg, launch)
