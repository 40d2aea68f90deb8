"""Mixup and CutMix (torchvision.transforms.v2's ``MixUp`` / ``CutMix``), and the batch stage that
applies them and random erasing to every training batch on the device.

    cnntrain train --dataset folder --data-dir photos --mixup 0.8 --cutmix 1.0 --random-erase 0.25

As timm's ``Mixup``: a batch is mixed with probability ``--mix-prob``; with both ``--mixup`` and
``--cutmix`` given, CutMix is chosen with probability ``--mixup-switch-prob``, else Mixup; one
mixing weight per batch, drawn from Beta(alpha, alpha); each image is mixed with its neighbour in
the (shuffled) batch. The labels become soft targets (float [N, classes], each row summing to 1),
also for a batch left unmixed, so the loss sees one kind of target. ``--label-smoothing`` composes
with them as timm's does: torch's cross-entropy smooths the mixed target,
``target * (1 - s) + s / classes``, which equals mixing the smoothed one-hot targets.

Every draw comes from a generator seeded by (seed, epoch, rank, step), so a resumed run mixes and
erases exactly as the uninterrupted one. The stage wraps any loader (in memory or streamed), so
every strategy that builds its loaders with ``build_loaders`` (single process, DDP, the async-ps
workers) trains with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.augment import PolicyAugment, apply_seeded, build_policy, draw_seeds, random_erasing
from cnntrain.data.pipeline import DeviceLoader, mix_seed
from cnntrain.data.samplers import RepeatedAugOrder

_STAGE_TAG = 0xB47C  # keeps the stage's generator apart from the augmentation's


class Mixing:
    """Mixup / CutMix of a batch as timm switches them; call with (images, labels, generator)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        from torchvision.transforms import v2

        self.num_classes, self.prob, self.switch_prob = num_classes, prob, switch_prob
        self.mixup = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None

    def choose(self, generator: torch.Generator) -> Callable | None:
        """The transform for this batch (None: left unmixed), drawn from ``generator``."""
        apply, switch = torch.rand(2, generator=generator).tolist()
        if apply >= self.prob:
            return None
        if self.mixup is not None and self.cutmix is not None:
            return self.cutmix if switch < self.switch_prob else self.mixup
        return self.mixup or self.cutmix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets float [N, classes])."""
        transform = self.choose(generator)
        seed = int(torch.randint(0, 1 << 62, (), generator=generator))
        if transform is None or len(labels) < 2:
            return images, torch.nn.functional.one_hot(labels, self.num_classes).float()
        with torch.random.fork_rng(devices=[]):  # MixUp / CutMix draw on the host
            torch.default_generator.manual_seed(seed)
            return transform(images, labels)


class BatchStage:
    """A training loader whose batches (normalised, on the device) go through random erasing (per
    image) and mixing (per batch); everything else is the wrapped loader's."""

    def __init__(self, loader, *, erase: float = 0.0, mixing: Mixing | None = None) -> None:
        self.loader = loader
        self.mixing = mixing
        self.erase = random_erasing(erase)

    _OWN = ("loader", "mixing", "erase")

    def __setattr__(self, name: str, value) -> None:
        # Set by build_loaders on the loader itself (its ``order``), whatever wraps it.
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The wrapped loader's batches from ``start_step`` of ``epoch``, erased and mixed."""
        for step, (images, labels) in enumerate(self.loader.iterate(epoch, start_step), start_step):
            yield self.apply(images, labels, epoch, step)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of ``step`` of ``epoch``: a function of (seed, epoch, rank, step) and the batch."""
        g = torch.Generator().manual_seed(mix_seed(self.loader.seed, epoch, self.loader.rank, step, _STAGE_TAG))
        if self.erase is not None:
            images = apply_seeded(self.erase, images, draw_seeds(g, len(images)))  # keeps channels_last
        if self.mixing is not None:
            images, labels = self.mixing(images, labels, g)
        return images, labels


def with_augmentation(cfg: TrainConfig, num_classes: int, train, world_size: int = 1):
    """``train`` (a DeviceLoader or StreamLoader) with the options of this module, ``augment.py`` and
    ``samplers.py``: the policy per image, the repeated-augmentation order, then random erasing and
    mixing per batch (a :class:`BatchStage` around it when either is on)."""
    policy = build_policy(cfg.auto_augment, magnitude=cfg.aa_magnitude, num_ops=cfg.aa_num_ops, bins=cfg.aa_bins,
                          severity=cfg.augmix_severity, width=cfg.augmix_width)
    if policy is not None:
        if isinstance(train, DeviceLoader):
            train.augment = PolicyAugment(train.augment, policy)
        else:  # streamed: the DataLoader workers apply it to each crop
            train.data = dataclasses.replace(train.data, policy=policy)
    if cfg.repeated_aug > 1:
        train.order = RepeatedAugOrder(train.size, cfg.repeated_aug, cfg.seed, train.global_batch, world_size)
    mixing = Mixing(num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mixup_switch_prob) \
        if cfg.mixup or cfg.cutmix else None
    if mixing is None and not cfg.random_erase:
        return train
    return BatchStage(train, erase=cfg.random_erase, mixing=mixing)
