"""Everything a checkpoint holds, in one place.

``TrainState`` gathers the stateful parts of a run (model, optimizer, loss scaler, EMA, lookahead,
training window, step, best top-1, elapsed time, RNG, and whatever the strategy keeps: top-k
remainders, the async ps's optimizer) and is the only code that decides what a checkpoint
contains and how it is restored. The synchronous trainer and the async-ps chief both save and
load through it, so their checkpoints have the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.engine.lookahead import Lookahead
from cnntrain.engine.metrics import TrainWindow
from cnntrain.engine.precision import LossScaler
from cnntrain.engine.run import unwrap
from cnntrain.errors import CheckpointError


@dataclass
class TrainState:
    model: nn.Module  # the plain module (unwrapped)
    scaler: LossScaler
    window: TrainWindow
    optimizer: torch.optim.Optimizer | None = None  # None where the optimizer lives elsewhere (async ps)
    ema: torch.optim.swa_utils.AveragedModel | None = None
    lookahead: Lookahead | None = None
    step: int = 0  # optimizer steps (async: updates) done
    best_top1: float = 0.0
    elapsed_before: float = 0.0  # seconds of training before this process took over
    extra: dict[str, Any] = field(default_factory=dict)  # the strategy's own state, saved under its keys

    def to_checkpoint(self, *, elapsed: float, config: dict, meta: dict, window: dict | None = None,
                      **run_facts: Any) -> dict[str, Any]:
        """The checkpoint payload. ``window``: the window state with every rank's sums folded in
        (``TrainWindow.state``); ``run_facts``: plain values such as ``global_batch``."""
        device = next(iter(self.model.state_dict().values()), torch.empty(0)).device
        payload: dict[str, Any] = {
            "model": {k: v.detach().cpu().clone() for k, v in unwrap(self.model).state_dict().items()},
            "scaler": self.scaler.state_dict(), "window": window or self.window.state(), "step": self.step,
            "best_top1": self.best_top1, "elapsed": elapsed, "config": config, "meta": meta,
            "rng": {"torch": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            **run_facts,
        }
        if self.optimizer is not None:
            payload["optimizer"] = self.optimizer.state_dict()
        if self.ema is not None:
            payload["ema"] = self.ema.state_dict()
        if self.lookahead is not None:
            payload["lookahead"] = self.lookahead.state_dict()
        payload.update({k: v for k, v in self.extra.items() if v})
        return payload

    def restore(self, payload: dict[str, Any], source: Path, *, with_window_sums: bool = True) -> None:
        """Load ``payload`` (read from ``source``) into the parts; the strategy's keys stay in
        ``extra`` for it to take. ``with_window_sums``: False on ranks other than 0, since the saved
        sums are already every rank's."""
        try:
            unwrap(self.model).load_state_dict(payload["model"])
            if self.optimizer is not None and "optimizer" in payload:
                self.optimizer.load_state_dict(payload["optimizer"])
            if "scaler" in payload:
                self.scaler.load_state_dict(payload["scaler"])
            if self.ema is not None and "ema" in payload:
                self.ema.load_state_dict(payload["ema"])
            if self.lookahead is not None and "lookahead" in payload:
                self.lookahead.load_state_dict(payload["lookahead"])
            if "window" in payload:
                self.window.load(payload["window"], with_sums=with_window_sums)
            self.step, self.best_top1 = int(payload["step"]), float(payload["best_top1"])
            self.elapsed_before = float(payload["elapsed"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: does not fit this run ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:300]})") from None
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        device = next(iter(self.model.state_dict().values()), torch.empty(0)).device
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        kept = ("strategy", "ps_optimizer", "async_ps", "callbacks", "stopped")
        self.extra = {k: payload[k] for k in kept if k in payload}
