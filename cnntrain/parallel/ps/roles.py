"""Which role this process plays in an async-ps job, and the CLI's entry to it."""

from __future__ import annotations

import argparse
import logging

from cnntrain.config import TrainConfig
from cnntrain.engine.progress import setup_logging
from cnntrain.engine.run import Result
from cnntrain.errors import ConfigError
from cnntrain.parallel.env import is_launcher_child
from cnntrain.parallel.ps.cluster import cluster_from_config
from cnntrain.parallel.ps.evaluator import run_evaluator
from cnntrain.parallel.ps.launch import launch_local, read_result
from cnntrain.parallel.ps.server import run_ps
from cnntrain.parallel.ps.worker import run_trainer

log = logging.getLogger("cnntrain")


def _label_logs(label: str) -> None:
    """Prefix this process's log lines with its role: many roles share one terminal."""
    setup_logging()
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"[{label}] %(message)s"))


def run_async_ps(cfg: TrainConfig) -> Result | None:
    """Run this process's ``--role``, or without one every role on this machine.

    Returns the run's Result for the chief and the local launcher, None for the other roles."""
    if not cfg.role:
        if is_launcher_child():
            raise ConfigError("--strategy async-ps starts its own processes: do not run it under torchrun/mpirun "
                              "(or give each process its --role)")
        return read_result(launch_local(cfg, setup_logging))
    cluster = cluster_from_config(cfg)
    if cfg.role == "ps":
        _label_logs(f"ps {cfg.ps_index}")
        run_ps(cfg, cluster)
        return None
    if cfg.role in ("chief", "worker"):
        _label_logs("chief" if cfg.role == "chief" else f"worker {cfg.worker_index}")
        return run_trainer(cfg, cluster)
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
    run_async_ps(cfg)
    return 0
