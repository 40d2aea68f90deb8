"""Asynchronous parameter-server training (``--strategy async-ps``): ps, chief, worker, evaluator.

    cnntrain train --strategy async-ps --ps 2 --workers 3 --evaluator --dataset cifar10 -n simplecnn
    cnntrain train --strategy async-ps --role ps --ps-index 0 --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role chief --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role worker --worker-index 1 --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role evaluator --ps-hosts a:2222,b:2222 --worker-hosts c,d

``cluster`` (who is where, parameter and data shards), ``transport`` (messages on c10d),
``protocol`` (the requests), ``server`` (the ps), ``client`` (links to the ps), ``worker`` (the
training loop of the chief and the workers), ``chief`` (run folder, checkpoints, logs),
``evaluator``, ``launch`` (every role on this machine). The messages carry tensors and numbers
only, and nothing checks who connects: run it on a trusted network only.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from cnntrain.config import TrainConfig, validate
from cnntrain.errors import ConfigError

if TYPE_CHECKING:
    from cnntrain.engine.trainer import Result

log = logging.getLogger("cnntrain")


def _label_logs(label: str) -> None:
    """Prefix this process's log lines with its role: many roles share one terminal."""
    from cnntrain.engine.progress import setup_logging

    setup_logging()
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"[{label}] %(message)s"))


def run_async_ps(cfg: TrainConfig) -> Result | None:
    """Run this process's ``--role``, or without one every role on this machine.

    Returns the run's Result for the chief and the local launcher, None for the other roles."""
    from cnntrain.parallel.ps.cluster import cluster_from_config

    if not cfg.role:
        from cnntrain.engine.progress import setup_logging
        from cnntrain.parallel.launch import is_launcher_child
        from cnntrain.parallel.ps.launch import launch_local, read_result

        if is_launcher_child():
            raise ConfigError("--strategy async-ps starts its own processes: do not run it under torchrun/mpirun "
                              "(or give each process its --role)")
        return read_result(launch_local(cfg, setup_logging))
    cluster = cluster_from_config(cfg)
    if cfg.role == "ps":
        from cnntrain.parallel.ps.server import run_ps

        _label_logs(f"ps {cfg.ps_index}")
        run_ps(cfg, cluster)
        return None
    if cfg.role in ("chief", "worker"):
        from cnntrain.parallel.ps.worker import run_trainer

        _label_logs("chief" if cfg.role == "chief" else f"worker {cfg.worker_index}")
        return run_trainer(cfg, cluster)
    from cnntrain.parallel.ps.evaluator import run_evaluator

    _label_logs("evaluator")
    run_evaluator(cfg, cluster)
    return None


def train_async_ps(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """``cnntrain train --strategy async-ps ...``: the CLI's checks, then :func:`run_async_ps`."""
    if getattr(args, "nproc_per_node", 0):
        raise ConfigError("--nproc-per-node belongs to synchronous training; --strategy async-ps starts its own "
                          "processes: use --ps N --workers N on one host, or --role on each process")
    if getattr(args, "master_addr", None) or getattr(args, "master_port", None):
        raise ConfigError("--master-addr/--master-port belong to synchronous training; --strategy async-ps takes "
                          "its addresses from --ps-hosts (or --dist-start-port)")
    if not cfg.role and getattr(args, "workers", None) is not None and not (cfg.worker_count or cfg.worker_hosts):
        # `--ps 2 --workers 3`: on the all-roles-here command --workers counts training processes
        # (cifar-tf's --worker-count); DataLoader workers keep their default.
        cfg.worker_count, cfg.workers = cfg.workers, TrainConfig.workers
        validate(cfg)
    run_async_ps(cfg)
    return 0
