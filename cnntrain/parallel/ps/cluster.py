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
from cnntrain.errors import ConfigError

ROLES = ("ps", "chief", "worker", "evaluator")
PS, CHIEF, WORKER, EVALUATOR = range(4)  # role codes on the wire
DEFAULT_START_PORT = 2222  # cifar-tf's examples start their cluster there


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


def _split_host_port(entry: str, option: str, need_port: bool) -> tuple[str, int]:
    entry = entry.strip()
    if entry.startswith("["):  # [v6 address]:port
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        host, port_text = entry, ""
    if not host or (need_port and not port_text):
        raise ConfigError(f"{option}: {entry!r} is not host:port")
    try:
        port = int(port_text) if port_text else 0
    except ValueError:
        raise ConfigError(f"{option}: {entry!r} has no valid port number") from None
    if not 0 <= port < 65536 or (need_port and port == 0):
        raise ConfigError(f"{option}: port {port} in {entry!r} is out of range (1..65535)")
    return host, port


def cluster_from_config(cfg: TrainConfig) -> Cluster:
    """The cluster from ``--ps-hosts``/``--worker-hosts`` or ``--ps-count``/``--worker-count``."""
    if cfg.ps_hosts:
        ps = tuple(_split_host_port(e, "--ps-hosts", True) for e in cfg.ps_hosts.split(",") if e.strip())
    else:
        start = cfg.dist_start_port or DEFAULT_START_PORT
        ps = tuple(("127.0.0.1", start + i) for i in range(cfg.ps_count))
    if cfg.worker_hosts:
        workers = tuple(_split_host_port(e, "--worker-hosts", False)[0]
                        for e in cfg.worker_hosts.split(",") if e.strip())
    else:
        workers = ("127.0.0.1",) * cfg.worker_count
    if not ps or not workers:
        raise ConfigError("--strategy async-ps needs the cluster: --ps-hosts h:p,... and --worker-hosts h,... "
                          "(the chief first), or --ps-count N and --worker-count N for one host")
    if len(set(ps)) != len(ps):
        raise ConfigError(f"--ps-hosts lists an address twice: {cfg.ps_hosts}")
    return Cluster(ps, workers)


def validate_async_ps(cfg: TrainConfig) -> None:
    """Flag combinations of the async-ps section (called from ``config.validate``)."""
    if cfg.strategy != "async-ps":
        given = {"role": cfg.role, "ps_hosts": cfg.ps_hosts, "worker_hosts": cfg.worker_hosts, "ps_count": cfg.ps_count,
                 "worker_count": cfg.worker_count, "evaluator": cfg.evaluator, "max_staleness": cfg.max_staleness >= 0}
        for name, value in given.items():
            if value:
                flag = "--ps" if name == "ps_count" else f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} belongs to --strategy async-ps (add it, or drop {flag})")
        return
    if cfg.ps_hosts and cfg.ps_count:
        raise ConfigError("give the parameter servers once: --ps-hosts or --ps-count, not both")
    if cfg.worker_hosts and cfg.worker_count:
        raise ConfigError("give the workers once: --worker-hosts or --worker-count, not both")
    if cfg.ps_count < 0 or cfg.worker_count < 0:
        raise ConfigError("--ps-count and --worker-count must be positive")
    if cfg.max_staleness < -1:
        raise ConfigError(f"--max-staleness must be >= 0 (or -1: off), got {cfg.max_staleness}")
    unsupported = {"ema_decay": cfg.ema_decay != 0, "lookahead": cfg.lookahead != 0, "sync_bn": cfg.sync_bn,
                   "accum_steps": cfg.accum_steps != 1, "grad_compression": cfg.grad_compression != "none",
                   "partial_update": cfg.partial_update, "profile": cfg.profile != "none"}
    for name, used in unsupported.items():
        if used:
            raise ConfigError(f"--{name.replace('_', '-')} is not supported with --strategy async-ps "
                              f"(it belongs to synchronous training)")
    if not cfg.role:
        return  # the local launcher checks its own counts
    cluster = cluster_from_config(cfg)
    if cfg.role == "ps":
        if cfg.ps_index < 0:
            raise ConfigError(f"--role ps needs --ps-index i (0..{cluster.num_ps - 1})")
        if cfg.ps_index >= cluster.num_ps:
            raise ConfigError(f"--ps-index {cfg.ps_index} is out of range: the cluster has {cluster.num_ps} ps "
                              f"(0..{cluster.num_ps - 1})")
    elif cfg.ps_index >= 0:
        raise ConfigError(f"--ps-index belongs to --role ps, not --role {cfg.role}")
    if cfg.role == "worker":
        if cfg.worker_index < 0:
            raise ConfigError(f"--role worker needs --worker-index i (1..{cluster.num_workers - 1}; "
                              f"worker 0 is the chief)")
        if cfg.worker_index == 0:
            raise ConfigError("--worker-index 0 is the chief: start it with --role chief")
        if cfg.worker_index >= cluster.num_workers:
            raise ConfigError(f"--worker-index {cfg.worker_index} is out of range: the cluster has "
                              f"{cluster.num_workers} workers, the chief included (1..{cluster.num_workers - 1})")
    elif cfg.worker_index >= 0:
        raise ConfigError(f"--worker-index belongs to --role worker, not --role {cfg.role}")


# Options that may differ between the roles of one job (paths, speed, logging, who is who).
_LOCAL_OPTIONS = {"role", "ps_index", "worker_index", "threads", "progress", "display_every", "device", "data_dir",
                  "run_dir", "resume", "workers", "download", "verify", "dist_timeout", "tensorboard", "evaluator",
                  "ps_hosts", "worker_hosts", "ps_count", "worker_count", "dist_start_port", "compile",
                  "pipeline", "deterministic", "save_every", "save_interval", "keep_last", "eval_every"}


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
