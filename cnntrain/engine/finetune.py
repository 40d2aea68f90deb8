"""Fine-tuning: starting weights, frozen parts, per-layer learning rates.

    cnntrain train --dataset folder --data-dir hymenoptera_data --model resnet18 --pretrained
    cnntrain train ... --init-from runs/cifar10-resnet18-1700000000 --freeze backbone --unfreeze-at 3
    cnntrain train ... --model timm/convnext_nano --pretrained --layer-decay 0.75 --head-lr-mult 10

- ``--pretrained [TAG]`` / ``--init-from PATH``: the tensors that match the model by name and shape
  are loaded (``models/pretrained.py::load_matching``), the rest (a head for another class count)
  keep their random init; the table of loaded / re-initialised / unused tensors is logged and saved
  as ``<run_dir>/init_weights.txt``. The pretrained weights' preprocessing becomes the run's: their
  mean / std, crop size, and for streamed images their evaluation resize side and interpolation
  (stored with the weights for ``predict``).
- ``--freeze``: frozen parameters get no gradient (so no backward pass through a frozen backbone),
  and frozen BatchNorm layers stay in eval mode (their running statistics do not move).
  ``--unfreeze-at E`` lets everything train from epoch E on.
- ``--head-lr-mult`` / ``--layer-decay``: an ``lr_scale`` per parameter group (``optim.set_lr``
  applies it); layers are counted in module order, the head last.

Which parts are frozen is a pure function of the step, and the groups of the config: a resumed
fine-tune is exact with nothing more in the checkpoint than the optimizer state it already holds.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.data.datasets import with_resize
from cnntrain.engine.callbacks import Callback
from cnntrain.errors import ConfigError
from cnntrain.models.pretrained import (
    TIMM_PREFIX,
    InitTable,
    Preprocessing,
    load_matching,
    torchvision_preprocessing,
    torchvision_state,
)
from cnntrain.models.timm_models import timm_preprocessing, timm_state

log = logging.getLogger("cnntrain")

TABLE_FILE = "init_weights.txt"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# ------------------------------------------------------------------------------------- starting weights
def preprocessing(model: str, tag: str) -> Preprocessing:
    """The preprocessing published with the weights ``tag`` of ``model`` (torchvision, or ``timm/<name>``);
    read from the weights' description, nothing is downloaded."""
    if model.startswith(TIMM_PREFIX):
        return timm_preprocessing(model.removeprefix(TIMM_PREFIX), tag)
    return torchvision_preprocessing(model, tag)


