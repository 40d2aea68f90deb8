"""``fastnet``: a small residual-free CIFAR speed-run network.

Ideas, each from published work (implemented here from their descriptions):
- a frozen first layer that whitens 2x2 patches with the eigenvectors of their covariance,
  computed once from training images (Page, "How to train your ResNet" 2018; tysam-code
  hlb-CIFAR10; Keller Jordan, airbench, arXiv:2404.00498);
- three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU) widening 64 -> 256 -> 256, a
  max-pooled head scaled down before the softmax, BatchNorm weights frozen at 1 (airbench);
- the whitening layer's bias trained for the first ``whiten_bias_epochs`` epochs only (airbench);
- trained with label smoothing, lookahead of the weights, alternating flip + translate augmentation on
  the device, flip + translate test-time augmentation and a large batch with a triangular LR (see
  recipes/cifar10-fast.yaml).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.models.registry import register


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=0.4, eps=1e-12)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=0.4, eps=1e-12)
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)  # scale frozen at 1: only the shift is learnt
        for conv in (self.conv1, self.conv2):
            # Partly identity at the start (airbench): the first c_in filters pass their channel through.
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """Whitening 2x2 conv (frozen), three ConvGroups, global max-pool, linear head / ``head_scale``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 head_scale: float = 1 / 9, whiten_bias_epochs: float | None = 3) -> None:
        super().__init__()
        # Read by the optimizer's parameter groups: this bias stops training after these epochs.
        self.trainable_epochs = {} if whiten_bias_epochs is None else {"whiten.bias": whiten_bias_epochs}
        whiten_out = 2 * in_channels * 2 * 2  # each eigenvector and its negative
        self.whiten = nn.Conv2d(in_channels, whiten_out, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.Sequential(ConvGroup(whiten_out, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training ``images`` [N, C, H, W] (float)."""
        c = images.shape[1]
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        patches = patches - patches.mean(dim=0)
        cov = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.head_scale


@register("fastnet", input_size=(3, 32, 32), family="fast", recipe="cifar10-fast",
          description="speed-run CIFAR net: frozen patch whitening, 3 conv groups (airbench-style)")
def fastnet(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
            whiten_bias_epochs: float | None = 3) -> FastNet:
    return FastNet(num_classes, in_channels, tuple(widths), whiten_bias_epochs=whiten_bias_epochs)
