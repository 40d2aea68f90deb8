"""The training loop: steps, and at the right steps a log line, an evaluation, a checkpoint.

    loop = TrainLoop(...)   # built by engine/trainer.py from a config and a strategy
    loop.run()

Which steps log, evaluate and save is the ``Cadence``'s decision, a pure function of the step
(plus ``--save-interval``'s clock, read on rank 0 and agreed at a log line, because a checkpoint is
a collective). Everything else that happens at those moments (metrics.csv, TensorBoard, the
progress line, plots, user extensions, test fault injection) is a callback (``callbacks.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain.engine import checkpoint as ckpt
from cnntrain.engine.callbacks import CallbackList
from cnntrain.engine.evaluate import EvalResult, evaluate
from cnntrain.engine.optim import lr_at, set_lr
from cnntrain.engine.state import TrainState
from cnntrain.engine.step import StepOutcome, StepParts, Strategy, train_step
from cnntrain.errors import NumericalError

log = logging.getLogger("cnntrain")


@dataclass
class Cadence:
    """When to log, evaluate and save (steps are 1-based counts of optimizer steps done)."""

    steps_per_epoch: int
    total_steps: int
    display_every: int
    eval_every: int = 0  # 0: at each epoch end
    save_every: int = 0  # 0: at each epoch end
    save_interval: float = 0.0  # seconds; 0: off

    def epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def log(self, step: int, window_steps: int) -> bool:
        return step % self.display_every == 0 or (self.epoch_end(step) and window_steps > 0)

    def evaluate(self, step: int) -> bool:
        every = self.eval_every
        return (every and step % every == 0) or (not every and self.epoch_end(step)) or step == self.total_steps

    def save(self, step: int) -> bool:
        every = self.save_every
        return bool((every and step % every == 0) or (not every and self.epoch_end(step)) or step == self.total_steps)

    def interval_passed(self, last_save: float) -> bool:
        return bool(self.save_interval) and time.perf_counter() - last_save >= self.save_interval


class TrainLoop:
    """The state of a running training job, and ``run()``; callbacks receive this object."""

    def __init__(self, *, cfg, data, strategy: Strategy, state: TrainState, parts: StepParts, train_loader,
                 val_loader, eval_model, run_dir: Path, cadence: Cadence, base_lr: float, meta: dict,
                 run_facts: dict[str, Any], resumed: bool, callbacks: CallbackList, run_id: str | None = None,
                 lock=None) -> None:
        self.cfg, self.data, self.strategy, self.state, self.parts = cfg, data, strategy, state, parts
        self.train_loader, self.val_loader, self.eval_model = train_loader, val_loader, eval_model
        self.run_dir, self.cadence, self.base_lr, self.meta = run_dir, cadence, base_lr, meta
        self.run_facts, self.resumed, self.callbacks = run_facts, resumed, callbacks
        self.run_id, self.lock = run_id, lock  # this run's id in checkpoint manifests; the run folder's lock
        self.steps_per_epoch, self.total_steps = cadence.steps_per_epoch, cadence.total_steps
        self.is_main = strategy.is_main
        self.lr_factor = 1.0  # times the schedule's LR (--lr-schedule plateau's callback lowers it)
        self.lr = self.lr_at(state.step)
        self.last_eval: EvalResult | None = None
        self.images_seen = self.bad_run = 0
        self.compile_seconds: float | None = None
        self.started = self.last_save = time.perf_counter()
        self.save_due = False  # several ranks: --save-interval has passed on rank 0 (agreed at the last log line)
        self.stop_reason: str | None = state.extra.get("stopped")  # a resumed run that had stopped stays stopped

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (early stopping, a pruned trial). Call it on every rank
        with the same decision, e.g. from ``on_eval_end``, whose result every rank shares; the run saves
        a checkpoint that remembers the stop, so ``--resume`` of it does not train on."""
        self.stop_reason = reason

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        state = self.state
        self.callbacks.on_train_start(self)
        self.started = self.last_save = time.perf_counter()
        if self.stop_reason:
            log.info("this run stopped at step %d (%s); nothing to resume", state.step, self.stop_reason)
            return
        while state.step < self.total_steps:
            epoch, in_epoch = divmod(state.step, self.steps_per_epoch)
            batches = self.train_loader.iterate(epoch, in_epoch * self.parts.accum)  # counts micro-batches
            for _ in range(in_epoch, self.steps_per_epoch):
                if state.step >= self.total_steps:
                    break
                outcome = self.step(batches)
                self.after_step(outcome)
                self.callbacks.on_step_end(self, outcome)
                if self.stop_reason:
                    self.stop()
                    return

    def stop(self) -> None:
        """Stop at this step, as ``request_stop`` asked: the checkpoint records why."""
        log.info("stopping at step %d: %s", self.state.step, self.stop_reason)
        self.state.extra["stopped"] = self.stop_reason
        self.save()  # also when this step was just saved: the rewritten checkpoint carries the stop

    def step(self, batches) -> StepOutcome:
        state = self.state
        self.lr = self.lr_at(state.step)
        set_lr(state.optimizer, self.lr, state.step / self.steps_per_epoch)
        first = time.perf_counter() if self.cfg.compile and self.compile_seconds is None else None
        outcome = train_step(self.parts, batches, self.lr, state.step)
        if first is not None:
            self.compile_seconds = time.perf_counter() - first
            log.info("torch.compile warm-up (first step): %.1f s", self.compile_seconds)
        self.bad_run = 0 if outcome.loss_ok else self.bad_run + 1
        if self.bad_run >= self.cfg.max_bad_steps:
            last_good = ckpt.latest_valid(self.run_dir / "checkpoints", quiet=True)
            raise NumericalError(
                f"loss was not finite for {self.bad_run} steps in a row (step {state.step + 1}); last good "
                f"checkpoint: {last_good or 'none'}; lower --lr, add --grad-clip or --warmup-epochs, or use bf16/fp32")
        if outcome.loss_ok:
            for loss, logits, labels in outcome.micro:
                state.window.add(loss, logits, labels)
            state.window.add_step(outcome.grad_norm if outcome.grads_ok else outcome.grad_norm * 0)
        state.window.data_seconds += outcome.data_seconds
        state.step += 1
        if state.lookahead is not None:
            state.lookahead.after_step(state.step)
        self.images_seen += outcome.images * self.strategy.world_size
        return outcome

    def after_step(self, outcome: StepOutcome) -> None:
        """The log line, evaluation and checkpoint that fall due at this step; their time is kept
        out of the training window's img/s."""
        step, cadence = self.state.step, self.cadence
        if cadence.log(step, self.state.window.steps):
            self.log_window()
        paused = time.perf_counter()
        is_best = self.evaluate() if cadence.evaluate(step) else False
        timed = self.save_due if self.strategy.world_size > 1 else cadence.interval_passed(self.last_save)
        if cadence.save(step) or timed or is_best:
            self.save(best=is_best)
        self.state.window.paused += time.perf_counter() - paused

    # ------------------------------------------------------------------ moments
    def log_window(self) -> None:
        window, world = self.state.window, self.strategy.world_size
        sums = window.sums
        if world > 1:
            # Rank 0's clock decides --save-interval for everyone (a checkpoint is a collective),
            # riding on the all-reduce the log line needs anyway.
            due = float(self.is_main and self.cadence.interval_passed(self.last_save))
            sums = self.strategy.all_reduce_sum(torch.cat([window.sums, window.sums.new_tensor([due])]))
            self.save_due, sums = bool(sums[3] > 0), sums[:3]
        loss_sum, correct, count = sums.tolist()
        seconds = max(time.perf_counter() - window.started - window.paused, 1e-9)
        step = self.state.step
        row = {"step": step, "epoch": step / self.steps_per_epoch, "split": "train",
               "loss": loss_sum / max(count, 1), "top1_err": 1 - correct / max(count, 1), "top5_err": "",
               "lr": self.lr, "img_per_s": count / seconds, "elapsed_s": self.elapsed(),
               "loss_scale": self.state.scaler.scale, "grad_norm": float(window.grad_norm) / max(window.steps, 1),
               "data_share": window.data_seconds / seconds}
        window.reset()
        self.callbacks.on_log(self, row)

    def evaluate(self) -> bool:
        """Score the held-out split on every rank; True when it is the best so far."""
        if self.val_loader is None:
            return False
        self.strategy.synchronize()
        cfg = self.cfg
        result = evaluate(self.eval_model, self.val_loader.iterate(0), self.data.num_classes,
                          precision=cfg.precision, device=self.strategy.device, tta_flip=cfg.tta_flip,
                          tta_translate=cfg.tta_translate, confusion=True,
                          all_reduce=self.strategy.all_reduce_sum if self.strategy.world_size > 1 else None)
        self.last_eval = result
        is_best = result.top1 > self.state.best_top1
        self.state.best_top1 = max(self.state.best_top1, result.top1)
        self.callbacks.on_eval_end(self, result)
        return is_best

    def save(self, best: bool = False) -> None:
        """A checkpoint (a collective: every rank calls it; rank 0 writes)."""
        self.strategy.synchronize()  # --partial-update: one model, the same on every rank
        window = self.state.window.state(self.strategy.all_reduce_sum if self.strategy.world_size > 1 else None)
        self.state.extra["strategy"] = self.strategy.state_dict()
        if self.is_main:
            payload = self.state.to_checkpoint(elapsed=self.elapsed(), config=self.cfg.to_dict(), meta=self.meta,
                                               window=window, **self.run_facts)
            folder = self.run_dir / "checkpoints"
            self.callbacks.on_save_checkpoint(self, payload, folder / f"step-{self.state.step:08d}.pt")
            path = ckpt.save_checkpoint(payload, folder, self.state.step, keep_last=self.cfg.keep_last, best=best,
                                        run_id=self.run_id)
            self.callbacks.on_checkpoint(self, path)
        self.last_save = time.perf_counter()
        self.save_due = False

    # ------------------------------------------------------------------ facts
    def lr_at(self, step: int) -> float:
        return lr_at(step, self.cfg, self.base_lr, self.steps_per_epoch, self.total_steps) * self.lr_factor

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.started

    def overall_rate(self) -> float:
        """Images per second, every rank, since this process started training."""
        return self.images_seen / max(time.perf_counter() - self.started, 1e-9)
