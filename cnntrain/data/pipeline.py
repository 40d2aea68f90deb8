"""The in-memory pipeline for small data sets: the whole set as uint8 on the training device,
augmented in batches there.

Each epoch's order is a pure function of (seed, epoch) and each batch's augmentation a pure
function of (seed, epoch, rank, step), so a run resumed at any step sees exactly the batches the
uninterrupted run would have seen. With several processes, every rank takes a disjoint slice of
each global batch, so an epoch visits every training image once across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnntrain.data.base import ArrayDataset

_SEED_MIX = 0x9E3779B1  # odd constant to spread (seed, epoch, ...) into distinct generator seeds


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (Python's hash of ints is not stable across runs)."""
    value = 0x1234567
    for part in parts:
        value = (value * _SEED_MIX + int(part) + 1) % (1 << 63)
    return value


@dataclass(frozen=True)
class Augment:
    """Batched augmentation of uint8 images: random crop of a zero-padded image (``crop-flip``, He et
    al.) or of a reflect-padded one (``translate-flip``, airbench), rotation by a random angle in
    [-rotate, rotate] radians (NNabla's ``image_augmentation(angle=...)``), flip, cutout.

    ``alternate_flip`` (airbench): the caller passes each image's flip, which alternates from one
    epoch to the next from a random start, so every image is seen both ways in any two epochs.
    """

    flip: bool = True
    pad: int = 0  # crop from an image padded by this many pixels on every side
    reflect: bool = False  # pad by reflection instead of zeros
    cutout: int = 0  # side of a random square set to zero (0: off)
    alternate_flip: bool = False
    rotate: float = 0.0  # largest rotation in radians, either way (0: off)

    @classmethod
    def from_name(cls, name: str, pad: int = 4, cutout: int = 0, alternate_flip: bool = False,
                  rotate: float = 0.0) -> Augment | None:
        if name == "none":
            return None if not (cutout or rotate) else cls(flip=False, pad=0, cutout=cutout, rotate=rotate)
        if name in ("flip", "crop-flip", "translate-flip"):
            return cls(flip=True, pad=0 if name == "flip" else pad, reflect=name == "translate-flip", cutout=cutout,
                       alternate_flip=alternate_flip, rotate=rotate)
        raise ValueError(f"unknown augmentation {name!r}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 flips: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = images.shape
        device = images.device
        if self.pad:
            shifts = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator).to(device)
            images = random_crop(images, self.pad, shifts[0], shifts[1], "reflect" if self.reflect else "constant")
        if self.rotate:
            angles = (torch.rand(n, generator=generator) * 2 - 1) * self.rotate
            images = rotate(images, angles.to(device))
        if self.flip:
            if flips is None:
                flips = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flips.to(device)[:, None, None, None], images.flip(3), images)
        if self.cutout:
            centres = torch.rand(2, n, generator=generator).to(device)
            images = cutout(images, self.cutout, (centres[0] * h).long(), (centres[1] * w).long())
        return images


