"""timm's models as ``timm/<name>`` (``timm/convnext_nano``, ``timm/resnet50.a1_in1k``), an optional extra.

    pip install -e ".[timm]"
    cnntrain train --dataset folder --data-dir photos --model timm/convnext_nano --pretrained

timm is imported only when a ``timm/`` name is asked for, so cnntrain works without it. Pretrained
weights come through timm's own loader (the Hugging Face hub cache; ``HF_HUB_OFFLINE=1`` works with a
filled cache); ``--pretrained FILE`` loads a local file through the same loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.errors import ConfigError, did_you_mean
from cnntrain.models.pretrained import TIMM_PREFIX, Preprocessing
from cnntrain.models.registry import ModelSpec, register_resolver

INSTALL = 'pip install -e ".[timm]"'


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm models need the timm package: {INSTALL}") from None
    return timm


def _check_name(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name.split(".", 1)[0]):
        raise ConfigError(f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}; "
                          f"`python -c 'import timm; print(timm.list_models())'` lists them")


def _pretrained_cfg(name: str, tag: str = ""):
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``) with ``tag`` (DEFAULT: timm's default)."""
    from timm.models import get_pretrained_cfg

    full = name if "." in name or tag in ("", "DEFAULT") or Path(tag).is_file() else f"{name}.{tag}"
    cfg = get_pretrained_cfg(full)
    if cfg is None:
        tags = _timm().list_pretrained(f"{name.split('.', 1)[0]}.*")
        raise ConfigError(f"--pretrained {tag}: timm has no weights {full!r}; it has {', '.join(tags) or 'none'}")
    return full, cfg


def _factory(name: str):
    def factory(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        try:
            return _timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                        **kwargs)
        except TypeError as exc:  # an unknown model_kwargs key
            raise ConfigError(f"{TIMM_PREFIX}{name}: {exc}") from None

    factory.__name__ = name
    factory.__doc__ = f"timm's {name}, randomly initialised (``--pretrained`` loads its weights)."
    return factory


def resolve(full_name: str) -> ModelSpec:
    """The registry entry of ``timm/<name>``."""
    name = full_name.removeprefix(TIMM_PREFIX)
    _check_name(name)
    try:
        _, cfg = _pretrained_cfg(name)
        size = tuple(cfg.input_size)
    except ConfigError:  # an architecture without published weights
        size = (3, 224, 224)
    return ModelSpec(full_name, _factory(name), size, "timm", None, f"timm.create_model({name!r})")


def timm_preprocessing(name: str, tag: str) -> Preprocessing:
    """mean / std, crop and resize sides and interpolation of timm's pretrained config."""
    _check_name(name)
    _, cfg = _pretrained_cfg(name, tag)
    crop = int(cfg.input_size[-1])
    return Preprocessing(tuple(cfg.mean), tuple(cfg.std), crop, int(round(crop / (cfg.crop_pct or 0.875))),
                         str(cfg.interpolation or "bilinear"))


def timm_state(name: str, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of ``name`` through timm's loader: its hub cache for a tag, or a local file."""
    _check_name(name)
    full, cfg = _pretrained_cfg(name, tag)
    overlay = {"file": str(Path(tag).resolve())} if Path(tag).is_file() else {}
    try:
        model = _timm().create_model(full, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # hub and loader errors have many types; all mean the same to the user
        if type(exc).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(exc).lower():
            from huggingface_hub.constants import HF_HUB_CACHE

            raise ConfigError(f"--pretrained for {TIMM_PREFIX}{name}: the weights of {cfg.hf_hub_id or cfg.url} are "
                              f"not in the Hugging Face cache {HF_HUB_CACHE} and cannot be downloaded offline; fetch "
                              f"them once online (or pass --pretrained FILE)") from None
        raise ConfigError(f"--pretrained for {TIMM_PREFIX}{name}: timm could not load the weights "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    source = overlay.get("file") or cfg.hf_hub_id or cfg.url or full
    return model.state_dict(), f"timm {source}"


register_resolver(TIMM_PREFIX, resolve)
