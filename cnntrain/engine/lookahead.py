"""Lookahead of the weights, as airbench uses it (Zhang et al. 2019, "Lookahead Optimizer: k steps
forward, 1 step back", arXiv:1907.08610; Jordan 2024, arXiv:2404.00498).

Every ``every`` steps the slow copy moves toward the live weights, ``slow += (1 - d) * (live - slow)``,
and the live weights (BatchNorm statistics included) are set to it. The pull-back ``d`` ramps up
over the run as ``alpha ** every * (step / total) ** 3``: nothing early, strong averaging at the
end. At the last step the live weights take the slow ones. Unlike an EMA kept for evaluation only,
training goes on from the averaged weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, alpha: float, total_steps: int) -> None:
        self.model = model
        self.every = every
        self.alpha = alpha
        self.total_steps = total_steps
        self.slow = [t.detach().clone() for t in self._live()]

    def _live(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    def decay(self, step: int) -> float:
        return self.alpha ** self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call with the number of optimizer steps done so far."""
        if step % self.every == 0:
            self._sync(self.decay(step))
        if step == self.total_steps:
            self._sync(1.0)

    def _sync(self, decay: float) -> None:
        for slow, live in zip(self.slow, self._live()):
            slow.lerp_(live, 1.0 - decay)
            live.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": [t.clone() for t in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["slow"]) != len(self.slow):
            raise ValueError(f"lookahead state has {len(state['slow'])} tensors, the model {len(self.slow)}")
        for mine, saved in zip(self.slow, state["slow"]):
            mine.copy_(saved)