def pretrained_state(model: str, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    """The published weights ``tag`` of ``model`` as a state dict, with where they came from."""
    if model.startswith(TIMM_PREFIX):
        return timm_state(model.removeprefix(TIMM_PREFIX), tag)
    return torchvision_state(model, tag)


def run_preprocessing(cfg: TrainConfig) -> Preprocessing | None:
    """The pretrained weights' preprocessing, or None when the run does not start from published weights."""
    if not cfg.pretrained:
        return None
    tag = "DEFAULT" if Path(cfg.pretrained).is_file() else cfg.pretrained
    return preprocessing(cfg.model, tag)


def with_preprocessing(data, prep: Preprocessing | None):
    """``data`` prepared as the pretrained weights expect: their evaluation resize and interpolation
    (streamed images) and their mean / std."""
    if prep is None:
        return data
    data = with_resize(data, prep.resize_size, prep.interpolation)
    if len(prep.mean) != len(data.mean):
        return data
    return dataclasses.replace(data, mean=tuple(prep.mean), std=tuple(prep.std))


def read_state(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a run folder (its model.safetensors, else its latest checkpoint), a cnntrain
    checkpoint, a ``.safetensors`` file or a torchvision / timm state-dict file; loaded weights-only."""
    source = Path(path).expanduser()
    if source.is_dir():
        candidates = [source / "model.safetensors", *sorted((source / "checkpoints").glob("step-*.pt"))[-1:]]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(f"--init-from {path}: a folder without model.safetensors or checkpoints/step-*.pt")
        source = found[0]
    if not source.is_file():
        raise ConfigError(f"--init-from {path}: no such file or run folder")
    try:
        if source.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(source))
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle, zip and safetensors errors alike: not a weights file)
        raise ConfigError(f"--init-from {source}: not a weights file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    for key in ("model", "state_dict", "model_state_dict", "module"):  # a checkpoint: its weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"--init-from {source}: holds a {type(state).__name__}, not a state dict")
    return state, str(source)


def initial_weights(cfg: TrainConfig, model: nn.Module) -> InitTable | None:
    """Load ``--pretrained`` or ``--init-from`` into ``model``; the table of what was loaded."""
    if cfg.pretrained:
        state, source = pretrained_state(cfg.model, cfg.pretrained)
    elif cfg.init_from:
        state, source = read_state(cfg.init_from)
    else:
        return None
    table = load_matching(model, state, source)
    log.info("%s", table.summary())
    for name, why in table.reinitialised.items():
        log.info("  re-initialised %s: %s", name, why)
    return table


def save_table(table: InitTable | None, run_dir: Path) -> None:
    if table is not None:
        (run_dir / TABLE_FILE).write_text(table.render())


# ------------------------------------------------------------------------------------- which parameters
def head_prefix(model: nn.Module) -> str:
    """The module path of the classifier head: timm's ``get_classifier()``, else the last Linear or
    convolution in module order (resnet's ``fc``, squeezenet's ``classifier.1``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    last = ""
    for name, module in model.named_modules():
        if module is head:
            return name
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(True for _ in module.parameters(recurse=False)):
            last = name
    if not last:
        raise ConfigError(f"{type(model).__name__}: found no Linear or convolution to call the head; "
                          f"name module prefixes to --freeze instead of backbone")
    return last


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def frozen_names(model: nn.Module, freeze: str) -> list[str]:
    """The parameter names ``--freeze`` names: all but the head's (backbone), or those under prefixes."""
    names = [n for n, _ in model.named_parameters()]
    if freeze == "none":
        return []
    if freeze == "backbone":
        head = head_prefix(model)
        return [n for n in names if not _under(n, head)]
    prefixes = [p.strip().rstrip(".") for p in freeze.split(",") if p.strip()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            tops = sorted({n.split(".", 1)[0] for n in names})
            raise ConfigError(f"--freeze {prefix!r} names no parameters of {type(model).__name__}; its top-level "
                              f"modules are {', '.join(tops)}")
    return [n for n in names if any(_under(n, p) for p in prefixes)]


def layer_units(model: nn.Module) -> list[list[str]]:
    """The model's layers in module order, as lists of module paths, the head last: a block (a module
    with children) is one layer, a container's (Sequential / ModuleList) children are layers of their
    own, and a leaf normalisation layer joins the layer before it (a stem's convolution and BatchNorm)."""
    head = head_prefix(model)
    units = [[p for p in unit if not _under(p, head)] for unit in _units(model, "")]
    units = [u for u in units if u]
    return [[""], *units, [head]]  # "": parameters the model holds itself (ViT's class token): the bottom


def _units(module: nn.Module, prefix: str) -> list[list[str]]:
    out: list[list[str]] = []
    pending: list[str] = []
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue
        path = prefix + name
        if type(child) in _CONTAINERS:
            out += [pending] if pending else []
            pending = []
            out += _units(child, path + ".")
        elif not list(child.children()):  # a leaf: a convolution starts a layer, a norm joins the one before
            if pending and not isinstance(child, _NORMS):
                out.append(pending)
                pending = []
            pending.append(path)
        else:
            out += [pending] if pending else []
            pending = []
            out.append([path])
    return out + ([pending] if pending else [])


def lr_scales(model: nn.Module, layer_decay: float, head_lr_mult: float) -> dict[str, float]:
    """Each parameter's LR multiplier: ``layer_decay ** (layers above it)``, the head's times ``head_lr_mult``."""
    units = layer_units(model)
    top = len(units) - 1
    scales: dict[str, float] = {}
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0] if "." in name else ""
        layer = max((i for i, unit in enumerate(units) if any(p and _under(module, p) for p in unit)), default=0)
        scales[name] = layer_decay ** (top - layer) * (head_lr_mult if layer == top else 1.0)
    return scales


def scale_groups(groups: list[dict], model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Split each of ``groups`` (``optim.param_groups``) by the parameters' LR multipliers, which
    multiply the group's own ``lr_scale``; unchanged when neither option is given."""
    if cfg.layer_decay == 1 and cfg.head_lr_mult == 1:
        return groups
    scales = lr_scales(model, cfg.layer_decay, cfg.head_lr_mult)
    scale_of = {id(p): scales[n] for n, p in model.named_parameters()}
    out = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        for scale, params in sorted(by_scale.items()):
            out.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * scale})
    return out


# ------------------------------------------------------------------------------------- freezing
def _keep_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen BatchNorm: normalise with the running statistics, never update them
    (a plain function, so that copies of the model, such as the EMA's, can be made)."""
    module.train(False)


class FineTune(Callback):
    """Freezes the ``--freeze`` parameters when built and unfreezes them from ``--unfreeze-at`` on."""

    def __init__(self, model: nn.Module, names: list[str], unfreeze_at: float) -> None:
        self.model, self.unfreeze_at = model, unfreeze_at
        named = dict(model.named_parameters())
        self.params = [named[n] for n in names]
        frozen = {id(p) for p in self.params}
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.affine and all(id(p) in frozen for p in m.parameters(recurse=False))]
        self.hooks: list = []
        self.frozen = False

    @classmethod
    def for_run(cls, cfg: TrainConfig, model: nn.Module, world_size: int) -> FineTune | None:
        """The callback of ``cfg``'s freezing, the parameters already frozen; None when nothing freezes."""
        names = frozen_names(model, cfg.freeze)
        if cfg.freeze != "none" and not names:
            raise ConfigError(f"--freeze {cfg.freeze}: nothing to freeze")
        if not names:
            return None
        if cfg.unfreeze_at and world_size > 1:
            raise ConfigError("--unfreeze-at is not supported with several processes (DDP fixes the trained "
                              "parameters when it wraps the model); drop it, or fine-tune in two runs with --init-from")
        tuner = cls(model, names, cfg.unfreeze_at)
        tuner.freeze()
        log.info("frozen: %d of %d parameter tensors (%d BatchNorm layers in eval mode)%s", len(names),
                 len(list(model.parameters())), len(tuner.norms),
                 f", all train from epoch {cfg.unfreeze_at:g}" if cfg.unfreeze_at else "")
        return tuner

    def freeze(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
        self.hooks = [m.register_forward_pre_hook(_keep_eval) for m in self.norms]
        self.frozen = True

    def unfreeze(self, loop) -> None:
        for p in self.params:
            p.requires_grad_(True)
        for hook in self.hooks:
            hook.remove()
        for m in self.norms:
            m.train(self.model.training)
        self.hooks, self.frozen = [], False
        loop.parts.params = [p for p in self.model.parameters() if p.requires_grad]
        log.info("step %d: unfrozen, every parameter trains from here", loop.state.step)

    def _due(self, loop) -> bool:
        return self.frozen and bool(self.unfreeze_at) and loop.state.step >= round(self.unfreeze_at *
                                                                                   loop.steps_per_epoch)

    def on_train_start(self, loop) -> None:  # a resumed run past the epoch
        if self._due(loop):
            self.unfreeze(loop)

    def on_step_end(self, loop, outcome) -> None:
        if self._due(loop):
            self.unfreeze(loop)


def describe(cfg: TrainConfig, prep: Preprocessing | None) -> str:
    """What the start line says about fine-tuning ("" when none)."""
    parts = []
    if cfg.pretrained:
        parts.append(f"pretrained {cfg.pretrained}" + (f" ({prep.describe()})" if prep else ""))
    if cfg.init_from:
        parts.append(f"init from {cfg.init_from}")
    if cfg.freeze != "none":
        parts.append(f"freeze {cfg.freeze}" + (f" until epoch {cfg.unfreeze_at:g}" if cfg.unfreeze_at else ""))
    if cfg.head_lr_mult != 1 or cfg.layer_decay != 1:
        parts.append(f"head lr x{cfg.head_lr_mult:g}, layer decay {cfg.layer_decay:g}")
    return " | ".join(parts)
