"""The model registry: ``@register`` a factory, ``create_model(name, num_classes)`` builds it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from cnntrain.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int, int]  # (channels, height, width) the model is designed for
    family: str
    recipe: str | None = None  # name of the default recipe, if any
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
# Families too large or too optional to register up front (timm): name prefix -> spec of a full name.
_RESOLVERS: dict[str, Callable[[str], ModelSpec]] = {}
# Families whose module import is slow (torchvision pulls in torch._dynamo, about 1.5 s): registered
# in one go the first time a name outside the registry, or the whole list, is asked for.
_PENDING_FAMILIES: list[Callable[[], None]] = []


def register(name: str, *, input_size: tuple[int, int, int], family: str, recipe: str | None = None,
             description: str = ""):
    """Decorator: register ``factory(num_classes, in_channels, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, factory, input_size, family, recipe, description)
        return factory

    return wrap


def register_resolver(prefix: str, resolve: Callable[[str], ModelSpec]) -> None:
    """Names starting with ``prefix`` are looked up by ``resolve(name)`` when first asked for."""
    _RESOLVERS[prefix] = resolve


def register_family(load: Callable[[], None]) -> None:
    """``load()`` registers a whole family; it runs once, when a model outside the registry is asked for."""
    _PENDING_FAMILIES.append(load)


def _load_pending() -> None:
    while _PENDING_FAMILIES:
        _PENDING_FAMILIES.pop(0)()


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, resolve in _RESOLVERS.items():
        if name.startswith(prefix):
            _REGISTRY[name] = resolve(name)
            return _REGISTRY[name]
    _load_pending()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; "
                          f"`cnntrain models` lists them all")
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """The registered models (families behind a resolver, such as ``timm/<name>``, only once used)."""
    _load_pending()
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


def create_model(name: str, num_classes: int, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (``in_channels`` defaults to its own)."""
    spec = get_spec(name)
    channels = spec.input_size[0] if in_channels is None else in_channels
    return spec.factory(num_classes=num_classes, in_channels=channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model_for(name: str, num_classes: int, shape: tuple[int, int, int] | None = None,
                     **kwargs) -> nn.Module:
    """``create_model`` for images of ``shape`` (C, H, W): passes ``image_size`` to the models whose
    classifier width depends on it."""
    if shape is None:
        return create_model(name, num_classes, **kwargs)
    if "image_size" in inspect.signature(get_spec(name).factory).parameters:
        kwargs.setdefault("image_size", tuple(shape[1:]))
    return create_model(name, num_classes, in_channels=shape[0], **kwargs)
