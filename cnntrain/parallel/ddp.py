"""Synchronous data parallelism on ``torch.distributed``.

``Distributed`` owns the process group: rendezvous, metric all-reduces, broadcasts, and the guard
that turns a failed collective anywhere in the run into a ``DistributedError`` naming the rank and
the operation. Its subclasses differ only in how gradients travel:

- ``DDP``: DDP's bucketed all-reduce overlapped with backward, optionally compressed by a comm hook
  (fp16, bf16, PowerSGD); weights broadcast from rank 0 at wrap time.
- ``SparseDDP``: DDP with top-k / threshold sparsification and error feedback; each rank's unsent
  remainder goes into the checkpoint so a resumed run sends exactly what it would have.
- ``AllReduceAfterBackward``: ``--no-overlap``, one coalesced all-reduce after backward.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from cnntrain.errors import CnnTrainError, ConfigError, DistributedError
from cnntrain.parallel.base import Strategy
from cnntrain.parallel.hooks import PowerSGD, all_reduce_mean, broadcast_state, bucket_mb_for, register_compression

log = logging.getLogger("cnntrain")

_COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket", "c10d",
                     "processgroup", "broken pipe", "store")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed collective or store (c10d raises plain RuntimeErrors too)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _COLLECTIVE_WORDS)


class Distributed(Strategy):
    """Several processes in one gloo / NCCL group; metrics summed over ranks."""

    name = "distributed"

    def __init__(self, cfg, launch) -> None:
        super().__init__(cfg, launch)
        self.backend = "none"
        self._op = "setup"
        self._failed = False

    def setup(self) -> None:
        super().setup()
        # nccl reports "available" on CPU-only builds too: choose by the device actually used.
        backend = self.cfg.dist_backend
        self.backend = ("nccl" if self.device.type == "cuda" else "gloo") if backend == "auto" else backend
        if self.cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel): "
                              "drop --sync-bn on CPU")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._init_group()

    def _init_group(self) -> None:
        launch, timeout = self.launch, self.cfg.dist_timeout
        # The launch env already ranks flags over the launcher's variables over defaults.
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.master_addr, str(launch.master_port)
        where = f"{launch.master_addr}:{launch.master_port}"
        try:
            dist.init_process_group(self.backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001 - c10d raises several types for the same cause
            self._failed = True
            if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
                raise DistributedError(
                    f"rank {self.rank} of {self.world_size}: port {launch.master_port} at {where} is already "
                    f"in use by another process; pick a free one with --master-port (or MASTER_PORT)") from None
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} ({launch.launcher}): could not complete the rendezvous at "
                f"{where} within {timeout:.0f} s (--dist-timeout); a peer did not join or the address is wrong: "
                f"{str(exc).splitlines()[0]}") from None

    def _prepare(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

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

    def release(self) -> None:
        """Drop the wrapped modules (DDP objects alive at destroy_process_group make gloo abort)."""

    def teardown(self) -> None:
        # Drop DDP first, then barrier, then destroy: without this gloo sometimes aborts at exit
        # (SIGABRT, torch 2.14). After a failure a barrier would only wait on the dead peer.
        self.release()
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


class DDP(Distributed):
    """DDP: bucketed all-reduce overlapped with backward, optionally compressed by a comm hook."""

    name = "ddp"

    def __init__(self, cfg, launch) -> None:
        super().__init__(cfg, launch)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._hook_state = None  # top-k / threshold: the hook's state (remainders, bytes counted)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = self._prepare(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        bucket = bucket_mb_for(model, self.cfg.grad_compression, self.backend, self.cfg.bucket_mb)
        with self.collective("broadcast of the initial weights (DDP)"):
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket,
                                                      gradient_as_bucket_view=True)
        self._hook_state = register_compression(ddp, self.cfg.grad_compression, self.cfg.compression_ratio,
                                                self.cfg.compression_threshold)
        # DDP's all-reduce runs inside forward/backward: name it for errors raised there.
        ddp.register_forward_pre_hook(lambda *_: setattr(self, "_op", "DDP forward/backward (gradient all-reduce)"))
        self._ddp = ddp
        return ddp

    def accumulating(self, local: bool):
        return self._ddp.no_sync() if local and self._ddp is not None else contextlib.nullcontext()

    def comm_stats(self) -> dict[str, float]:
        compression = self.cfg.grad_compression
        if self._ddp is None or compression == "powersgd":
            return {}
        dense = sum(p.numel() * 4 for p in self._ddp.module.parameters() if p.requires_grad)
        sent = dense / 2 if compression in ("fp16", "bf16") else dense
        return exchange_stats(sent, dense)

    def release(self) -> None:
        self._ddp = self._hook_state = None

    def state_dict(self) -> dict:
        """PowerSGD: its step count, random state and warm-start Q (the same on every rank) and each
        rank's error feedback (one row per rank, gathered on rank 0), all per parameter."""
        hs = self._hook_state
        if not isinstance(hs, PowerSGD):
            return {}
        st, (errors, qs) = hs.torch_state, hs.per_parameter()
        _, keys, pos, has_gauss, gauss = st.rng.get_state()
        saved = {"iter": st.iter, "rng_keys": torch.from_numpy(keys.astype("int64")), "rng_pos": int(pos),
                 "rng_has_gauss": int(has_gauss), "rng_gauss": float(gauss),
                 "q_params": torch.tensor(sorted(qs), dtype=torch.int64),
                 "q": torch.cat([qs[i].reshape(-1) for i in sorted(qs)]).cpu() if qs else torch.zeros(0)}
        if errors:  # none before compression starts (the same step on every rank)
            mine = torch.cat([errors[i].reshape(-1) if i in errors else torch.zeros_like(p).reshape(-1)
                              for i, p in enumerate(hs.params)])
            saved["errors"] = self._gather_rows(mine, "the PowerSGD error feedback")
        return {"powersgd": saved} if self.rank == 0 else {}

    def load_state_dict(self, state: dict) -> None:
        saved, hs = state.get("powersgd"), self._hook_state
        if saved is None or not isinstance(hs, PowerSGD):
            return
        st = hs.torch_state
        st.iter = int(saved["iter"])
        st.rng.set_state(("MT19937", saved["rng_keys"].numpy().astype("uint32"), saved["rng_pos"],
                          saved["rng_has_gauss"], saved["rng_gauss"]))
        q_lengths = [hs.q_length(int(i)) for i in saved["q_params"]]
        qs = dict(zip(saved["q_params"].tolist(), saved["q"].split(q_lengths)))
        row = self._own_row(saved.get("errors"), "PowerSGD error feedback")
        hs.hold({} if row is None else dict(enumerate(row.split([p.numel() for p in hs.params]))), qs)

    def _gather_rows(self, mine: torch.Tensor, what: str) -> torch.Tensor | None:
        """Every rank's ``mine`` (equal sizes), one row per rank, on rank 0 (None elsewhere): a
        collective, for state each rank keeps apart (error feedback)."""
        rows = [torch.empty_like(mine) for _ in range(self.world_size)] if self.rank == 0 else None
        with self.collective(f"gather of {what}"):
            dist.gather(mine, rows, dst=0)
        return torch.stack(rows).cpu() if self.rank == 0 else None

    def _own_row(self, rows: torch.Tensor | None, what: str) -> torch.Tensor | None:
        """This rank's row of ``rows`` from :meth:`_gather_rows`; None (said once) when the checkpoint
        came from another number of processes."""
        if rows is None:
            return None
        if rows.shape[0] != self.world_size:
            if self.rank == 0:
                log.warning("the checkpoint's %s is from %d processes, not %d: it is dropped (resume is not "
                            "exact)", what, rows.shape[0], self.world_size)
            return None
        return rows[self.rank]


