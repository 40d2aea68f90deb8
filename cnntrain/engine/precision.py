"""Mixed precision: autocast, and a loss scaler that also guards fp32/bf16 against non-finite steps."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device_type: str):
    """Autocast to fp16/bf16 with fp32 master weights, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r} is not fp32, fp16 or bf16: resolve --precision auto for the "
                         f"device first (cnntrain.hardware.resolve_precision)")
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


class LossScaler:
    """Static or dynamic loss scaling, and the skip-on-overflow rule for every precision.

    fp16: the loss is multiplied by ``scale`` before backward and the gradients divided after; a
    step whose gradients are not finite is skipped and, when dynamic, the scale halves; after
    ``growth_interval`` good steps in a row it doubles. fp32/bf16 use scale 1: the same guard
    keeps a non-finite gradient out of the weights.
    """

    def __init__(self, scale: float = 1.0, dynamic: bool = False, growth_interval: int = 2000,
                 min_scale: float = 1.0) -> None:
        self.scale = float(scale)
        self.dynamic = dynamic
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped = 0

    @classmethod
    def for_precision(cls, precision: str, static_scale: float = 0.0) -> LossScaler:
        if precision != "fp16":
            return cls(1.0)
        if static_scale:
            return cls(static_scale)
        return cls(2.0 ** 16, dynamic=True)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        if self.scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Record one step; ``found_inf`` means it was skipped."""
        if found_inf:
            self.skipped += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale = max(self.scale / 2, self.min_scale)
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "dynamic": self.dynamic, "good_steps": self.good_steps,
                "skipped": self.skipped, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.dynamic = bool(state["dynamic"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])
        self.growth_interval = int(state["growth_interval"])
