"""Gradient exchange pieces used by the DDP strategies (``ddp.py``): DDP communication hooks for compressed
all-reduce, and the after-backward coalesced all-reduce of ``--no-overlap``.

    cnntrain train ... --grad-compression fp16      # DDP buckets cast to fp16 on the wire
    cnntrain train ... --grad-compression powersgd  # low-rank (rank 1) after 10 plain steps
    cnntrain train ... --grad-compression topk --compression-ratio 0.05     # largest 5% of each bucket
    cnntrain train ... --grad-compression threshold --compression-threshold 1e-3  # entries with |g| >= 1e-3
    cnntrain train ... --no-overlap                 # one flat all-reduce after backward

Top-k and threshold are SINGA's ``sparseTopK`` / ``sparseThreshold``: each rank sends values and
indices of the selected entries (all_gather), keeps the rest and adds it to the next step's
gradient (error feedback), so no gradient is lost, only delayed. A step whose exchanged gradient is
not finite (the trainer skips it) leaves the kept remainder as it was before that step.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

log = logging.getLogger("cnntrain")

# PowerSGD needs a few exact all-reduce steps first (its error feedback and warm start start from
# them); the torch default of 1000 would mean short runs never compress at all.
POWERSGD_START_ITER = 10
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def bucket_mb_for(model: nn.Module, compression: str, backend: str, bucket_mb: float) -> float:
    """The DDP bucket size to use: PowerSGD on gloo crashes with more than one bucket (torch
    2.14), so it gets one bucket large enough for every gradient; others keep ``bucket_mb``."""
    if compression != "powersgd" or backend != "gloo":
        return bucket_mb
    total_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    needed = total_mb + 1.0
    if needed > bucket_mb:
        log.info("--grad-compression powersgd on gloo works with one gradient bucket only: "
                 "--bucket-mb raised from %g to %.1f (all %.1f MB of gradients)", bucket_mb, needed, total_mb)
        return needed
    return bucket_mb


def register_compression(ddp: nn.parallel.DistributedDataParallel, compression: str, ratio: float = 0.05,
                         threshold: float = 0.0) -> SparseState | PowerSGD | None:
    """Install the DDP communication hook for ``compression`` (none: DDP's own all-reduce).
    Returns the hook's state for top-k / threshold (it counts the bytes sent) and PowerSGD (a
    checkpoint carries both), else None."""
    if compression in ("topk", "threshold"):
        state = SparseState(compression, ratio=ratio, threshold=threshold)
        ddp.register_comm_hook(state, sparse_hook)
        return state
    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif compression == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif compression == "powersgd":
        state = PowerSGD([p for p in ddp.module.parameters() if p.requires_grad], start_iter=POWERSGD_START_ITER)
        ddp.register_comm_hook(state, powersgd_hook)
        return state
    return None


class PowerSGD:
    """torch's PowerSGD hook (rank 1, after ``POWERSGD_START_ITER`` exact steps) with a state a
    checkpoint can carry, so a resumed run compresses exactly as the uninterrupted one would.

    torch keeps its error feedback and warm-start Q per bucket, laid out as the bucket was; DDP builds
    its buckets again after the first step of every run, so a resumed run's buckets need not be the
    saved run's. This class therefore holds them per parameter whenever the layout is unknown (after
    a load) or changes (a rebuild), and lays them out for each bucket on its next exchange. Q is the
    same on every rank (it is all-reduced); the error is each rank's own."""

    def __init__(self, params: list[torch.Tensor], rank: int = 1, start_iter: int = POWERSGD_START_ITER) -> None:
        self.torch_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                       start_powerSGD_iter=start_iter)
        self.params = params
        self._index = {p: i for i, p in enumerate(params)}
        self._layouts: dict[int, tuple[tuple[int, int, int], ...]] = {}  # bucket -> (param, offset, numel)
        self._errors: dict[int, torch.Tensor] = {}  # per parameter, waiting for its bucket
        self._qs: dict[int, torch.Tensor] = {}

    def q_layout(self, layout) -> list[tuple[int, int, int]]:
        """(parameter, length of its Q, length of its P) for each compressed parameter of a bucket, in
        the order torch's hook lays them out: grouped by matrix shape in order of first appearance."""
        groups = {}
        for i, _, _ in layout:
            n, m, r = self._matrix(i)
            if powerSGD_hook._should_compress(n, m, r, self.torch_state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((i, m * r, n * r))
        return [entry for group in groups.values() for entry in group]

    def q_length(self, i: int) -> int:
        n, m, r = self._matrix(i)
        return m * r

    def _matrix(self, i: int) -> tuple[int, int, int]:
        """Rows, columns and approximation rank of parameter ``i``'s gradient as the hook sees it."""
        p = self.params[i]
        n = p.shape[0] if p.dim() else 1
        m = p.numel() // n
        return n, m, min(n, m, self.torch_state.matrix_approximation_rank)

    def per_parameter(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Every parameter's error and Q held now (views of torch's buffers where laid out)."""
        errors, qs, st = dict(self._errors), dict(self._qs), self.torch_state
        for b, layout in self._layouts.items():
            if b in st.error_dict:
                errors.update({i: st.error_dict[b][off:off + n] for i, off, n in layout})
            if b in st.q_memory_dict:
                q, start = st.q_memory_dict[b], 0
                for i, length, _ in self.q_layout(layout):
                    qs[i] = q[start:start + length]
                    start += length
        return errors, qs

    def exchange(self, bucket):
        layout = tuple((self._index[p], start, n) for p, start, n in bucket_layout(bucket))
        b = bucket.index()
        if self._layouts.get(b) != layout:
            if b in self._layouts:  # DDP rebuilt its buckets: hold everything per parameter
                self.hold(*[{i: t.clone() for i, t in d.items()} for d in self.per_parameter()])
            self._lay_out(b, layout, bucket.buffer())
        return powerSGD_hook.powerSGD_hook(self.torch_state, bucket)

    def hold(self, errors: dict[int, torch.Tensor], qs: dict[int, torch.Tensor]) -> None:
        """Keep ``errors`` / ``qs`` per parameter until each one's bucket next exchanges."""
        st = self.torch_state
        st.error_dict.clear(), st.p_memory_dict.clear(), st.q_memory_dict.clear()
        self._layouts.clear()
        self._errors, self._qs = errors, qs

    def _lay_out(self, b: int, layout, buffer: torch.Tensor) -> None:
        self._layouts[b] = layout
        st = self.torch_state
        if all(i in self._errors for i, _, _ in layout):
            st.error_dict[b] = torch.cat([self._errors.pop(i).reshape(-1) for i, _, _ in layout]).to(buffer)
        q_order = self.q_layout(layout)
        if q_order and all(i in self._qs for i, _, _ in q_order):
            st.q_memory_dict[b] = torch.cat([self._qs.pop(i).reshape(-1) for i, _, _ in q_order]).to(buffer)
            # P is computed afresh from Q at every step: only its space must exist.
            st.p_memory_dict[b] = buffer.new_empty(sum(p_len for _, _, p_len in q_order))


def bucket_layout(bucket) -> list[tuple[torch.Tensor, int, int]]:
    """(parameter, offset, numel) of each gradient in a ``dist.GradBucket``'s flat buffer."""
    base = bucket.buffer().storage_offset()
    return [(p, g.storage_offset() - base, g.numel()) for p, g in zip(bucket.parameters(), bucket.gradients())]


def powersgd_hook(state: PowerSGD, bucket):
    """DDP communication hook: ``state.exchange(bucket)`` (torch's PowerSGD, resumable layout)."""
    return state.exchange(bucket)


class SparseState:
    """What the top-k / threshold hook keeps on each rank between steps: the unsent remainder of
    every parameter's gradient (error feedback) and counters of the bytes this rank contributed.

    The remainder is kept per parameter, not per bucket, because DDP rebuilds its buckets after
    the first step; keyed by parameter it survives that.

    A step whose exchanged gradient is not finite anywhere is skipped by the trainer on every rank;
    its remainder must not be kept, or the non-finite values in it would spoil every later step (and
    the finite ones would carry a discarded gradient). So the remainders from before each step are
    held until the next step begins (or ``remainder_of`` asks), and put back if the step was not
    finite. The choice is made on the device, without a host sync.
    """

    def __init__(self, mode: str, ratio: float = 0.05, threshold: float = 0.0,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if mode not in ("topk", "threshold"):
            raise ValueError(f"sparse mode must be topk or threshold, got {mode!r}")
        self.mode = mode
        self.ratio = ratio  # topk: fraction of each bucket's entries sent
        self.threshold = threshold  # threshold: entries with |g| >= this are sent
        self.process_group = process_group
        self.residuals: dict[torch.Tensor, torch.Tensor] = {}
        self._before: dict[torch.Tensor, torch.Tensor] = {}  # residuals when the open step began
        self._finite: list[torch.Tensor] = []  # per bucket of the open step: was its result all finite
        self._open = False  # a step's buckets are being exchanged (set by the first, cleared by the last)
        self.sent_bytes = 0  # values + indices (+ counts) this rank put into all_gather
        self.dense_bytes = 0  # what a plain all-reduce of the same buckets would have carried
        self.steps = 0

    def remainder_of(self, params: list[torch.Tensor]) -> torch.Tensor:
        """This rank's remainders as one flat tensor in the order of ``params`` (zeros for any not
        yet kept): what a checkpoint stores so that a resumed run sends exactly what it would have."""
        self.settle()
        parts = [self.residuals.get(p, torch.zeros(p.numel(), dtype=p.dtype, device=p.device)).reshape(-1)
                 for p in params]
        return torch.cat(parts) if parts else torch.zeros(0)

    def load_remainder(self, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        self._before, self._finite, self._open = {}, [], False
        offset = 0
        for p in params:
            self.residuals[p] = flat[offset:offset + p.numel()].to(p.device, p.dtype).clone()
            offset += p.numel()

    def begin_step(self) -> None:
        """Settle the last step and remember the remainders as they are (first bucket of a step)."""
        self.settle()
        self._before = dict(self.residuals)
        self._open = True

    def settle(self) -> None:
        """Decide the last completed step: keep its new remainders if every bucket's exchanged result
        was finite, else put back the ones from before it. (A no-op once decided.)"""
        if self._open or not self._finite:
            return
        ok = torch.stack(self._finite).all()
        for p, new in self.residuals.items():
            old = self._before.get(p)
            if old is not new:
                self.residuals[p] = torch.where(ok, new, old if old is not None else torch.zeros_like(new))
        self._before, self._finite = {}, []

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices (int64) of the entries of ``flat`` to send."""
        if self.mode == "threshold":
            # "not below" rather than ">=": NaNs are sent too, so the trainer sees them and skips
            # the step, instead of their staying in the remainder for ever.
            return (~(flat.abs() < self.threshold)).nonzero().squeeze(1)
        k = max(1, math.ceil(self.ratio * flat.numel()))
        if k >= flat.numel():
            return torch.arange(flat.numel(), device=flat.device)
        return torch.topk(flat.abs(), k, sorted=False).indices


def sparse_hook(state: SparseState, bucket):
    """DDP communication hook: sparsified exchange of one bucket (``dist.GradBucket``) with error
    feedback; returns a ``torch.futures.Future[torch.Tensor]``. (Not annotated: DDP compares the
    annotations with the real classes, and this module's are strings.)

    The bucket plus the remainder kept from the last step is the corrected gradient. Its selected
    entries, divided by the world size as DDP's all-reduce does, are all-gathered from every rank
    as values and int32 indices and summed in rank order into the bucket; the rest is kept for the
    next step. With every entry selected (ratio 1) the result equals DDP's all-reduce bit for bit
    on 2 ranks.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if not state._open:
        state.begin_step()
    flat = bucket.buffer()
    layout = bucket_layout(bucket)
    for p, start, n in layout:
        kept = state.residuals.get(p)
        if kept is not None:
            flat[start:start + n].add_(kept)
    index = state.select(flat)
    values = flat[index].div_(world)
    remainder = flat.clone()
    remainder[index] = 0
    for p, start, n in layout:
        state.residuals[p] = remainder[start:start + n]
    index = index.to(torch.int32) if flat.numel() < 2**31 else index

    sent = index.numel()
    if state.mode == "threshold":
        # Counts differ per rank: agree on the largest, pad to it (all_gather needs equal sizes).
        counts = [torch.zeros(1, dtype=torch.int64, device=flat.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([sent], device=flat.device), group=group)
        sizes = [int(c) for c in counts]
        sent = max(sizes)
        values = torch.cat([values, values.new_zeros(sent - values.numel())])
        index = torch.cat([index, index.new_zeros(sent - index.numel())])
        state.sent_bytes += 8
    else:
        sizes = [sent] * world
    state.sent_bytes += sent * (values.element_size() + index.element_size())
    state.dense_bytes += flat.numel() * flat.element_size()
    if bucket.is_last():
        state.steps += 1
        state._open = False

    all_values = [torch.empty_like(values) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    futures = [dist.all_gather(all_values, values, group=group, async_op=True).get_future(),
               dist.all_gather(all_index, index, group=group, async_op=True).get_future()]

    def scatter(_) -> torch.Tensor:
        flat.zero_()
        for v, i, n in zip(all_values, all_index, sizes):
            flat.index_put_((i[:n].long(),), v[:n], accumulate=True)
        state._finite.append(torch.isfinite(flat).all())  # the same on every rank: all saw the same values
        return flat

    return torch.futures.collect_all(futures).then(scatter)


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (one flat tensor per dtype)."""
    tensors = [t.data for t in (*model.parameters(), *model.buffers())]
    for group in _by_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        _scatter_back(flat, group)


def all_reduce_mean(grads: list[torch.Tensor], world_size: int, compression: str = "none") -> None:
    """Average ``grads`` over ranks in place with one all-reduce per dtype (``--no-overlap``).

    Coalescing into one flat tensor costs a copy but turns dozens of small messages into one,
    which is what matters on a slow link. fp16/bf16 compression casts the flat tensor for the wire.
    """
    wire = WIRE_DTYPES[compression]
    for group in _by_dtype(grads):
        flat = torch.cat([g.reshape(-1) for g in group])
        sent = flat.to(wire) if wire is not None else flat
        # Divide before summing (as DDP does) so fp16 sums of large gradients do not overflow.
        sent.div_(world_size)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM)
        _scatter_back(sent.to(flat.dtype) if wire is not None else sent, group)


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` split by dtype, each group in the original order (the same on every rank)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _scatter_back(flat: torch.Tensor, group: list[torch.Tensor]) -> None:
    offset = 0
    for t in group:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
