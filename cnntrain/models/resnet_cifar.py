"""He et al. 2015, "Deep Residual Learning for Image Recognition", section 4.2: CIFAR ResNets.

A 3x3 stem to 16 maps, then three stages of ``n`` basic blocks with 16, 32 and 64 maps (feature maps
32x32, 16x16, 8x8), global average pooling and a linear layer: 6n+2 weighted layers. The paper uses
option A shortcuts when the shape changes (identity on a strided subsample, zero-padded channels,
parameter free); ``shortcut="B"`` swaps in 1x1 convolution + BN projections instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.errors import ConfigError
from cnntrain.models.registry import register


class ShortcutA(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # Zero channels on both sides, as the common reference implementations do.
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection; ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, n: int, num_classes: int, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                stages.append(BasicBlock(cin, cout, stride if i == 0 else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        # The paper initialises convolutions as in He et al. 2015, "Delving deep into rectifiers"
        # (fan_out, as fb.resnet.torch does); the classifier keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register(n: int) -> None:
    depth = 6 * n + 2

    def factory(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> nn.Module:
        shortcut = shortcut.upper()
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' (zero-pad) or 'B' (1x1 projection), got {shortcut!r}")
        return CifarResNet(n, num_classes, in_channels, shortcut)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"He et al. 2015 CIFAR ResNet-{depth} ({n} basic blocks per stage)."
    register(f"resnet{depth}", input_size=(3, 32, 32), family="resnet-cifar",
             recipe=f"he2015-cifar10-resnet{depth}" if depth in (20, 56, 110) else None,
             description=f"He et al. 2015 CIFAR ResNet-{depth}, option A shortcuts "
                         f"(shortcut='B' for 1x1 projections)")(factory)


for _n in (3, 5, 7, 9, 18):  # ResNet-20, 32, 44, 56, 110
    _register(_n)
