"""The strategy interface with its single-process defaults (the engine calls these operations:
``engine.step.Strategy``). One class per mode:

- ``SingleProcess`` (here): one device, nothing to exchange.
- ``DDP`` (``ddp.py``): all-reduce overlapped with backward in buckets, optionally compressed
  (fp16 / bf16 / PowerSGD comm hooks); ``SparseDDP``: top-k / threshold sparsification with error
  feedback; ``AllReduceAfterBackward``: ``--no-overlap``, one coalesced all-reduce after backward.
- ``PartialUpdate`` (``partial.py``): no gradient exchange, one chunk of the parameters averaged
  after each step.
- ``PsWorker`` (``ps/worker.py``): an async-ps worker, whose update is a push and a pull.

``strategy.make_strategy`` picks one from the config and the launch environment (``env.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.engine.step import Update
from cnntrain.hardware import pick_device, usable_cores
from cnntrain.parallel.env import LaunchEnv


class Strategy:
    """One process on one device; the defaults every other strategy overrides where it differs."""

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
    def local_world_size(self) -> int:
        return self.launch.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Before anything is built: threads (the node's cores shared by its ranks), process groups."""
        torch.set_num_threads(self.cfg.threads or max(1, usable_cores() // max(self.launch.local_world_size, 1)))

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the step runs forward through (DDP's wrapper, or the model itself)."""
        return model

    def accumulating(self, local: bool):
        """Context for one micro-batch's forward and backward; ``local``: more micro-batches follow
        before the optimizer step, so the gradients need not be exchanged yet."""
        return contextlib.nullcontext()

    def after_backward(self, params: list[nn.Parameter]) -> None:
        """Between backward and the update: gradient exchange not done inside backward."""

    def apply_update(self, update: Update | None, grads_ok: bool, lr: float) -> None:
        """The update of the weights from this step's gradients (skipped unless ``grads_ok``)."""
        update(grads_ok, lr)

    def after_step(self, step: int) -> None:
        """Called on every rank after optimizer step ``step`` (0-based), taken or skipped."""

    def synchronize(self) -> None:
        """Before an evaluation or checkpoint: make the ranks' weights equal."""

    def comm_stats(self) -> dict[str, float]:
        """Bytes per step this rank contributes to the exchange (``comm_bytes_per_step``) against a
        dense fp32 exchange (``dense_bytes_per_step``); empty when there is none or it is not measured."""
        return {}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def state_dict(self) -> dict:
        """What the strategy keeps that a checkpoint needs for exact resume (a collective)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @contextlib.contextmanager
    def guard(self):
        """Wraps the whole run; distributed strategies translate peer failures here."""
        yield

    def teardown(self) -> None:
        pass


class SingleProcess(Strategy):
    pass
