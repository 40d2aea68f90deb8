"""Augmentation policies from ``torchvision.transforms.v2`` (RandAugment, TrivialAugment, AutoAugment,
AugMix) and random erasing, applied per image with a seed of its own.

torchvision's transforms draw from torch's global generator, and on a batch they draw once for the
whole batch. Here every image gets its own draw: :func:`apply_seeded` seeds the generator with the
image's seed, inside ``torch.random.fork_rng`` so nothing else's random state moves. The seeds are
functions of (seed, epoch, index or step), as the crops and flips are, so a resumed run sees the
same pixels and the number of DataLoader workers does not matter.

- ``--auto-augment``: on uint8 images after the crop and flip, before normalising: in the DataLoader
  workers for streamed sets (``StreamDataset.policy``), on the device for in-memory sets
  (``DeviceLoader.policy``);
- ``--random-erase P``: on the normalised float batch on the device (as timm, after ``Normalize``),
  filled with per-pixel normal noise (timm's ``--remode pixel``); the same code for both pipelines
  (``mixing.BatchStage``).

    policy = build_policy("randaugment", magnitude=9, num_ops=2)
    images = apply_seeded(policy, images, seeds)   # uint8 [N, C, H, W], one seed per image
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment-imagenet", "autoaugment-cifar10",
            "autoaugment-svhn", "augmix")
POLICY_TAG = 0xA0A0  # keeps the policy's seeds apart from the crop's


def build_policy(name: str, *, magnitude: int = 9, num_ops: int = 2, bins: int = 31, severity: int = 3,
                 width: int = 3) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The torchvision transform for ``--auto-augment name`` (None for ``none``): ``magnitude``,
    ``num_ops`` and ``bins`` are RandAugment's (``bins`` TrivialAugment's too), ``severity`` and
    ``width`` AugMix's."""
    if name == "none":
        return None
    from torchvision.transforms import v2  # here: importing torchvision costs about 1.5 s of start-up

    if name == "randaugment":
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=bins)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(num_magnitude_bins=bins)
    if name.startswith("autoaugment-"):
        policy = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar10": v2.AutoAugmentPolicy.CIFAR10,
                  "svhn": v2.AutoAugmentPolicy.SVHN}[name.removeprefix("autoaugment-")]
        return v2.AutoAugment(policy)
    if name == "augmix":
        return v2.AugMix(severity=severity, mixture_width=width)
    raise ValueError(f"unknown augmentation policy {name!r}; choose from {', '.join(POLICIES)}")


def random_erasing(p: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's RandomErasing with probability ``p`` (timm's area 2%..1/3, aspect 0.3..3.3),
    filling with normal noise: for normalised float images (None when ``p`` is 0)."""
    from torchvision.transforms import v2

    return v2.RandomErasing(p=p, value="random") if p > 0 else None


def apply_seeded(transform: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 seeds: Sequence[int]) -> torch.Tensor:
    """``transform`` applied to each image of ``images`` ([N, C, H, W]) alone, with torch's generators
    seeded by its seed: image ``i`` becomes exactly what ``torch.manual_seed(seeds[i]);
    transform(images[i])`` gives. The caller's random state is left as it was."""
    devices = [images.device] if images.device.type == "cuda" else []
    generators = [torch.default_generator]
    if devices:  # a transform of a CUDA image may draw there (AugMix's Dirichlet weights)
        generators.append(torch.cuda.default_generators[images.device.index or 0])
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=devices):
        for i, seed in enumerate(seeds):
            for generator in generators:  # what torch.manual_seed does, without its 0.25 ms of other backends
                generator.manual_seed(int(seed))
            out[i] = transform(images[i])
    return out


def apply_one(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's host generator seeded by ``seed`` (a DataLoader worker's
    image), the caller's random state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return transform(image)


class PolicyAugment:
    """The in-memory pipeline's augmentation (``pipeline.Augment``, or none) followed by a policy
    applied to each image on the device, its seed drawn from the batch's generator (seeded by
    (seed, epoch, rank, step)), so the copies of one image (``--repeated-aug``) differ."""

    def __init__(self, base: Callable | None, policy: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.policy = base, policy

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 flips: torch.Tensor | None = None) -> torch.Tensor:
        if self.base is not None:
            images = self.base(images, generator, flips)
        return apply_seeded(self.policy, images, draw_seeds(generator, len(images)))


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """``count`` per-image seeds from ``generator``."""
    return torch.randint(0, 1 << 62, (count,), generator=generator).tolist()
