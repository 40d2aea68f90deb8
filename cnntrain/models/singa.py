"""Apache SINGA's ImageNet-size examples, layer for layer: ``examples/cnn/model/alexnet.py`` and
``examples/cnn/model/xceptionnet.py`` (itself adapted from Cadene's pretrained-models.pytorch).

SINGA's defaults carried over: ``layer.Conv2d`` and ``layer.Linear`` have biases,
``layer.SeparableConv2d`` (depthwise + pointwise) has none, ``layer.Dropout`` drops half,
``layer.BatchNorm2d`` keeps 0.9 of the running statistics (PyTorch's momentum 0.1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnntrain.models.registry import register
from cnntrain.models.small import flat_features, image_hw


class SingaAlexNet(nn.Module):
    """SINGA's AlexNet variant (max-pool 2x2 instead of 3x3/2, then a 3x3/2 average pool).

    At 224x224: conv 11x11/4 -> 55, pool -> 27, conv 5x5 -> 27, pool -> 13, three 3x3 convs,
    pool -> 6, avg-pool 3/2 -> 2, so the classifier sees 256*2*2 = 1024 values.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, hw: tuple[int, int] = (224, 224)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.AvgPool2d(3, 2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(flat_features(self.features, in_channels, hw), 4096), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SeparableConv2d(nn.Sequential):
    """SINGA ``layer.SeparableConv2d``: depthwise k x k convolution, then pointwise 1x1 (no biases)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cin, kernel, stride, padding, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False))


class XceptionBlock(nn.Module):
    """SINGA's xceptionnet ``Block``: ``reps`` x (ReLU, separable 3x3, BN), an optional 3x3 max-pool,
    plus a 1x1-conv + BN skip when the shape changes (identity otherwise)."""

    def __init__(self, cin: int, cout: int, reps: int, stride: int = 1, start_with_relu: bool = True,
                 grow_first: bool = True) -> None:
        super().__init__()
        if cout != cin or stride != 1:
            self.skip: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                 nn.BatchNorm2d(cout))
        else:
            self.skip = nn.Identity()
        layers: list[nn.Module] = []
        width = cin
        if grow_first:
            layers += [nn.ReLU(), SeparableConv2d(cin, cout), nn.BatchNorm2d(cout)]
            width = cout
        for _ in range(reps - 1):
            layers += [nn.ReLU(), SeparableConv2d(width, width), nn.BatchNorm2d(width)]
        if not grow_first:
            layers += [nn.ReLU(), SeparableConv2d(cin, cout), nn.BatchNorm2d(cout)]
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        # Not in-place: the skip path still needs the block's input.
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Xception(nn.Module):
    """Chollet 2017, "Xception", as SINGA builds it for 299x299 input.

    Differences from the paper kept from SINGA: conv2 is padded (149x149 after the stem, not 147),
    and the head global-*max*-pools (SINGA's ``MaxPool2d(10, 1)`` over the final 10x10 map) before
    the linear layer. The max-pool here is adaptive, so other input sizes work too.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 2, 0, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.blocks = nn.Sequential(
            XceptionBlock(64, 128, 2, 2, start_with_relu=False),
            XceptionBlock(128, 256, 2, 2),
            XceptionBlock(256, 728, 2, 2),
            *(XceptionBlock(728, 728, 3, 1) for _ in range(8)),
            XceptionBlock(728, 1024, 2, 2, grow_first=False))
        self.head = nn.Sequential(
            SeparableConv2d(1024, 1536), nn.BatchNorm2d(1536), nn.ReLU(),
            SeparableConv2d(1536, 2048), nn.BatchNorm2d(2048), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


@register("singa-alexnet", input_size=(3, 224, 224), family="singa",
          description="SINGA examples/cnn AlexNet variant (2x2 pools, 1024-wide classifier input)")
def singa_alexnet(num_classes: int, in_channels: int = 3,
                  image_size: int | tuple[int, int] | None = None) -> nn.Module:
    """SINGA's AlexNet (``image_size`` sets the classifier width for non-224 inputs)."""
    return SingaAlexNet(num_classes, in_channels, image_hw(image_size, 224))


@register("xception", input_size=(3, 299, 299), family="singa",
          description="Xception (Chollet 2017) as in SINGA examples/cnn xceptionnet")
def xception(num_classes: int, in_channels: int = 3) -> nn.Module:
    """SINGA's Xception for 299x299 images."""
    return Xception(num_classes, in_channels)
