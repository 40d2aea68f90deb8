"""Small reference networks: cifar-tf's simplecnn, SINGA's cnn and mlp, LeNet-5, nvcnn's trivial.

Each ends in fully-connected layers whose input width depends on the image size, so every factory
takes ``image_size`` (an int or (height, width); default: the registered size) and the width is
found by running a dummy batch through the convolutional part once, at construction time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.models.registry import register


def image_hw(image_size: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    """``image_size`` (None, an int, or (height, width)) as (height, width) in pixels."""
    if image_size is None:
        return default, default
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def flat_features(features: nn.Module, in_channels: int, hw: tuple[int, int]) -> int:
    """Number of values ``features`` produces for one ``in_channels x H x W`` image."""
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, *hw)).numel()


class MaxPoolSame(nn.Module):
    """Max-pooling with TensorFlow's "SAME" padding (extra padding goes to the bottom/right)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pad(self, n: int) -> tuple[int, int]:
        total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (*self._pad(x.shape[-1]), *self._pad(x.shape[-2])), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class SimpleCNN(nn.Module):
    """cifar-tf's model (the TensorFlow CIFAR-10 tutorial network).

    conv 5x5/64 + ReLU, max-pool 3x3/2, conv 5x5/64 + ReLU, max-pool 3x3/2, fc 384 + ReLU,
    fc 192 + ReLU, linear. The reference feeds 24x24 crops; at 32x32 the flattened width is
    64*8*8 = 4096. ``lrn=True`` adds the tutorial's local response normalisation
    (depth_radius 4, bias 1, alpha 0.001/9, beta 0.75) after pool1 and after conv2.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, hw: tuple[int, int] = (32, 32),
                 lrn: bool = False) -> None:
        super().__init__()

        def norm() -> nn.Module:
            # TF scales the plain sum of squares by alpha; PyTorch divides alpha by the window
            # size (2*4+1 = 9) first, so 0.001/9 in TF is 0.001 here.
            return nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0) if lrn else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(), MaxPoolSame(3, 2), norm(),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), norm(), MaxPoolSame(3, 2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, in_channels, hw), 384), nn.ReLU(),
            nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SingaCNN(nn.Module):
    """SINGA ``examples/cnn/model/cnn.py``: conv 5x5/20 + ReLU, pool 2, conv 5x5/50 + ReLU, pool 2,
    fc 500 + ReLU, fc classes (no padding anywhere: 28 -> 24 -> 12 -> 8 -> 4)."""

    def __init__(self, num_classes: int, in_channels: int = 1, hw: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, in_channels, hw), 500), nn.ReLU(),
            nn.Linear(500, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeCun et al. 1998 LeNet-5 with ReLU and max-pooling: conv 5x5/6 (padded by 2, so 28x28 input
    behaves like the paper's 32x32), pool 2, conv 5x5/16, pool 2, fc 120, fc 84, fc classes."""

    def __init__(self, num_classes: int, in_channels: int = 1, hw: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, in_channels, hw), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("simplecnn", input_size=(3, 32, 32), family="small", recipe="cifartf-simplecnn",
          description="cifar-tf / TensorFlow CIFAR-10 tutorial CNN: 2 conv 5x5/64, fc 384, fc 192")
def simplecnn(num_classes: int, in_channels: int = 3, image_size: int | tuple[int, int] | None = None,
              lrn: bool = False) -> nn.Module:
    """cifar-tf's simple CNN; ``lrn=True`` restores the tutorial's local response normalisation."""
    return SimpleCNN(num_classes, in_channels, image_hw(image_size, 32), lrn=lrn)


@register("cnn", input_size=(1, 28, 28), family="singa", recipe="singa-mnist-cnn",
          description="SINGA examples/cnn cnn: conv 5x5/20, conv 5x5/50, fc 500")
def cnn(num_classes: int, in_channels: int = 1, image_size: int | tuple[int, int] | None = None) -> nn.Module:
    """SINGA's MNIST CNN (works on any image size via ``image_size``)."""
    return SingaCNN(num_classes, in_channels, image_hw(image_size, 28))


@register("mlp", input_size=(1, 28, 28), family="singa",
          description="SINGA examples/mlp: fc perceptron_size (100) + ReLU, fc classes")
def mlp(num_classes: int, in_channels: int = 1, image_size: int | tuple[int, int] | None = None,
        perceptron_size: int = 100) -> nn.Module:
    """SINGA ``examples/mlp/model.py``: a two-layer perceptron on the flattened image."""
    h, w = image_hw(image_size, 28)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, perceptron_size), nn.ReLU(),
                         nn.Linear(perceptron_size, num_classes))


@register("lenet", input_size=(1, 28, 28), family="small",
          description="LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling")
def lenet(num_classes: int, in_channels: int = 1,
          image_size: int | tuple[int, int] | None = None) -> nn.Module:
    """LeNet-5 for 28x28 digits (``image_size`` for other sizes)."""
    return LeNet5(num_classes, in_channels, image_hw(image_size, 28))


@register("trivial", input_size=(3, 224, 224), family="small",
          description="nvcnn trivial: flatten, fc 1 + ReLU, fc classes (input-pipeline benchmark)")
def trivial(num_classes: int, in_channels: int = 3,
            image_size: int | tuple[int, int] | None = None) -> nn.Module:
    """nvcnn's ``inference_trivial``: flatten, fully-connected to 1 unit with ReLU (nvcnn's
    default activation), then the final fully-connected layer nvcnn adds to every model."""
    h, w = image_hw(image_size, 224)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, 1), nn.ReLU(),
                         nn.Linear(1, num_classes))
