"""``--partial-update``: SINGA's ``partialUpdate`` on ``torch.distributed``.

    cnntrain train --nproc-per-node 2 ... --partial-update --compression-ratio 0.05

Every rank takes an optimizer step on its own gradients every iteration (no gradient exchange);
after the step one chunk of the model state (parameters and floating-point buffers, seen as one
flat vector) is averaged across ranks, chunk ``step % chunks`` with ``chunks = round(1 / ratio)``,
so each entry is averaged every ``chunks`` steps and a step sends ``ratio`` of the dense bytes.
Before every evaluation and checkpoint everything is averaged, so what is scored and saved is one
well-defined model, the same on every rank. The chunk follows from the step, so a resumed run
averages the same chunks as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from cnntrain.parallel.ddp import Distributed, exchange_stats
from cnntrain.parallel.hooks import broadcast_state


class PartialUpdate(Distributed):
    """Local optimizer steps; one chunk of the model state averaged across ranks after each."""

    name = "partial"

    def __init__(self, cfg, launch) -> None:
        super().__init__(cfg, launch)
        self._averager: PartialAverager | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = self._prepare(model)
        with self.collective("broadcast of the initial weights"):
            broadcast_state(model)
        self._averager = PartialAverager(model, self.world_size, round(1 / self.cfg.compression_ratio))
        return model

    def after_step(self, step: int) -> None:
        with self.collective("average of a parameter chunk (--partial-update)"):
            self._averager.average_chunk(step)

    def synchronize(self) -> None:
        if self._averager is not None:
            with self.collective("average of all parameters (--partial-update)"):
                self._averager.average_all()

    def comm_stats(self) -> dict[str, float]:
        counted = self._averager
        if counted is None or not counted.steps:
            return {}
        return exchange_stats(counted.sent_bytes / counted.steps, counted.dense_bytes)

    def release(self) -> None:
        self._averager = None


class PartialAverager:
    """Averages one chunk of ``model``'s state per call to :meth:`average_chunk`, all of it in
    :meth:`average_all`; counts the bytes this rank contributes."""

    def __init__(self, model: nn.Module, world_size: int, chunks: int,
                 process_group: dist.ProcessGroup | None = None) -> None:
        tensors = [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        self.groups = list(groups.values())  # one flat vector per dtype, in module order on every rank
        self.world_size = world_size
        self.chunks = max(1, min(chunks, min(sum(t.numel() for t in g) for g in self.groups)))
        self.process_group = process_group
        self.dense_bytes = sum(t.numel() * t.element_size() for t in tensors)  # one full average
        self.sent_bytes = 0
        self.steps = 0
        self._dirty = False  # ranks may differ (a chunk-averaged step since the last full average)

    def average_chunk(self, step: int) -> None:
        """After optimizer step ``step`` (0-based): average chunk ``step % chunks`` of each dtype group."""
        chunk = step % self.chunks
        for group in self.groups:
            total = sum(t.numel() for t in group)
            self._average_range(group, chunk * total // self.chunks, (chunk + 1) * total // self.chunks)
        self.steps += 1
        self._dirty = self.chunks > 1

    def average_all(self) -> None:
        """Make every rank's state the average of all ranks' (a no-op when nothing changed since)."""
        if not self._dirty:
            return
        for group in self.groups:
            self._average_range(group, 0, sum(t.numel() for t in group))
        self._dirty = False

    def _average_range(self, group: list[torch.Tensor], lo: int, hi: int) -> None:
        """Average entries [lo, hi) of the concatenation of ``group`` in one all-reduce."""
        pieces, offset = [], 0
        for t in group:
            n = t.numel()
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append(_storage_order(t)[a - offset:b - offset])
            offset += n
        if not pieces:
            return
        flat = torch.cat(pieces)
        # Divide before summing (as DDP does): two-rank averages are then exact.
        flat.div_(self.world_size)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        start = 0
        for piece in pieces:
            piece.copy_(flat[start:start + piece.numel()])
            start += piece.numel()
        self.sent_bytes += flat.numel() * flat.element_size()


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (channels_last weights are dense but not
    contiguous in NCHW order; averaging is element-wise, so any order the ranks share will do)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,))
    raise ValueError(f"--partial-update: a tensor of shape {tuple(t.shape)} with strides {t.stride()} is not dense")
