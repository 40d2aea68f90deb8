"""The evaluation report a run leaves in ``<run_dir>/eval/``, and the callbacks its options ask for.

At the end of training (rank 0), the evaluation of the weights model.safetensors holds (the last
one, or with ``--early-stop`` the best one) is written as ``eval/confusion.csv``,
``eval/confusion.png``, ``eval/reliability.png`` and ``eval/metrics.json`` (per-class precision /
recall / F1, macro and weighted averages, expected calibration error), and its macro F1, weighted
F1 and ECE go into summary.json. ``cnntrain eval`` writes the same files.
"""

from __future__ import annotations

import logging
from typing import Any

from cnntrain.config import TrainConfig
from cnntrain.engine.callbacks import Callback
from cnntrain.engine.classification_metrics import eval_summary, write_eval_report
from cnntrain.engine.early_stop import EarlyStopping, PlateauSchedule

log = logging.getLogger("cnntrain")


class EvalReport(Callback):
    """Writes ``<run_dir>/eval/`` for the final weights' evaluation (see the module doc)."""

    def __init__(self, early_stop: EarlyStopping | None = None) -> None:
        self.early_stop = early_stop

    def on_train_end(self, loop, summary: dict[str, Any]) -> None:
        result, step = loop.last_eval, loop.state.step
        if self.early_stop is not None and self.early_stop.best_result is not None:
            result, step = self.early_stop.best_result, self.early_stop.monitor.best_step
        if result is None or result.confusion is None:
            return
        figures = eval_summary(result)
        summary.update(figures)
        if loop.is_main:
            write_eval_report(loop.run_dir / "eval", result, loop.data.classes,
                              f"{loop.cfg.dataset} / {loop.cfg.model}, step {step}",
                              extra={"step": step, "split": loop.data.val_name})
            log.info("%s at step %d: macro F1 %.2f%%, weighted F1 %.2f%%, ECE %.2f%% (%s)", loop.data.val_name, step,
                     100 * figures["macro_f1"], 100 * figures["weighted_f1"], 100 * figures["ece"],
                     loop.run_dir / "eval")


def config_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks options ask for: ``--early-stop``, ``--lr-schedule plateau``, and the report."""
    early = EarlyStopping(cfg.early_stop, cfg.early_stop_metric, cfg.early_stop_min_delta) if cfg.early_stop else None
    out: list[Callback] = [early] if early else []
    if cfg.lr_schedule == "plateau":
        out.append(PlateauSchedule(cfg.plateau_patience, cfg.lr_gamma, cfg.early_stop_metric, cfg.early_stop_min_delta,
                                   cfg.lr_final))
    return [*out, EvalReport(early)]
