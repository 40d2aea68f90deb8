"""Early stopping and reduce-on-plateau: callbacks watching one validation metric.

    cnntrain train ... --early-stop 5 --early-stop-metric f1 --early-stop-min-delta 0.002
    cnntrain train ... --lr-schedule plateau --plateau-patience 2 --lr-gamma 0.1

``EarlyStopping`` (Keras / Lightning's): after each evaluation, a value better than the best so far
by more than ``min_delta`` is an improvement, and its weights are kept (on the CPU); ``patience``
evaluations in a row without one end the run through ``loop.request_stop``. Whether or not it
stopped, the run's model.safetensors then holds the best evaluation's weights.

``PlateauSchedule`` (torch's ReduceLROnPlateau, ``mode="min"/"max"``, absolute threshold, no
cooldown): more than ``patience`` evaluations in a row without improvement multiply the LR by
``factor`` (``--lr-gamma``), never below ``--lr-final`` times the peak LR. The LR is the schedule's
(warm-up, then constant) times ``loop.lr_factor``.

Both keep their state (best value, evaluations without improvement, the kept weights, the LR factor)
in every checkpoint under ``payload["callbacks"]``, so a resumed run decides exactly as an
uninterrupted one. Every rank holds the same evaluation (summed over ranks), so every rank decides alike.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch

from cnntrain.engine.callbacks import Callback
from cnntrain.engine.classification_metrics import macro_f1
from cnntrain.engine.evaluate import EvalResult
from cnntrain.engine.run import unwrap
from cnntrain.errors import ConfigError

log = logging.getLogger("cnntrain")

HIGHER_IS_BETTER = {"loss": False, "top1": True, "top5": True, "f1": True}
METRIC_NAMES = {"loss": "loss", "top1": "top-1", "top5": "top-5", "f1": "macro F1"}


def metric_value(result: EvalResult, metric: str) -> float:
    """The watched value of an evaluation: loss, top1, top5 (fractions) or f1 (macro F1)."""
    if metric == "f1":
        return macro_f1(result)
    return {"loss": result.loss, "top1": result.top1, "top5": result.top5}[metric]


class Monitor:
    """Best value so far and evaluations since it; ``update`` says whether a value improves on it."""

    def __init__(self, metric: str, min_delta: float = 0.0) -> None:
        if metric not in HIGHER_IS_BETTER:
            raise ConfigError(f"unknown metric {metric!r}: one of {', '.join(HIGHER_IS_BETTER)}")
        self.metric, self.min_delta, self.higher = metric, min_delta, HIGHER_IS_BETTER[metric]
        self.best = -math.inf if self.higher else math.inf
        self.bad = 0  # evaluations in a row without improvement
        self.best_step = -1

    def update(self, value: float, step: int) -> bool:
        better = value > self.best + self.min_delta if self.higher else value < self.best - self.min_delta
        if better:
            self.best, self.bad, self.best_step = value, 0, step
        else:
            self.bad += 1
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "bad": self.bad, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad, self.best_step = float(state["best"]), int(state["bad"]), int(state["best_step"])

    def describe(self) -> str:
        return f"{METRIC_NAMES[self.metric]} {self.best:.4f} at step {self.best_step}"


def _require_eval(loop, what: str) -> None:
    if loop.val_loader is None:
        raise ConfigError(f"{what} watches a validation metric, but {loop.cfg.dataset} has no held-out split here: "
                          f"add --val-split N (images held out of the training set)")


class EarlyStopping(Callback):
    """Stop after ``patience`` evaluations without improvement; model.safetensors gets the best weights."""

    key = "early_stop"

    def __init__(self, patience: int, metric: str = "loss", min_delta: float = 0.0) -> None:
        self.patience, self.monitor = patience, Monitor(metric, min_delta)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_result: EvalResult | None = None
        self.triggered = False

    def on_train_start(self, loop) -> None:
        _require_eval(loop, "--early-stop")

    def on_eval_end(self, loop, result: EvalResult) -> None:
        step = loop.state.step
        if self.monitor.update(metric_value(result, self.monitor.metric), step):
            model = unwrap(loop.eval_model)
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_result = result
        elif self.monitor.bad >= self.patience:
            self.triggered = True
            loop.request_stop(f"early stopping: validation {METRIC_NAMES[self.monitor.metric]} has not improved "
                              f"by more than {self.monitor.min_delta:g} in {self.monitor.bad} evaluations (best "
                              f"{self.monitor.describe()})")

    def on_save_checkpoint(self, loop, payload: dict[str, Any], path) -> None:
        payload.setdefault("callbacks", {})[self.key] = {
            **self.monitor.state_dict(), "triggered": self.triggered, "weights": self.best_weights,
            "result": asdict(self.best_result) if self.best_result is not None else None}

    def on_load_checkpoint(self, loop, payload: dict[str, Any]) -> None:
        state = (payload.get("callbacks") or {}).get(self.key)
        if not state:
            return
        if state["metric"] != self.monitor.metric:
            log.warning("the checkpoint's early stopping watched %s, this run watches %s: starting its count afresh",
                        state["metric"], self.monitor.metric)
            return
        self.monitor.load_state_dict(state)
        self.triggered = bool(state.get("triggered"))
        self.best_weights = state.get("weights")
        self.best_result = EvalResult(**state["result"]) if state.get("result") else None

    def on_train_end(self, loop, summary: dict[str, Any]) -> None:
        if self.best_weights is None:
            return
        unwrap(loop.eval_model).load_state_dict(self.best_weights)
        summary["best_weights"] = {"metric": self.monitor.metric, "value": self.monitor.best,
                                   "step": self.monitor.best_step, "early_stopped": self.triggered}
        if loop.is_main:
            log.info("%s; model.safetensors holds the weights of the best evaluation (%s)",
                     "stopped early" if self.triggered else "early stopping did not trigger",
                     self.monitor.describe())


class PlateauSchedule(Callback):
    """``--lr-schedule plateau``: the LR times ``factor`` after more than ``patience`` evaluations without
    improvement, down to ``min_factor`` (``--lr-final``)."""

    key = "plateau"

    def __init__(self, patience: int, factor: float, metric: str = "loss", min_delta: float = 0.0,
                 min_factor: float = 0.0) -> None:
        self.patience, self.factor, self.min_factor = patience, factor, min_factor
        self.monitor = Monitor(metric, min_delta)
        self.lr_factor = 1.0

    def on_train_start(self, loop) -> None:
        _require_eval(loop, "--lr-schedule plateau")
        loop.lr_factor = self.lr_factor

    def on_eval_end(self, loop, result: EvalResult) -> None:
        self.monitor.update(metric_value(result, self.monitor.metric), loop.state.step)
        if self.monitor.bad > self.patience:
            reduced = max(self.lr_factor * self.factor, self.min_factor)
            if reduced < self.lr_factor and loop.is_main:
                log.info("plateau: validation %s has not improved in %d evaluations (best %s); LR x %g -> %g",
                         METRIC_NAMES[self.monitor.metric], self.monitor.bad, self.monitor.describe(), self.factor,
                         loop.base_lr * reduced)
            self.lr_factor, self.monitor.bad = reduced, 0
        loop.lr_factor = self.lr_factor

    def on_save_checkpoint(self, loop, payload: dict[str, Any], path) -> None:
        payload.setdefault("callbacks", {})[self.key] = {**self.monitor.state_dict(), "lr_factor": self.lr_factor}

    def on_load_checkpoint(self, loop, payload: dict[str, Any]) -> None:
        state = (payload.get("callbacks") or {}).get(self.key)
        if state:
            self.monitor.load_state_dict(state)
            self.lr_factor = float(state["lr_factor"])
            loop.lr_factor = self.lr_factor
