"""``--role evaluator``: score each new checkpoint of the run exactly once, over every test image.

    cnntrain train --strategy async-ps --role evaluator --ps-hosts h:2222 --worker-hosts a,b ...

It links to ps 0 only: to learn the run folder (``--run-dir``, or the chief's default named by the
chief's clock), to say which checkpoint it has scored (the chief keeps unscored ones), and to know
when the chief has finished or the job has failed. Checkpoints are read from the run folder, so
the evaluator must see it (same machine or a shared file system). A row with split ``eval`` per
checkpoint is appended to ``metrics.csv``; after the chief finishes it scores what is left and
exits (also when the run had already finished before it could connect).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.datasets import load_data
from cnntrain.data.loaders import build_eval_loader
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import evaluate
from cnntrain.engine.metrics import append_row_once
from cnntrain.engine.run import resolve_run_dir
from cnntrain.engine.trainer import build_model
from cnntrain.errors import CheckpointError, ConfigError
from cnntrain.hardware import pick_device, usable_cores, with_resolved_precision
from cnntrain.models import get_spec
from cnntrain.parallel.ps.client import PsClient, run_finished
from cnntrain.parallel.ps.cluster import EVALUATOR, Cluster
from cnntrain.parallel.ps.transport import GaveUp

log = logging.getLogger("cnntrain")
POLL_SECONDS = 0.5


class _Scorer:
    """Scores the checkpoints of one run folder, each once, in step order."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.data = load_data(cfg, input_size=get_spec(cfg.model).input_size)
        if self.data.val is None:
            raise ConfigError(f"--role evaluator: data set {cfg.dataset} has no test split to score (use --val-split)")
        self.model = build_model(cfg, self.data).to(device)
        self.loader = build_eval_loader(cfg, self.data.val, device, self.data.mean, self.data.std)
        self.done: dict[int, float] = {}

    def score_new(self, run_dir: Path) -> list[int]:
        """Score the checkpoints not scored yet; stop at one still being written (keeps the order)."""
        scored = []
        for step, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
            if step in self.done:
                continue
            try:
                state = ckpt.load_checkpoint(path)
            except CheckpointError as exc:
                if not path.exists():  # pruned meanwhile (only when the evaluator joined late)
                    continue
                if not self._written_after(run_dir, step):
                    log.debug("not yet: %s", exc)
                    break  # still being written: score it on the next pass
                # A later checkpoint is complete, so this one never will be: skip it (the chief keeps
                # every checkpoint the evaluator has not scored, so waiting would fill the disk).
                log.warning("evaluator: skipping %s", exc)
                self.done[step] = float("nan")
                scored.append(step)
                continue
            self.model.load_state_dict(state["model"])
            result = evaluate(self.model, self.loader.iterate(0), self.data.num_classes, precision=self.cfg.precision,
                              device=self.device, tta_flip=self.cfg.tta_flip, tta_translate=self.cfg.tta_translate)
            self.done[step] = result.top1
            append_row_once(run_dir / "metrics.csv", step=step, epoch=f"{state.get('epoch', 0):.6g}", split="eval",
                            loss=f"{result.loss:.6g}", top1_err=f"{result.top1_err:.6g}",
                            top5_err=f"{result.top5_err:.6g}", elapsed_s=f"{state.get('elapsed', 0):.6g}")
            log.info("evaluator: update %d (epoch %.2f): top-1 %.2f%% +- %.2f, loss %.4f (%d images)", step,
                     state.get("epoch", 0), 100 * result.top1, 100 * result.top1_stderr, result.loss, result.count)
            scored.append(step)
        return scored

    @staticmethod
    def _written_after(run_dir: Path, step: int) -> bool:
        """Whether a checkpoint after ``step`` is complete (checkpoints are written in step order)."""
        for later, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
            if later > step:
                try:
                    ckpt.verify_checkpoint(path)
                    return True
                except CheckpointError:
                    continue
        return False


def run_evaluator(cfg: TrainConfig, cluster: Cluster) -> list[tuple[int, float]]:
    """Score checkpoints until the chief finishes; returns (step, top-1) of each, in step order."""
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or usable_cores())
    client = PsClient(cfg, cluster, EVALUATOR, 0, ps_indices=[0])  # its HELLO carries the options as given
    cfg = with_resolved_precision(cfg, device)
    try:
        client.connect(stop=run_finished(cfg))
    except GaveUp:
        log.info("evaluator: the run finished before the evaluator could connect; scoring its checkpoints")
        scorer = _Scorer(cfg, device)
        scorer.score_new(resolve_run_dir(cfg, 0))
        return sorted(scorer.done.items())
    finished = False
    try:
        scorer = _Scorer(cfg, device)
        run_dir = resolve_run_dir(cfg, client.wait_for_stamp(POLL_SECONDS))
        log.info("evaluator: scoring each new checkpoint in %s on %d %s images", run_dir / "checkpoints",
                 len(scorer.data.val), scorer.data.val_name)
        while True:
            over = client.stats().finished  # read before listing: the last pass sees every checkpoint
            for step in scorer.score_new(run_dir):
                if not over:  # once the chief is done nothing is pruned any more
                    client.scored(step)
            if over:
                finished = True
                return sorted(scorer.done.items())
            time.sleep(POLL_SECONDS)
    finally:
        client.close(goodbye=finished)
