"""Repeated augmentation (Hoffer et al. 2020, "Augment your batch"; DeiT's and timm's ``--aug-repeats``):
each image of an epoch is shown ``N`` times, each time with its own random augmentation.

As in timm, an epoch keeps its length (``len(train)`` images), so it holds ``1/N`` of the images
``N`` times each. Unlike timm's sampler, which picks that ``1/N`` afresh every epoch (some images are
never seen over ``N`` epochs, others twice), epochs ``kN .. kN+N-1`` share one permutation of the set
and each takes the next ``N``-th of it: every image is shown exactly ``N`` times in every ``N``
epochs (when ``N`` divides the number of images).

The order is a pure function of (seed, epoch), like the plain shuffle, so a run resumed mid-epoch
continues it exactly. The copies of an image are dealt to ranks as timm deals them
(``indices[rank::world]``): with ``world >= N`` every copy lands on another rank.

    order = RepeatedAugOrder(50_000, repeats=3, seed=0, global_batch=1024, world_size=8)
    plan.order = order            # BatchPlan takes each epoch's order from it
"""

from __future__ import annotations

import torch

from cnntrain.data.pipeline import mix_seed

_REPEAT_TAG = 0x5E9EA7  # keeps this order's generator apart from the plain shuffle's


class RepeatedAugOrder:
    """Each epoch's sample order for :class:`cnntrain.data.pipeline.BatchPlan` (``plan.order``): the
    global batch of step ``s`` is ``order[s*B*W:(s+1)*B*W]`` and rank ``r`` takes its ``r``-th
    contiguous slice, so the order is arranged to give rank ``r`` every ``W``-th entry of the list of
    repeated images."""

    def __init__(self, size: int, repeats: int, seed: int, global_batch: int, world_size: int = 1) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.size, self.repeats, self.seed = size, repeats, seed
        self.global_batch, self.world_size = global_batch, world_size

    def repeated(self, epoch: int) -> torch.Tensor:
        """The epoch's images, each ``repeats`` times in a row (``len == size``): the ``epoch % N``-th
        part of the permutation shared by the ``N`` epochs of its cycle."""
        cycle, part = divmod(epoch, self.repeats)
        g = torch.Generator().manual_seed(mix_seed(self.seed, cycle, _REPEAT_TAG))
        perm = torch.randperm(self.size, generator=g)
        chosen = torch.tensor_split(perm, self.repeats)[part]
        out = chosen.repeat_interleave(self.repeats)
        if len(out) < self.size:  # N does not divide the set: top up from the next images of the cycle
            out = torch.cat([out, perm.roll(-len(chosen) * (part + 1))[:self.size - len(out)]])
        return out[:self.size]

    def __call__(self, epoch: int) -> torch.Tensor:
        """The order BatchPlan slices: every global batch dealt out as ``chunk[rank::world]``."""
        items, world = self.repeated(epoch), self.world_size
        if world == 1:
            return items
        chunks = torch.split(items, self.global_batch)
        return torch.cat([chunk[r::world] for chunk in chunks for r in range(world)])
