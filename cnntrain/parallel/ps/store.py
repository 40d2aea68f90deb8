"""What one ps holds: its shard of the parameters and state buffers, and the optimizer over them.

The server (``server.py``) owns the links, the locking and the staleness bookkeeping; it calls
these methods with its lock held and counts the updates (``version``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.engine.larc import apply_larc
from cnntrain.engine.optim import build_optimizer, lr_at, set_lr
from cnntrain.models.registry import create_model_for
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.cluster import Cluster, ShardPlan, flatten
from cnntrain.parallel.ps.transport import LinkError


class _Shard(nn.Module):
    """This ps's parameters as one module, so ``build_optimizer`` sees them as the trainer would."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class ShardStore:
    def __init__(self, cfg: TrainConfig, params: list[nn.Parameter], buffers: torch.Tensor,
                 optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int, base_lr: float) -> None:
        self.cfg = cfg
        self.params = params
        self.buffers = buffers
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.base_lr = base_lr

    @classmethod
    def from_init(cls, cfg: TrainConfig, cluster: Cluster, index: int, numbers: tuple,
                  tensors: tuple[torch.Tensor, ...]) -> ShardStore:
        """Build this ps's shard from the chief's INIT: the model is built (on ``meta`` when it can be)
        only to learn the shapes and ``ShardPlan``; then the weights and optimizer state are copied in."""
        (_, classes, c, h, w, steps_per_epoch, total, base_lr, _, mask) = numbers[:10]
        shape = (int(c), int(h), int(w))
        try:
            with torch.device("meta"):
                model = create_model_for(cfg.model, int(classes), shape, **cfg.model_kwargs)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real
            model = create_model_for(cfg.model, int(classes), shape, **cfg.model_kwargs)
        plan = ShardPlan.for_model(model, cluster.num_ps)
        params = [nn.Parameter(torch.empty(plan.param_shapes[i])) for i in plan.params_of(index)]
        flat_params, buffers, *state = tensors
        offset = 0
        for p in params:
            p.data.copy_(flat_params[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        if offset != flat_params.numel():
            raise LinkError(f"INIT carries {flat_params.numel()} values for {offset} parameters")
        optimizer = build_optimizer(_Shard(params), cfg, "cpu")
        keys = [k for i, k in enumerate(P.STATE_KEYS[cfg.optimizer]) if int(mask) >> i & 1]
        for key, flat in zip(keys, state):
            offset = 0
            for p in params:
                n = 1 if key == "step" else p.numel()
                value = flat[offset:offset + n]
                optimizer.state[p][key] = value.view(()).clone() if key == "step" else value.view(p.shape).clone()
                offset += n
        return cls(cfg, params, buffers.clone(), optimizer, int(steps_per_epoch), int(total), float(base_lr))

    def apply(self, flat: torch.Tensor, version: int) -> None:
        """One optimizer step on this shard with the gradient ``flat``, as update number ``version``."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset:offset + n].view(p.shape))
            offset += n
        lr = lr_at(version, self.cfg, self.base_lr, self.steps_per_epoch, self.total_steps)
        set_lr(self.optimizer, lr, version / self.steps_per_epoch)
        if self.cfg.larc_mode != "none":
            apply_larc(self.optimizer, lr, self.cfg.larc_mode, self.cfg.larc_eta, self.cfg.larc_eps)
        self.optimizer.step()

    def merge_buffers(self, new: torch.Tensor, base: torch.Tensor) -> None:
        """A worker ran from ``base`` to ``new``: add its change (the running statistics' update)."""
        if new.numel() and new.numel() == base.numel():
            self.buffers += new - base

    def flat_params(self) -> torch.Tensor:
        return flatten(self.params)

    def optimizer_state(self) -> tuple[int, list[torch.Tensor]]:
        """(mask of ``P.STATE_KEYS`` present, their flattened values) for a SNAPSHOT."""
        mask, state = 0, []
        for i, key in enumerate(P.STATE_KEYS[self.cfg.optimizer]):
            values = [self.optimizer.state.get(p, {}).get(key) for p in self.params]
            if values and all(isinstance(v, torch.Tensor) for v in values):
                mask |= 1 << i
                state.append(flatten(values))
        return mask, state
