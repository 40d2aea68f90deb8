"""``cnntrain eval --watch RUN_DIR``: score each new checkpoint of a (running) run once.

    cnntrain train --dataset imagenet ... --run-dir runs/r50 &
    cnntrain eval --watch runs/r50 --device cuda        # on another GPU or machine sharing the folder

Each checkpoint ``checkpoints/step-*.pt`` is scored once it verifies against its manifest (a
half-written one is retried at the next poll); a row with split ``eval`` is appended to the run's
``metrics.csv``. The watcher exits when ``summary.json`` appears (the run has finished) and every
checkpoint has had its chance (a corrupt one is reported, not retried for ever), or after
``timeout`` seconds without a new checkpoint.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.evaluate import EvalResult
from cnntrain.engine.metrics import COLUMNS
from cnntrain.errors import CheckpointError

log = logging.getLogger("cnntrain")


def _append_row(path: Path, **row: Any) -> None:
    # One short append per row: O_APPEND keeps it whole even while the trainer appends its own rows.
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([row.get(c, "") for c in COLUMNS])


def watch(run_dir: str | Path, *, poll: float = 10.0, timeout: float = 0.0,
          on_result: Callable[[int, EvalResult], None] | None = None, **overrides: Any) -> list[tuple[int, EvalResult]]:
    """Score every checkpoint of ``run_dir`` as it appears; returns (step, result) in step order.

    ``overrides`` go to :func:`cnntrain.api.evaluate` (``data_dir=``, ``batch_size=``, ``device=``).
    ``timeout`` (seconds, 0: none) ends the watch when no new checkpoint came for that long.
    """
    from cnntrain.api import evaluate

    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    done: dict[int, EvalResult] = {}
    last_new = time.monotonic()
    while True:
        finished = (run_dir / "summary.json").is_file()  # read before listing: no checkpoint missed
        for step, path in ckpt.list_checkpoints(folder):
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
                _append_row(run_dir / "metrics.csv", step=step, split="eval", loss=f"{result.loss:.6g}",
                            top1_err=f"{result.top1_err:.6g}", top5_err=f"{result.top5_err:.6g}")
            if on_result is not None:
                on_result(step, result)
        if finished:  # summary.json came before this pass, so the pass saw the final checkpoints
            left = [str(p) for s, p in ckpt.list_checkpoints(folder) if s not in done]
            if left:
                log.warning("run finished; %d checkpoint(s) could not be scored: %s", len(left), ", ".join(left))
            break
        if timeout and time.monotonic() - last_new > timeout:
            log.warning("no new checkpoint in %s for %.0f s; stopping the watch", folder, timeout)
            break
        time.sleep(poll)
    return sorted(done.items())
