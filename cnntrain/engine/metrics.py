"""metrics.csv (one row per logged step and per evaluation), summary.json, and the training window
summed on the device between log lines."""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import ConfigError

COLUMNS = ["step", "epoch", "split", "loss", "top1_err", "top5_err", "lr", "img_per_s", "elapsed_s",
           "loss_scale", "grad_norm"]
# Rows of this split come from ``cnntrain eval --watch`` or the async evaluator, which score saved
# checkpoints; a resumed run does not write them again, so they survive its truncation.
WATCHER_SPLIT = "eval"


@contextmanager
def metrics_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (flock) while rewriting ``path`` or appending to it after a check.

    The lock is a file of its own because a rewrite replaces ``metrics.csv``: a lock on the old file
    would not be seen by whoever opens the new one. The trainer's plain appends need no lock.
    """
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def append_row_once(path: Path, **row: Any) -> bool:
    """Append ``row`` to ``path`` unless a row of the same step and split is there already (two
    watchers scoring one checkpoint write it once); returns whether it was appended."""
    with metrics_lock(path):
        step, split = str(row["step"]), str(row["split"])
        if any(r["step"] == step and r["split"] == split for r in read_metrics(path)):
            return False
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in COLUMNS])
        return True


class MetricsLog:
    """Appends rows to ``metrics.csv``; on resume, drops the rows the run wrote after the checkpoint's
    step (it writes them again) and keeps the ``eval`` rows a watcher appended meanwhile.

    With ``tensorboard_dir`` every numeric value of every row is also a TensorBoard scalar
    ``<split>/<column>`` at its step, so the CSV and TensorBoard never disagree.
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'cnntrain[tensorboard]'")\
                    from None
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)
        with metrics_lock(path):  # a watcher's check-then-append never straddles the rewrite
            if resume_step is None or not path.exists():
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(COLUMNS)
            else:
                self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        rows = [r for r in read_metrics(self.path) if int(r["step"]) <= step or r["split"] == WATCHER_SPLIT]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, **row: Any) -> None:
        values = [_fmt(row.get(c, "")) for c in COLUMNS]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
            f.flush()
        if self.tb is not None:
            for column in COLUMNS[3:]:
                value = row.get(column)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{row['split']}/{column}", value, row["step"])

    def add_images(self, tag: str, images, step: int) -> None:
        """A grid of sample images (float, any range) in TensorBoard, when it is on."""
        if self.tb is not None:
            lo, hi = images.amin(), images.amax()
            self.tb.add_images(tag, (images.float() - lo) / (hi - lo + 1e-8), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False))
    os.replace(tmp, path)


class TrainWindow:
    """Training loss/accuracy summed on the device between log lines (no per-step host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.started = time.perf_counter()
        self.data_seconds = 0.0
        self.paused = 0.0  # seconds spent evaluating / saving inside the window, not training

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One (micro-)batch's mean loss and predictions."""
        n = labels.shape[0]
        if labels.dim() == 2:  # soft targets (--mixup / --cutmix): the class with the largest share
            labels = labels.argmax(dim=1)
        correct = (logits.argmax(dim=1) == labels).sum()
        self.sums += torch.stack([loss.detach().double() * n, correct.double(),
                                  torch.tensor(float(n), dtype=torch.float64, device=self.sums.device)])

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm += grad_norm.detach().double()
        self.steps += 1

    def reset(self) -> None:
        """Start a new window (after a log line)."""
        self.sums.zero_()
        self.grad_norm.zero_()
        self.steps = 0
        self.data_seconds = 0.0
        self.paused = 0.0
        self.started = time.perf_counter()

    def state(self, all_reduce_sum=None) -> dict:
        """The partial window; with several ranks, ``all_reduce_sum`` folds every rank's sums into it
        (a collective: every rank must call this), so that rank 0 alone can carry them on resume."""
        sums = all_reduce_sum(self.sums.clone()) if all_reduce_sum is not None else self.sums
        return {"sums": sums.cpu(), "grad_norm": self.grad_norm.cpu(), "steps": self.steps}

    def load(self, state: dict, *, with_sums: bool = True) -> None:
        self.sums.copy_(state["sums"] if with_sums else torch.zeros_like(state["sums"]))
        self.grad_norm.copy_(state["grad_norm"])
        self.steps = int(state["steps"])