class SparseDDP(DDP):
    """DDP with top-k / threshold sparsification and error feedback (SINGA's sparsified exchange)."""

    name = "sparse"

    def comm_stats(self) -> dict[str, float]:
        counted = self._hook_state
        if counted is None or not counted.steps:
            return {}
        return exchange_stats(counted.sent_bytes / counted.steps, counted.dense_bytes / counted.steps)

    def state_dict(self) -> dict:
        """Every rank's unsent remainder, one row per rank, gathered on rank 0."""
        rows = self._gather_rows(self._hook_state.remainder_of(self._params()),
                                 "the unsent gradient remainders (--grad-compression)")
        return {"remainders": rows} if self.rank == 0 else {}

    def load_state_dict(self, state: dict) -> None:
        row = self._own_row(state.get("remainders"), "unsent gradient remainder")
        if row is not None:
            self._hook_state.load_remainder(self._params(), row)

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self._ddp.module.parameters() if p.requires_grad]


class AllReduceAfterBackward(Distributed):
    """``--no-overlap``: gradients all-reduced in one coalesced call after backward, buffers
    (BatchNorm statistics) broadcast from rank 0 as DDP does."""

    name = "no-overlap"

    def __init__(self, cfg, launch) -> None:
        super().__init__(cfg, launch)
        self._model: nn.Module | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = self._prepare(model)
        with self.collective("broadcast of the initial weights"):
            broadcast_state(model)
        self._model = model
        return model

    def after_backward(self, params: list[nn.Parameter]) -> None:
        with self.collective("all-reduce of gradients (--no-overlap)"):
            all_reduce_mean([p.grad for p in params if p.grad is not None], self.world_size,
                            self.cfg.grad_compression)
            buffers = list(self._model.buffers())
            if buffers:
                broadcast_state(_Buffers(buffers))

    def comm_stats(self) -> dict[str, float]:
        if self._model is None:
            return {}
        dense = sum(p.numel() * 4 for p in self._model.parameters() if p.requires_grad)
        return exchange_stats(dense / 2 if self.cfg.grad_compression in ("fp16", "bf16") else dense, dense)

    def release(self) -> None:
        self._model = None


def exchange_stats(sent: float, dense: float) -> dict[str, float]:
    """Bytes per step this rank sends, the dense fp32 bytes it would, and their ratio."""
    return {"comm_bytes_per_step": sent, "dense_bytes_per_step": dense, "compression": dense / max(sent, 1e-9)}


class _Buffers(nn.Module):
    """Holds tensors as buffers so ``broadcast_state`` can send them in one message."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"b{i}", t, persistent=False)
