"""Where this process stands in a job: rank, world size and rendezvous, from whichever launcher
started it (torchrun, Open MPI, MPICH/Intel MPI (PMI), SLURM), or a single process. The one place
that reads launcher variables."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | torchrun | openmpi | pmi | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: dict, *names: str, default: int | None = None) -> int | None:
    for name in names:
        if name in env and env[name] != "":
            return int(env[name])
    return default


def detect_launch(env: dict | None = None, master_addr: str | None = None,
                  master_port: int | None = None) -> LaunchEnv:
    """Read the launcher's variables; ``master_addr``/``master_port`` override what it gives."""
    env = dict(os.environ if env is None else env)
    addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    port = master_port or _int(env, "MASTER_PORT", default=29500)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
        return LaunchEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", default=0),
                         _int(env, "LOCAL_WORLD_SIZE", default=1), addr, port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1), addr, port, "openmpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH, Intel MPI (Hydra)
        return LaunchEnv(_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"),
                         _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0),
                         _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1), addr, port, "pmi")
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", default=1) > 1:
        if not (master_addr or env.get("MASTER_ADDR")):
            addr = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "")) or addr
        ntasks = _int(env, "SLURM_NTASKS")
        nnodes = _int(env, "SLURM_NNODES", default=1)
        return LaunchEnv(_int(env, "SLURM_PROCID"), ntasks, _int(env, "SLURM_LOCALID", default=0),
                         max(ntasks // max(nnodes, 1), 1), addr, port, "slurm")
    return LaunchEnv(master_addr=addr, master_port=port)


def first_slurm_host(nodelist: str) -> str | None:
    """First host of a SLURM node list such as ``node[03-05,7],gpu1`` -> ``node03``."""
    if not nodelist:
        return None
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


# Variables by which each launcher marks its worker processes.
_LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def is_launcher_child(env: dict | None = None) -> bool:
    """Whether this process is already a worker of some launcher (torchrun, mpirun, srun with
    several tasks): it must not launch workers again."""
    env = os.environ if env is None else env
    return any(k in env for k in _LAUNCHER_MARKS) or ("RANK" in env and "WORLD_SIZE" in env) or \
        ("SLURM_PROCID" in env and (_int(env, "SLURM_NTASKS", default=1) or 1) > 1)
