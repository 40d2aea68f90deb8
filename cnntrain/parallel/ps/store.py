"""What one ps holds: its shard of the parameters and state buffers, and the optimizer over them.

The server (``server.py``, ``handler.py``) owns the links, the locking and the staleness bookkeeping; it calls
these methods with its lock held and counts the updates (``version``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.engine.larc import apply_larc
from cnntrain.engine.optim import lr_at, model_param_groups, optimizer_for, set_lr
from cnntrain.models.registry import create_model_for
from cnntrain.parallel.ps import protocol as P
from cnntrain.parallel.ps.cluster import Cluster, ShardPlan, flatten
from cnntrain.parallel.ps.transport import MAX_NUMEL, BadMessage, Spec, whole

# What an INIT may describe: far above any model cnntrain trains, far below what would exhaust the
# ps's memory just to check the message.
MAX_CLASSES = 100_000
MAX_CHANNELS = 64
MAX_SIDE = 8192
MAX_SHARD_VALUES = 2**31  # parameters on one ps (8 GiB in float32)


@dataclass(frozen=True)
class ShardLayout:
    """This ps's shard as an INIT's numbers describe it, known before any of its tensors is read."""

    cfg: TrainConfig
    param_shapes: tuple[tuple[int, ...], ...]
    buffer_count: int
    state_keys: tuple[str, ...]
    step: int
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    run_stamp: int
    # The synchronous trainer's parameter groups (weight decay, --norm-lr-scale, timed groups such as
    # fastnet's whitening bias), without their parameters, and which one each shard parameter is in.
    group_settings: tuple[dict, ...] = ()
    group_of: tuple[int, ...] = ()

    @property
    def param_count(self) -> int:
        return sum(_numel(s) for s in self.param_shapes)

    def specs(self) -> list[Spec]:
        """Exactly the tensors the INIT must carry: parameters, buffers, then each optimizer state."""
        n = self.param_count
        state = [(torch.float32, len(self.param_shapes) if key == "step" else n) for key in self.state_keys]
        return [(torch.float32, n), (torch.float64, self.buffer_count), *state]

    @classmethod
    def from_numbers(cls, cfg: TrainConfig, cluster: Cluster, index: int, numbers: tuple[float, ...]) -> ShardLayout:
        """Check an INIT's numbers (step, classes, C, H, W, steps/epoch, total, base lr, run stamp,
        state mask) and plan the shard; ``BadMessage`` if they are out of range or name no model.

        The model is built (on ``meta`` when it can be) only to learn the shapes and ``ShardPlan``."""
        step = whole(numbers[0], 0, MAX_NUMEL, "INIT step")
        classes = whole(numbers[1], 1, MAX_CLASSES, "INIT class count")
        shape = (whole(numbers[2], 1, MAX_CHANNELS, "INIT channels"), whole(numbers[3], 1, MAX_SIDE, "INIT height"),
                 whole(numbers[4], 1, MAX_SIDE, "INIT width"))
        steps_per_epoch = whole(numbers[5], 1, MAX_NUMEL, "INIT updates per epoch")
        total = whole(numbers[6], 0, MAX_NUMEL, "INIT total updates")
        base_lr = float(numbers[7])
        if not 0 <= base_lr <= 1e6:
            raise BadMessage(P.NOT_FINITE, f"INIT learning rate {base_lr!r} out of range")
        stamp = whole(numbers[8], -MAX_NUMEL, MAX_NUMEL, "INIT run stamp")
        keys = P.STATE_KEYS[cfg.optimizer]
        mask = whole(numbers[9], 0, 2 ** len(keys) - 1, "INIT optimizer-state mask")
        try:
            try:
                with torch.device("meta"):
                    model = create_model_for(cfg.model, classes, shape, **cfg.model_kwargs)
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real
                model = create_model_for(cfg.model, classes, shape, **cfg.model_kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure means these numbers describe no model
            raise BadMessage(P.BAD_NUMBERS, f"INIT describes no {cfg.model} model ({classes} classes, "
                                            f"{'x'.join(map(str, shape))} images): {exc}") from None
        plan = ShardPlan.for_model(model, cluster.num_ps)
        settings, group_of = _shard_groups(model, cfg, plan.params_of(index))
        layout = cls(cfg, tuple(plan.param_shapes[i] for i in plan.params_of(index)),
                     sum(_numel(plan.buffer_shapes[i]) for i in plan.buffers_of(index)),
                     tuple(k for i, k in enumerate(keys) if mask >> i & 1), step, steps_per_epoch, total, base_lr,
                     stamp, settings, group_of)
        if layout.param_count > MAX_SHARD_VALUES:
            raise BadMessage(P.BAD_NUMBERS, f"INIT describes a shard of {layout.param_count} values, more than "
                                            f"{MAX_SHARD_VALUES}")
        return layout


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
        self.param_count = sum(p.numel() for p in params)  # the length every pushed gradient must have

    @classmethod
    def from_init(cls, layout: ShardLayout, tensors: tuple[torch.Tensor, ...]) -> ShardStore:
        """Build this ps's shard from the chief's INIT, whose tensors ``layout.specs`` has checked:
        the weights and optimizer state are copied into fresh tensors of the planned shapes."""
        cfg = layout.cfg
        params = [nn.Parameter(torch.empty(shape)) for shape in layout.param_shapes]
        flat_params, buffers, *state = tensors
        _unflatten(flat_params, params)
        groups = [{**settings, "params": [p for p, g in zip(params, layout.group_of) if g == i]}
                  for i, settings in enumerate(layout.group_settings)]
        optimizer = optimizer_for([g for g in groups if g["params"]], cfg, "cpu")
        for key, flat in zip(layout.state_keys, state):
            offset = 0
            for p in params:
                n = 1 if key == "step" else p.numel()
                value = flat[offset:offset + n]
                optimizer.state[p][key] = value.view(()).clone() if key == "step" else value.view(p.shape).clone()
                offset += n
        return cls(cfg, params, buffers, optimizer, layout.steps_per_epoch, layout.total_steps, layout.base_lr)

    def apply(self, flat: torch.Tensor, version: int) -> None:
        """One optimizer step on this shard with the gradient ``flat``, as update number ``version``."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        _unflatten(flat, [p.grad for p in self.params])
        lr = lr_at(version, self.cfg, self.base_lr, self.steps_per_epoch, self.total_steps)
        set_lr(self.optimizer, lr, version / self.steps_per_epoch)
        if self.cfg.larc_mode != "none":
            apply_larc(self.optimizer, lr, self.cfg.larc_mode, self.cfg.larc_eta, self.cfg.larc_eps)
        self.optimizer.step()

    def merge_buffers(self, new: torch.Tensor, base: torch.Tensor) -> None:
        """A worker ran from ``base`` to ``new``: add its change (the running statistics' update).
        Nothing is merged for a worker that has not pulled yet (no ``base``)."""
        if new.numel() and new.numel() == base.numel() == self.buffers.numel():
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


def _shard_groups(model: nn.Module, cfg: TrainConfig, mine: list[int]) -> tuple[tuple[dict, ...], tuple[int, ...]]:
    """The whole model's parameter groups as the synchronous trainer builds them (settings only),
    and the group of each parameter ``mine`` (indices into the plan's trainable parameters)."""
    groups = model_param_groups(model, cfg)
    group_of_param = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
    trainable = [p for _, p in model.named_parameters() if p.requires_grad]
    settings = tuple({k: v for k, v in group.items() if k != "params"} for group in groups)
    return settings, tuple(group_of_param[id(trainable[i])] for i in mine)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy ``flat`` into ``tensors`` in order (its length was checked against theirs)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view(t.shape))
            offset += n
