"""Which strategy a run uses, and what an elastic restart resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cnntrain.config import TrainConfig
from cnntrain.engine.checkpoint import latest_valid
from cnntrain.parallel.base import SingleProcess, Strategy
from cnntrain.parallel.ddp import DDP, AllReduceAfterBackward, SparseDDP
from cnntrain.parallel.env import LaunchEnv, detect_launch
from cnntrain.parallel.partial import PartialUpdate

log = logging.getLogger("cnntrain")


def make_strategy(cfg: TrainConfig, launch: LaunchEnv | None = None) -> Strategy:
    """The synchronous strategy ``cfg`` asks for, in the job the launcher describes."""
    launch = launch or detect_launch()
    if not launch.distributed:
        return SingleProcess(cfg, launch)
    if cfg.partial_update:
        return PartialUpdate(cfg, launch)
    if not cfg.overlap:
        return AllReduceAfterBackward(cfg, launch)
    if cfg.grad_compression in ("topk", "threshold"):
        return SparseDDP(cfg, launch)
    return DDP(cfg, launch)


def resume_for_restart(cfg: TrainConfig, main: bool = True) -> TrainConfig:
    """Under an elastic launcher that may restart workers, the config that continues from the newest
    valid checkpoint in ``--run-dir`` when there is one (``cfg`` itself otherwise). Decided by the
    checkpoint, not by TORCHELASTIC_RESTART_COUNT: a membership change restarts workers without
    bumping it."""
    if cfg.resume or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) <= 0:
        return cfg
    if not cfg.run_dir:
        if main:
            log.warning("elastic restarts are on but --run-dir is not given: a restarted job cannot find "
                        "its checkpoints and starts over; pass --run-dir")
        return cfg
    found = latest_valid(Path(cfg.run_dir) / "checkpoints", quiet=True)
    if found is None:
        return cfg
    if main:
        log.info("elastic launch (restart %s): resuming from %s", os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"),
                 found)
    return cfg.replace(resume="auto")
