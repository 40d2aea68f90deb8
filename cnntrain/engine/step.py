"""One training step, the only place in cnntrain where a backward pass is written.

    outcome = train_step(parts, batches, lr=0.1, step=0)

``train_step`` runs ``parts.accum`` micro-batches of forward and backward (gradients of all but the
last stay local under DDP's ``no_sync``), lets the strategy exchange gradients, unscales them, takes
the one host sync of the step (is the loss finite, is the gradient norm finite), clips, and hands
the update to the strategy: an optimizer step on this process (single process, DDP and the other
synchronous strategies), or a push of the gradient and a pull of new weights (an async-ps worker).
A step whose gradients are not finite updates nothing and counts as skipped in the loss scaler.

The synchronous trainer (``engine/loop.py``), the async-ps worker (``parallel/ps/worker.py``) and
``cnntrain bench`` all call this function, so what bench times is what training runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from cnntrain.engine.evaluate import main_logits
from cnntrain.engine.larc import apply_larc
from cnntrain.engine.precision import LossScaler, autocast
from cnntrain.engine.profile import OFF, NoProfiler


class Strategy(Protocol):
    """What the engine asks of a strategy (``cnntrain/parallel`` holds the implementations)."""

    device: torch.device
    rank: int
    world_size: int
    is_main: bool

    def accumulating(self, local: bool) -> contextlib.AbstractContextManager: ...
    def after_backward(self, params: list[nn.Parameter]) -> None: ...
    def apply_update(self, update: Update | None, grads_ok: bool, lr: float) -> None: ...
    def after_step(self, step: int) -> None: ...
    def synchronize(self) -> None: ...
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


def make_loss_fn(label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Callable:
    """Cross-entropy on the model output; auxiliary heads (GoogLeNet, Inception v3) weighted as in
    their papers' training code: GoogLeNet 2 x 0.3, Inception v3 0.4. ``class_weights`` (one per
    class, on the logits' device): each image's loss times its class's weight, the batch's mean
    divided by the sum of its weights (torch's weighted cross-entropy)."""
    ce = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    def loss(output, labels):
        if isinstance(output, torch.Tensor):
            return ce(output, labels)
        main, *aux = [o for o in output if o is not None]
        weight = 0.3 if len(aux) > 1 else 0.4
        return ce(main, labels) + sum(weight * ce(a, labels) for a in aux)

    return loss


class Update(Protocol):
    def __call__(self, grads_ok: bool, lr: float) -> None: ...


@dataclass
class LocalUpdate:
    """The optimizer step on this process: LARC (nvcnn's clip / scale), the optimizer, then the
    exponential moving average of the weights. Nothing moves when the gradients are not finite."""

    optimizer: torch.optim.Optimizer
    model: nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None = None
    larc_mode: str = "none"
    larc_eta: float = 0.003
    larc_eps: float = 1e-8

    def __call__(self, grads_ok: bool, lr: float) -> None:
        if not grads_ok:
            return
        if self.larc_mode != "none":
            apply_larc(self.optimizer, lr, self.larc_mode, self.larc_eta, self.larc_eps)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)


@dataclass
class StepParts:
    """Everything one step touches. ``forward`` is the model as wrapped by the strategy (DDP,
    torch.compile); ``params`` its trainable parameters; ``update`` what the strategy applies."""

    forward: nn.Module
    params: list[nn.Parameter]
    loss_fn: Callable
    scaler: LossScaler
    strategy: Strategy
    update: Update | None
    precision: str = "fp32"
    accum: int = 1
    grad_clip: float = 0.0
    profiler: NoProfiler = field(default=OFF)


@dataclass
class StepOutcome:
    loss: torch.Tensor  # the micro-batches' mean losses summed (detached; for the finite check)
    grad_norm: torch.Tensor  # total norm of the unscaled gradients, before clipping
    loss_ok: bool
    grads_ok: bool  # False: the update was skipped
    micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (loss, fp32 logits, labels) per micro-batch
    data_seconds: float  # time spent waiting for batches

    @property
    def images(self) -> int:
        return sum(labels.shape[0] for _, _, labels in self.micro)


def train_step(parts: StepParts, batches: Iterator, lr: float, step: int) -> StepOutcome:
    """Forward / backward over ``parts.accum`` micro-batches from ``batches``, then the update at
    learning rate ``lr`` as optimizer step ``step`` (0-based)."""
    prof, device_type = parts.profiler, parts.params[0].device.type if parts.params else "cpu"
    micro, data_seconds = [], 0.0
    for i in range(parts.accum):
        started = time.perf_counter()
        with prof.phase("data"):
            images, labels = next(batches)
        data_seconds += time.perf_counter() - started
        with parts.strategy.accumulating(i < parts.accum - 1):
            with prof.phase("forward"), autocast(parts.precision, device_type):
                output = parts.forward(images)
                loss = parts.loss_fn(output, labels)
            with prof.phase("backward"):
                parts.scaler.scale_loss(loss / parts.accum if parts.accum > 1 else loss).backward()
        micro.append((loss.detach(), main_logits(output).detach().float(), labels))
    loss = torch.stack([m[0] for m in micro]).sum() if parts.accum > 1 else micro[0][0]
    with prof.phase("communication"):
        parts.strategy.after_backward(parts.params)
    with prof.phase("optimizer"):
        grads = [p.grad for p in parts.params if p.grad is not None]
        parts.scaler.unscale_(grads)
        grad_norm = torch.nn.utils.get_total_norm(grads)
        # The one host sync per step: skip the update when anything is not finite.
        loss_ok, grads_ok = torch.stack([loss.float(), grad_norm.float()]).isfinite().tolist()
        if grads_ok and parts.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(parts.params, parts.grad_clip, grad_norm)
        parts.strategy.apply_update(parts.update, grads_ok, lr)
        parts.scaler.update(found_inf=not grads_ok)
        for p in parts.params:
            p.grad = None
    with prof.phase("communication"):
        parts.strategy.after_step(step)  # --partial-update averages a parameter chunk here
    prof.step()
    return StepOutcome(loss, grad_norm, loss_ok, grads_ok, micro, data_seconds)
