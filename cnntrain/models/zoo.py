"""Every torchvision classification model, under torchvision's own name, randomly initialised.

The list comes from ``torchvision.models.list_models(module=torchvision.models)``, which holds the
ImageNet classifiers only (detection, segmentation, video, optical flow and quantized models live in
submodules). The factories never download: ``weights`` is fixed to None, and ``--pretrained [TAG]``
loads torchvision's published weights afterwards (``models/pretrained.py``), keeping a new head for
another class count.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from cnntrain.errors import ConfigError
from cnntrain.models.registry import register, register_family

# Models whose auxiliary classifiers default to on in torchvision; off here unless asked for, so the
# forward pass returns a plain tensor. With aux_logits=True, train-mode forward returns a namedtuple
# (InceptionOutputs / GoogLeNetOutputs) whose first field is the main logits.
_AUX_MODELS = ("googlenet", "inception_v3")


def _input_size(name: str) -> tuple[int, int, int]:
    """(3, S, S) with S the smallest crop any published weight of ``name`` uses.

    That is the size the weights=None architecture is built for: vit_h_14 and regnet_y_128gf have
    a larger DEFAULT (SWAG fine-tunes at 518 and 384) but build at 224 without weights.
    """
    import torchvision

    try:
        crops = [min(w.transforms().crop_size) for w in torchvision.models.get_model_weights(name)]
    except (ValueError, AttributeError, TypeError):
        crops = []
    size = min(crops) if crops else 224
    return (3, size, size)


def _replace_stem(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first 3-channel convolution (the stem of every torchvision classifier) for one
    that takes ``in_channels``; its weights are drawn at the scale the model's own init used."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, bias=child.bias is not None,
                                padding_mode=child.padding_mode)
                nn.init.normal_(new.weight, 0.0, float(child.weight.detach().std()))
                if child.bias is not None:
                    new.bias.data.copy_(child.bias.data)
                setattr(parent, child_name, new)
                return
    raise ConfigError(f"model {name!r} needs 3 input channels (found no 3-channel stem convolution "
                      f"to replace); convert the images to RGB")


def _make_factory(name: str):
    def factory(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        if "weights" in kwargs or "pretrained" in kwargs:
            raise ConfigError(f"{name}: give pretrained weights with --pretrained [TAG] (torchvision's "
                              f"weights enum, e.g. DEFAULT) or --init-from PATH, not as a model keyword")
        if name in _AUX_MODELS:
            kwargs.setdefault("aux_logits", False)
            kwargs.setdefault("init_weights", True)  # torchvision warns when this is left unset
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as exc:  # an unknown model_kwargs key
            raise ConfigError(f"{name}: {exc}") from None
        if in_channels != 3:
            _replace_stem(model, in_channels, name)
        return model

    factory.__name__ = name
    factory.__doc__ = f"torchvision.models.{name}, randomly initialised (its paper: torchvision's docs)."
    return factory


def _register_all() -> None:
    import torchvision  # slow (it imports torch._dynamo), so only when a torchvision model is asked for

    for name in torchvision.models.list_models(module=torchvision.models):
        register(name, input_size=_input_size(name), family="torchvision",
                 recipe={"resnet50": "nvcnn-resnet50", "inception_v3": "nvcnn-inception3"}.get(name),
                 description=f"torchvision.models.{name}")(_make_factory(name))


register_family(_register_all)
