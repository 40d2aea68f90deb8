"""NNabla's CIFAR ResNet-23, as in nnabla-examples ``image-classification/cifar10-100/models.py``.

``resnet23_prediction`` there: a 3x3 stem to ``nmaps`` channels, seven bottleneck units that keep
the width constant, a 2x2 max-pool after units 2, 4 and 6 (32 -> 16 -> 8 -> 4), a 4x4 average pool
and one affine layer. CIFAR-10 uses 64 maps with ReLU; CIFAR-100 uses 384 maps with ELU
(``classification.py``: ``nmaps=384, act=F.elu``). The reference's in-graph preprocessing
(``F.image_augmentation``) belongs to the data pipeline here, not to the model.

Every convolution has ``with_bias=False`` (BatchNorm follows each one), which is what gives the
10-class model its 97,482 parameters; with biases it would have 98,442.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnntrain.errors import ConfigError
from cnntrain.models.registry import register

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}


def _conv_bn(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BottleneckUnit(nn.Module):
    """1x1 (C -> C/2), 3x3 (C/2 -> C/2), 1x1 (C/2 -> C), each with BN; add input; activation."""

    def __init__(self, maps: int, act: type[nn.Module], downsample: bool) -> None:
        super().__init__()
        half = maps // 2
        self.body = nn.Sequential(*_conv_bn(maps, half, 1), act(), *_conv_bn(half, half, 3), act(),
                                  *_conv_bn(half, maps, 1))
        self.act = act()
        # NNabla pools after the residual add, so the unit itself never changes resolution.
        self.pool = nn.MaxPool2d(2, 2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + x))


class ResNet23(nn.Module):
    """NNabla ResNet-23: stem, 7 constant-width bottleneck units, global average pool, affine."""

    def __init__(self, num_classes: int, in_channels: int = 3, maps: int = 64, act: str = "relu") -> None:
        super().__init__()
        act_cls = _ACTIVATIONS[act]
        self.stem = nn.Sequential(*_conv_bn(in_channels, maps, 3), act_cls())
        # Units 2, 4 and 6 (NNabla's scopes conv3, conv5, conv7) end in a max-pool.
        self.units = nn.Sequential(*(BottleneckUnit(maps, act_cls, downsample=i in (1, 3, 5))
                                     for i in range(7)))
        # NNabla averages over a fixed 4x4 window, i.e. globally at 32x32 input.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(maps, num_classes)
        # NNabla's PF.convolution / PF.affine default to Glorot-uniform weights and zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _check_act(act: str) -> None:
    if act not in _ACTIVATIONS:
        raise ConfigError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")


@register("resnet23", input_size=(3, 32, 32), family="nnabla", recipe="nnabla-cifar10-resnet23",
          description="NNabla CIFAR-10 ResNet-23: 64 maps, ReLU (nnabla-examples cifar10-100)")
def resnet23(num_classes: int, in_channels: int = 3, maps: int = 64, act: str = "relu") -> nn.Module:
    """NNabla's CIFAR-10 ResNet-23 (``maps`` channels throughout, ``act`` in "relu"/"elu")."""
    _check_act(act)
    return ResNet23(num_classes, in_channels, maps=maps, act=act)


@register("resnet23-c100", input_size=(3, 32, 32), family="nnabla", recipe="nnabla-cifar100-resnet23",
          description="NNabla CIFAR-100 ResNet-23: 384 maps, ELU (nnabla-examples cifar10-100)")
def resnet23_c100(num_classes: int, in_channels: int = 3, maps: int = 384, act: str = "elu") -> nn.Module:
    """NNabla's CIFAR-100 ResNet-23: the same network, 384 maps wide, with ELU activations."""
    _check_act(act)
    return ResNet23(num_classes, in_channels, maps=maps, act=act)
