"""``cnntrain eval --watch RUN_DIR``: score each new checkpoint of a (running) run once.

    cnntrain train --dataset imagenet ... --run-dir runs/r50 &
    cnntrain eval --watch runs/r50 --device cuda        # on another GPU or machine sharing the folder
    cnntrain eval --watch runs/r50 --timeout 3600       # give up (exit 1) after an hour with nothing new

Each checkpoint ``checkpoints/step-*.pt`` is scored once it verifies against its manifest (a
half-written one is retried at the next poll); a row with split ``eval`` is appended to the run's
``metrics.csv`` unless one for that step is there already (a second watcher, or a restarted one).
The watcher exits (status 0) when the run has finished, that is when ``summary.json`` is there and
not older than the newest checkpoint (one older than that is from before a resume), and every
checkpoint has had its chance (a corrupt one is reported, not retried for ever). With ``timeout``
it stops with a WatchTimeout (status 1) when no new checkpoint came for that long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnntrain.api import evaluate
from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import EvalResult
from cnntrain.engine.metrics import WATCHER_SPLIT, append_row_once
from cnntrain.errors import CheckpointError

log = logging.getLogger("cnntrain")


class WatchTimeout(CheckpointError):
    """No new checkpoint for ``timeout`` seconds and the run has not finished. ``scored`` holds what
    the watch scored before giving up, as ``watch`` would have returned it."""

    def __init__(self, message: str, scored: list[tuple[int, EvalResult]]) -> None:
        super().__init__(message)
        self.scored = scored


def run_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has finished: ``summary.json`` exists and is not older than any
    checkpoint. A summary older than a checkpoint belongs to an earlier end of a run resumed since."""
    try:
        written = (run_dir / "summary.json").stat().st_mtime_ns
    except OSError:
        return False
    for _, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        try:
            if path.stat().st_mtime_ns > written:
                return False
        except OSError:  # pruned meanwhile
            continue
    return True


def watch(run_dir: str | Path, *, poll: float = 10.0, timeout: float = 0.0,
          on_result: Callable[[int, EvalResult], None] | None = None, **overrides: Any) -> list[tuple[int, EvalResult]]:
    """Score every checkpoint of ``run_dir`` as it appears; returns (step, result) in step order once
    the run has finished.

    ``overrides`` go to :func:`cnntrain.api.evaluate` (``data_dir=``, ``batch_size=``, ``device=``).
    ``timeout`` (seconds, 0: none): raise WatchTimeout when no new checkpoint appeared for that long
    and the run has not finished.
    """

    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    done: dict[int, EvalResult] = {}
    seen: set[int] = set()
    last_new = time.monotonic()
    while True:
        finished = run_finished(run_dir)  # decided before listing: no checkpoint missed
        for step, path in ckpt.list_checkpoints(folder):
            if step not in seen:
                seen.add(step)
                last_new = time.monotonic()
            if step in done:
                continue
            try:
                ckpt.verify_checkpoint(path)
                result = evaluate(path, **overrides)
            except CheckpointError as exc:  # still being written, or pruned meanwhile: next poll
                log.debug("not yet: %s", exc)
                continue
            done[step] = result
            last_new = time.monotonic()
            if (run_dir / "metrics.csv").is_file():
                append_row_once(run_dir / "metrics.csv", step=step, split=WATCHER_SPLIT, loss=f"{result.loss:.6g}",
                                top1_err=f"{result.top1_err:.6g}", top5_err=f"{result.top5_err:.6g}")
            if on_result is not None:
                on_result(step, result)
        if finished:  # the run ended before this pass, so the pass saw its final checkpoints
            left = [str(p) for s, p in ckpt.list_checkpoints(folder) if s not in done]
            if left:
                log.warning("run finished; %d checkpoint(s) could not be scored: %s", len(left), ", ".join(left))
            break
        if timeout and time.monotonic() - last_new > timeout:
            raise WatchTimeout(f"no new checkpoint in {folder} for {timeout:g} s and the run has not finished "
                               f"(no summary.json newer than its checkpoints): stopped watching after scoring "
                               f"{len(done)} checkpoint(s)", sorted(done.items()))
        time.sleep(poll)
    return sorted(done.items())
