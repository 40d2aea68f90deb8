"""Callbacks: the training loop's public extension point.

    class PrintBest(cnntrain.Callback):
        def on_eval_end(self, loop, result):
            print(loop.state.step, result.top1)

    cnntrain.train(dataset="mnist", model="lenet", callbacks=[PrintBest()])
    cnntrain train ... --callbacks mypackage.hooks:PrintBest      # an importable class or factory

Moments, in the order a run meets them (``loop`` is the running ``engine.loop.TrainLoop``: its
``cfg``, ``state``, ``run_dir``, ``strategy``, ``steps_per_epoch``, ``total_steps`` and ``lr``):

- ``on_train_start(loop)``: everything built, resumed state loaded, before the first step.
- ``on_log(loop, row)``: a training row (loss, error, lr, img/s, ...) summed over every rank.
- ``on_eval_end(loop, result)``: after an evaluation (an ``EvalResult``).
- ``on_save_checkpoint(loop, payload, path)``: on the rank that writes it, before ``path`` is
  written; a callback may add its own entries under ``payload["callbacks"]``.
- ``on_checkpoint(loop, path)``: after ``path`` and its manifest are in place.
- ``on_load_checkpoint(loop, payload)``: when resuming, after the state is restored.
- ``on_step_end(loop, outcome)``: after a step and whatever log / eval / save fell due at it.
- ``on_train_end(loop, summary)``: the run's summary, before summary.json is written.
- ``on_run_end(loop, summary)``: after rank 0 has written summary.json and model.safetensors.

Every rank calls the moments; ``loop.is_main`` tells rank 0. ``loop.request_stop(reason)`` ends the run
after the current step (early stopping, a pruned trial): call it on every rank alike. metrics.csv, TensorBoard, the
progress line and the plots are callbacks themselves (``DEFAULT_CALLBACKS``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any

from cnntrain.engine.metrics import MetricsLog
from cnntrain.engine.plots import plot_curves
from cnntrain.engine.progress import TABLE_HEADER, Progress, table_row
from cnntrain.errors import ConfigError

log = logging.getLogger("cnntrain")


class Callback:
    """Override the moments you need; every one defaults to nothing."""

    def on_train_start(self, loop) -> None: ...
    def on_log(self, loop, row: dict[str, Any]) -> None: ...
    def on_eval_end(self, loop, result) -> None: ...
    def on_save_checkpoint(self, loop, payload: dict[str, Any], path) -> None: ...
    def on_checkpoint(self, loop, path) -> None: ...
    def on_load_checkpoint(self, loop, payload: dict[str, Any]) -> None: ...
    def on_step_end(self, loop, outcome) -> None: ...
    def on_train_end(self, loop, summary: dict[str, Any]) -> None: ...
    def on_run_end(self, loop, summary: dict[str, Any]) -> None: ...


MOMENTS = [name for name in vars(Callback) if name.startswith("on_")]


class CallbackList:
    """Calls each moment on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)
        for name in MOMENTS:
            hooks = [getattr(c, name) for c in self.callbacks if getattr(type(c), name, None) is not
                     getattr(Callback, name)]
            setattr(self, name, _fan_out(hooks))


def _fan_out(hooks: list):
    def call(*args: Any) -> None:
        for hook in hooks:
            hook(*args)

    return call


def load_callbacks(specs: Iterable[str]) -> list[Callback]:
    """Callbacks named ``module:attribute`` (a Callback class, or any callable returning one)."""
    out = []
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"--callbacks {spec!r}: cannot import it ({exc}); give module.path:Name of an "
                              f"importable Callback class") from None
        try:
            callback = factory()
        except Exception as exc:  # noqa: BLE001 - a user's factory may fail in any way
            raise ConfigError(f"--callbacks {spec!r}: calling it failed ({type(exc).__name__}: {exc})") from None
        if not all(callable(getattr(callback, m, None)) for m in MOMENTS):
            raise ConfigError(f"--callbacks {spec!r}: did not give a cnntrain Callback (subclass cnntrain.Callback)")
        out.append(callback)
    return out


class MetricsCsv(Callback):
    """metrics.csv (and TensorBoard scalars with ``--tensorboard``) on rank 0."""

    def on_train_start(self, loop) -> None:
        self.log = None
        if not loop.is_main:
            return
        self.log = MetricsLog(loop.run_dir / "metrics.csv", resume_step=loop.state.step if loop.resumed else None,
                              tensorboard_dir=loop.run_dir / "tb" if loop.cfg.tensorboard else None)
        if loop.cfg.tensorboard:
            sample, _ = next(loop.train_loader.iterate(loop.state.step // loop.steps_per_epoch))
            self.log.add_images("train/augmented_samples", sample[:16].float().cpu(), loop.state.step)

    def on_log(self, loop, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(**row)

    def on_eval_end(self, loop, result) -> None:
        if self.log is not None:
            self.log.write(step=loop.state.step, epoch=loop.state.step / loop.steps_per_epoch,
                           split=loop.data.val_name, loss=result.loss, top1_err=result.top1_err,
                           top5_err=result.top5_err, lr=loop.lr, elapsed_s=loop.elapsed())

    def on_train_end(self, loop, summary: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.close()


class ProgressReport(Callback):
    """The progress bar or log lines, and the per-evaluation table, on rank 0."""

    def on_train_start(self, loop) -> None:
        self.progress = Progress(loop.cfg.progress, loop.total_steps, loop.state.step, loop.is_main)
        self.last_train = (float("nan"), float("nan"))
        self.progress.write(TABLE_HEADER)

    def on_log(self, loop, row: dict[str, Any]) -> None:
        self.last_train = (row["loss"], row["top1_err"])
        self.progress.report(row["step"], row["epoch"], row["loss"], row["top1_err"], row["lr"], row["img_per_s"],
                             row["data_share"])

    def on_eval_end(self, loop, result) -> None:
        self.progress.write(table_row(loop.state.step / loop.steps_per_epoch, loop.state.step, *self.last_train,
                                      result.loss, result.top1_err, result.top5_err, loop.lr, loop.overall_rate(),
                                      loop.elapsed()))

    def on_step_end(self, loop, outcome) -> None:
        self.progress.step(loop.state.step)

    def on_train_end(self, loop, summary: dict[str, Any]) -> None:
        self.progress.close()


class Plots(Callback):
    """plots/curves.png (loss, error, LR) redrawn after each evaluation, on rank 0."""

    def on_eval_end(self, loop, result) -> None:
        if loop.is_main:
            plot_curves(loop.run_dir / "metrics.csv", loop.run_dir / "plots" / "curves.png",
                        f"{loop.cfg.dataset} / {loop.cfg.model}")


def default_callbacks() -> list[Callback]:
    """metrics.csv and TensorBoard, the progress line and table, the plots (in that order)."""
    return [MetricsCsv(), ProgressReport(), Plots()]
