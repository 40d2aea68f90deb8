"""``cnntrain train --nproc-per-node N``: start N local workers through torch's own elastic
launcher (the code behind ``torchrun``), each running ``cnntrain train`` without the launcher flags.

    cnntrain train --nproc-per-node 2 --dataset mnist -n lenet
    cnntrain train --nproc-per-node 2 --max-restarts 3 --run-dir runs/a ...      # restarts resume
    cnntrain train --nproc-per-node 1 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 ...  # node 0

One node: a c10d rendezvous on a free local port (``torchrun --standalone``). Several nodes: the
static rendezvous at ``--master-addr:--master-port`` with ``--node-rank``.
"""

from __future__ import annotations

import argparse
import os

from cnntrain.errors import ConfigError, DistributedError

# Flags the launcher consumes; the workers must not see them (they would launch again).
LAUNCH_FLAGS = frozenset({"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                          "--max-restarts"})


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    """Launcher flags of ``cnntrain train`` (not part of the training config)."""
    group = parser.add_argument_group("launch (start processes here instead of under torchrun/mpirun)")
    group.add_argument("--nproc-per-node", type=int, default=0,
                       help="start this many worker processes on this node through torch's elastic launcher")
    group.add_argument("--nnodes", type=int, default=1, help="nodes in the job (with --nproc-per-node)")
    group.add_argument("--node-rank", type=int, default=0, help="this node's index (with --nnodes > 1)")
    group.add_argument("--master-addr", default=None,
                       help="rendezvous host: node 0's address (default: the launcher's, else 127.0.0.1)")
    group.add_argument("--master-port", type=int, default=None,
                       help="rendezvous port (default: the launcher's, else 29500)")
    group.add_argument("--max-restarts", type=int, default=0,
                       help="restart failed workers this many times; restarts resume from --run-dir's newest "
                            "valid checkpoint")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without the launcher flags and their values (``--flag v`` and ``--flag=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def torchrun_argv(worker_argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                  master_addr: str | None = None, master_port: int | None = None,
                  max_restarts: int = 0) -> list[str]:
    """Arguments for ``torch.distributed.run`` that start ``python -m cnntrain <worker_argv>``."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes or max_restarts < 0:
        raise ConfigError(f"bad launch: --nproc-per-node {nproc} --nnodes {nnodes} --node-rank {node_rank} "
                          f"--max-restarts {max_restarts} (need >= 1, >= 1, 0..nnodes-1, >= 0)")
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts)]
    if nnodes == 1 and master_addr is None and master_port is None:
        argv.append("--standalone")  # c10d rendezvous on a free local port
    else:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                 "--master-addr", master_addr or "127.0.0.1", "--master-port", str(master_port or 29500)]
    return [*argv, "-m", "cnntrain", *worker_argv]


def launch_local(worker_argv: list[str], **options) -> int:
    """Run the workers under torch's elastic agent and wait; 0 when all finished.

    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the agent's store shared, restarted workers
    read stale gloo addresses and scale-up deadlocks (torch 2.14, every trial); a store per
    rendezvous round fixed both.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_argv(worker_argv, **options))
    previous = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # read by the agent here and by the workers
    try:
        run(args)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) exit code {f.exitcode}"
                             for rank, f in sorted(exc.failures.items()))
        raise DistributedError(f"worker processes failed after {options.get('max_restarts', 0)} restarts: "
                               f"{failures}; their errors are printed above") from None
    finally:
        if previous is None:  # the Python API may call this in a long-lived process
            del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = previous
    return 0
