"""Who is where in an async-ps job, which parameters each ps holds, which images each worker reads.

The cluster is given once, the same on every process: ``--ps-hosts h:p,...`` and
``--worker-hosts h[:p],...`` (the chief is the first worker), or cifar-tf's ``--ps-count``,
``--worker-count`` and ``--dist-start-port`` for every role on 127.0.0.1. Only the ps listen;
the chief, workers and the evaluator connect out, so a worker's port is accepted and unused and
its host names the interface its connections use.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig

ROLES = ("ps", "chief", "worker", "evaluator")
PS, CHIEF, WORKER, EVALUATOR = range(4)  # role codes on the wire


@dataclass(frozen=True)
class Cluster:
    ps: tuple[tuple[str, int], ...]  # (host, port) of each parameter server
    workers: tuple[str, ...]  # host of each training process; workers[0] is the chief

    @property
    def num_ps(self) -> int:
        return len(self.ps)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def ps_name(self, index: int) -> str:
        host, port = self.ps[index]
        return f"ps {index} ({host}:{port})"


def role_name(role: int, index: int = 0, cluster: Cluster | None = None) -> str:
    """How messages name a process: 'ps 1 (10.0.0.2:2223)', 'the chief (worker 0)', 'worker 2'."""
    if role == PS:
        return cluster.ps_name(index) if cluster and 0 <= index < cluster.num_ps else f"ps {index}"
    if role == CHIEF or (role == WORKER and index == 0):
        return "the chief (worker 0)"
    if role == WORKER:
        return f"worker {index}"
    return "the evaluator"


def cluster_from_config(cfg: TrainConfig) -> Cluster:
    """The cluster from ``--ps-hosts``/``--worker-hosts`` or ``--ps-count``/``--worker-count``."""
    return Cluster(*cfg.async_ps.cluster_addresses())


# Options that may differ between the roles of one job (paths, speed, logging, who is who).
_LOCAL_OPTIONS = {"role", "ps_index", "worker_index", "threads", "progress", "display_every", "device", "data_dir",
                  "run_dir", "resume", "workers", "download", "verify", "dist_timeout", "tensorboard", "evaluator",
                  "ps_hosts", "worker_hosts", "ps_count", "worker_count", "dist_start_port", "compile",
                  "pipeline", "deterministic", "save_every", "save_interval", "keep_last", "eval_every",
                  "cache", "cache_dir", "overwrite", "callbacks", "mlflow", "wandb"}


def config_fingerprint(cfg: TrainConfig) -> int:
    """A number that differs when two roles were given different training options."""
    items = sorted((k, repr(v)) for k, v in cfg.to_dict().items() if k not in _LOCAL_OPTIONS)
    return zlib.crc32(repr(items).encode())


def balance(sizes: list[int], parts: int) -> list[int]:
    """Owner (0..parts-1) of each item: largest first onto the least loaded part (ties: lowest index)."""
    load = [0] * parts
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        part = min(range(parts), key=lambda k: (load[k], k))
        owner[i] = part
        load[part] += sizes[i]
    return owner


@dataclass(frozen=True)
class ShardPlan:
    """Which ps holds each parameter and each state buffer (BatchNorm statistics) of the model.

    Both lists are in the model's own order; every role computes the same plan from the model."""

    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    param_owner: tuple[int, ...]
    buffer_names: tuple[str, ...]
    buffer_shapes: tuple[tuple[int, ...], ...]
    buffer_owner: tuple[int, ...]

    @classmethod
    def for_model(cls, model: nn.Module, num_ps: int) -> ShardPlan:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        state = set(model.state_dict())
        buffers = [(n, b) for n, b in model.named_buffers() if n in state]
        return cls(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params),
                   tuple(balance([p.numel() for _, p in params], num_ps)),
                   tuple(n for n, _ in buffers), tuple(tuple(b.shape) for _, b in buffers),
                   tuple(balance([b.numel() for _, b in buffers], num_ps)))

    def params_of(self, ps: int) -> list[int]:
        return [i for i, o in enumerate(self.param_owner) if o == ps]

    def buffers_of(self, ps: int) -> list[int]:
        return [i for i, o in enumerate(self.buffer_owner) if o == ps]

    def numel_of(self, ps: int) -> int:
        return sum(_numel(self.param_shapes[i]) for i in self.params_of(ps))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def flatten(tensors: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One flat tensor of ``tensors`` in their logical (row-major) order, whatever their layout."""
    if not tensors:
        return torch.empty(0, dtype=dtype)
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy ``flat`` (as written by ``flatten``) back into ``tensors``, in place."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"expected {offset} values, got {flat.numel()}")


def shard_indices(size: int, num_workers: int, worker: int, seed: int) -> torch.Tensor:
    """Training images of ``worker``: a fixed, balanced slice of one seeded permutation, sorted.

    The slices of all workers are disjoint and cover the set; with one worker it is the whole set in
    order, so that worker sees exactly the batches of the synchronous single-process run."""
    if num_workers == 1:
        return torch.arange(size)
    g = torch.Generator().manual_seed(seed * 1000003 + 7919)
    perm = torch.randperm(size, generator=g)
    return torch.tensor_split(perm, num_workers)[worker].sort().values