def random_crop(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor,
                mode: str = "constant") -> torch.Tensor:
    """Crop each image of the padded batch (zeros, or ``mode="reflect"``) at its own offset (dy, dx)
    in [0, 2*pad]."""
    n, c, h, w = images.shape
    if mode == "reflect":  # reflect padding is not implemented for uint8
        padded = torch.nn.functional.pad(images.float(), (pad,) * 4, mode="reflect").to(images.dtype)
    else:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indices around the channel slice put the indexed dims first: [N, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each uint8 image about its centre by its angle (radians; positive turns the picture
    anticlockwise as displayed, as ``torch.rot90``), bilinear, black where no pixel comes from."""
    n, c, h, w = images.shape
    cos, sin = angles.float().cos(), angles.float().sin()
    # The sampling grid is in [-1, 1] units of each side: scale the off-diagonal terms by the aspect.
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(cos)], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(images.dtype)


def cutout(images: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero a size x size square centred at (cy, cx) in each image (clipped at the borders)."""
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    inside_y = (ys >= (cy[:, None] - size // 2)) & (ys < (cy[:, None] - size // 2 + size))
    inside_x = (xs >= (cx[:, None] - size // 2)) & (xs < (cx[:, None] - size // 2 + size))
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    return images.masked_fill(mask[:, None], 0)


class BatchPlan:
    """Which samples each rank takes at each step, and the normalisation: shared by every loader.

    Training (``shuffle=True``): the global batch of step ``s`` in epoch ``e`` is
    ``perm(seed, e)[s*B*W:(s+1)*B*W]`` and rank ``r`` takes its r-th slice. The last global
    batch may be partial; it is split evenly over the ranks (dropped with ``drop_last``, or when a
    rank's share would be under 2, which BatchNorm cannot train on).
    Evaluation (``shuffle=False``): rank ``r`` takes a contiguous ``1/W`` of the set in order, so
    across ranks every image is scored exactly once.
    """

    def __init__(self, size: int, batch_size: int, *, device: torch.device, mean, std, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 channels_last: bool = False) -> None:
        self.size = size
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.channels_last = channels_last
        shape = (1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(shape).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(shape).to(device)
        self._eval_range = (size * rank // world_size, size * (rank + 1) // world_size)
        self.order = None  # epoch -> sample order replacing the shuffle (data/balance.py's BalancedOrder)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch (identical on every rank)."""
        if not self.shuffle:
            lo, hi = self._eval_range
            return -(-(hi - lo) // self.batch_size)
        full, rest = divmod(self.size, self.global_batch)
        keep_rest = rest and not self.drop_last and rest // self.world_size >= 2
        return full + (1 if keep_rest else 0)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self.order is not None:
            return self.order(epoch)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)

    def step_indices(self, epoch: int, step: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's sample indices at ``step`` of ``epoch`` (pass ``perm`` to reuse the epoch's)."""
        if not self.shuffle:
            lo, hi = self._eval_range
            begin = lo + step * self.batch_size
            return torch.arange(begin, min(begin + self.batch_size, hi))
        perm = self.permutation(epoch) if perm is None else perm
        chunk = perm[step * self.global_batch:(step + 1) * self.global_batch]
        return torch.tensor_split(chunk, self.world_size)[self.rank]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in visiting order."""
        perm = self.permutation(epoch) if self.shuffle else None
        return torch.cat([self.step_indices(epoch, s, perm) for s in range(len(self))])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device -> normalised float32 (channels_last when asked)."""
        x = images.to(torch.float32).mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class DeviceLoader(BatchPlan):
    """Batches of a whole in-memory data set, normalised floats on ``device`` (see ``BatchPlan``)."""

    def __init__(self, data: ArrayDataset, batch_size: int, *, device: torch.device, mean, std,
                 shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 augment: Augment | None = None, drop_last: bool = False, channels_last: bool = False) -> None:
        super().__init__(len(data), batch_size, device=device, mean=mean, std=std, shuffle=shuffle, seed=seed,
                         rank=rank, world_size=world_size, drop_last=drop_last, channels_last=channels_last)
        self.data = data
        self.augment = augment
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.flip_phase = None
        if augment is not None and augment.flip and augment.alternate_flip:
            g = torch.Generator().manual_seed(mix_seed(seed, len(data), 0xF11B))
            self.flip_phase = torch.rand(len(data), generator=g) < 0.5  # image i is mirrored in epoch 0

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) for steps ``start_step..`` of ``epoch``."""
        perm = self.permutation(epoch) if self.shuffle else None
        for step in range(start_step, len(self)):
            idx = self.step_indices(epoch, step, perm).to(self.device)
            images = self.images[idx]
            if self.augment is not None:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, step))
                flips = None if self.flip_phase is None else self.flip_phase[idx.cpu()] ^ bool(epoch % 2)
                images = self.augment(images, g, flips)
            yield self.normalise(images), self.labels[idx]
