"""Data set names -> train and validation sets, with their normalisation and default augmentation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cnntrain.config import TrainConfig
from cnntrain.data.base import ArrayDataset
from cnntrain.data.cache import cache_root
from cnntrain.data.cifar import load_cifar
from cnntrain.data.crops import INTERPOLATIONS
from cnntrain.data.folder import find_split, folder_dataset, load_image_folder, needs_streaming, scan_image_folder
from cnntrain.data.mnist import load_mnist
from cnntrain.data.stream_dataset import IMAGENET_STATS, StreamDataset
from cnntrain.data.synthetic import make_synthetic
from cnntrain.data.tarshards import tar_dataset
from cnntrain.data.tfrecord import shard_paths, tfrecord_dataset
from cnntrain.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger("cnntrain")

VAL_SPLIT_SEED = 20150  # fixed, so every run holds out the same validation images


@dataclass
class DataBundle:
    """What the engine needs to know about a data set."""

    train: ArrayDataset | StreamDataset
    val: ArrayDataset | StreamDataset | None
    val_name: str  # "val" (held out of train) or "test"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # default augmentation for this set

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape


MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _mnist(cfg: TrainConfig, variant: str):
    root = Path(cfg.data_dir)
    kw = dict(variant=variant, download=cfg.download, verify=cfg.verify)
    stats = MNIST_STATS if variant == "mnist" else FASHION_STATS
    return load_mnist(root, True, **kw), load_mnist(root, False, **kw), stats, "none"


def _cifar(cfg: TrainConfig, num_classes: int):
    root = Path(cfg.data_dir)
    kw = dict(num_classes=num_classes, label_mode=cfg.label_mode, download=cfg.download, verify=cfg.verify)
    stats = CIFAR10_STATS if num_classes == 10 else CIFAR100_STATS
    return load_cifar(root, True, **kw), load_cifar(root, False, **kw), stats, "crop-flip"


DEFAULT_STREAM_SIZE = 224  # crop side of streamed sets when neither --image-size nor the model says


def _stream_size(cfg: TrainConfig, input_size: tuple[int, int, int] | None) -> int:
    """Crop side for streamed sets: --image-size, else the model's own input size (299 for Inception V3)."""
    return cfg.image_size or (input_size[1] if input_size else DEFAULT_STREAM_SIZE)


def _stream_folder(cfg: TrainConfig, size: int):
    root = Path(cfg.data_dir)
    train = folder_dataset(root / "train", size, min_scale=cfg.min_crop_scale)
    split = find_split(root)
    test = folder_dataset(root / split, size, train.classes) if split else None
    return train, test, IMAGENET_STATS, "random-resized-crop"


def _tfrecord(cfg: TrainConfig, size: int):
    root = Path(cfg.data_dir)
    train = tfrecord_dataset(root, "train", size, min_scale=cfg.min_crop_scale)
    test = tfrecord_dataset(root, "validation", size, train.classes) if shard_paths(root, "validation") else None
    return train, test, IMAGENET_STATS, "random-resized-crop"


def _tar(cfg: TrainConfig, size: int):
    root = Path(cfg.data_dir)
    train = tar_dataset(root, "train", size, min_scale=cfg.min_crop_scale)
    has_val = any(p.suffix == ".tar" for p in shard_paths(root, "validation"))
    test = tar_dataset(root, "validation", size, train.classes) if has_val else None
    return train, test, IMAGENET_STATS, "random-resized-crop"


def _folder(cfg: TrainConfig, stream_size: int):
    root = Path(cfg.data_dir)
    if cfg.pipeline == "stream":
        return _stream_folder(cfg, stream_size)
    scan = scan_image_folder(root / "train")  # once: listing 50k files takes seconds
    # Small same-size images (CIFAR-like) fit in memory and train faster there; photos do not.
    if cfg.pipeline == "auto" and needs_streaming(root / "train", scan=scan):
        return _stream_folder(cfg, stream_size)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    kw = dict(size=size, max_pixels=cfg.max_image_pixels, cache_dir=cache_root(cfg.cache_dir) if cfg.cache else None)
    train = load_image_folder(root, "train", scan=scan, **kw)
    split = find_split(root)
    test = load_image_folder(root, split, classes=train.classes, **kw) if split else None
    stats = channel_stats(train)
    augment = "crop-flip" if max(train.shape[1:]) <= 64 else "flip"
    return train, test, stats, augment


DEFAULT_SYNTHETIC_SHAPE = (3, 32, 32)  # when neither --synthetic-shape, --image-size nor the model says


def synthetic_shape(cfg: TrainConfig, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of synthetic images: --synthetic-shape, else the model's input size with H and W
    from --image-size when given (so a 299-px Inception V3 gets 299-px images)."""
    if cfg.synthetic_shape:
        if len(cfg.synthetic_shape) != 3:
            raise ConfigError(f"--synthetic-shape needs C H W, got {list(cfg.synthetic_shape)}")
        return tuple(cfg.synthetic_shape)
    channels, height, width = input_size or DEFAULT_SYNTHETIC_SHAPE
    if cfg.image_size:
        height = width = cfg.image_size
    return channels, height, width


def _synthetic(cfg: TrainConfig, shape: tuple[int, int, int]):
    n, k = cfg.synthetic_size, cfg.synthetic_classes
    # One draw split in two, so the test images share the training images' class patterns.
    both = make_synthetic(n + max(n // 4, 1), shape, k, seed=cfg.seed)
    train, test = both.subset(torch.arange(n)), both.subset(torch.arange(n, len(both)))
    stats = ((0.5,) * shape[0], (0.25,) * shape[0])
    return train, test, stats, "none"


# Each takes (cfg, the model's input (C, H, W) or None).
LOADERS: dict[str, Callable] = {
    "mnist": lambda cfg, _: _mnist(cfg, "mnist"),
    "fashion-mnist": lambda cfg, _: _mnist(cfg, "fashion"),
    "cifar10": lambda cfg, _: _cifar(cfg, 10),
    "cifar100": lambda cfg, _: _cifar(cfg, 100),
    "folder": lambda cfg, model_in: _folder(cfg, _stream_size(cfg, model_in)),
    # train/<wnid>/*.JPEG + val/<wnid>/*.JPEG, always streamed
    "imagenet": lambda cfg, model_in: _stream_folder(cfg, _stream_size(cfg, model_in)),
    # train-* / validation-* shards with image/encoded, 1-based image/class/label
    "tfrecord": lambda cfg, model_in: _tfrecord(cfg, _stream_size(cfg, model_in)),
    # train-*.tar / validation-*.tar shards: <key>.jpg + <key>.cls (0-based), WebDataset layout
    "tar": lambda cfg, model_in: _tar(cfg, _stream_size(cfg, model_in)),
    "synthetic": lambda cfg, model_in: _synthetic(cfg, synthetic_shape(cfg, model_in)),
}


def dataset_names() -> list[str]:
    return sorted(LOADERS)


def with_resize(data: DataBundle, eval_resize: int, interpolation: str) -> DataBundle:
    """``data`` whose streamed splits resize as given: evaluation's shorter side before the centre crop
    (pixels; 0: the crop side x 256/224) and the interpolation of every resize (an unknown one: bilinear)."""
    if interpolation not in INTERPOLATIONS:
        log.warning("interpolation %r is not one of %s: bilinear instead", interpolation, ", ".join(INTERPOLATIONS))
        interpolation = "bilinear"
    streamed = {name: dataclasses.replace(split, eval_resize=eval_resize, interpolation=interpolation)
                for name in ("train", "val") if isinstance(split := getattr(data, name), StreamDataset)}
    return dataclasses.replace(data, **streamed)


def load_data(cfg: TrainConfig, input_size: tuple[int, int, int] | None = None) -> DataBundle:
    """Load ``cfg.dataset`` (into memory, or listed for streaming) and split off a validation set when asked.

    ``input_size`` is the model's input (C, H, W), e.g. ``get_spec(cfg.model).input_size``: streamed
    sets are cropped to its H unless ``--image-size`` says otherwise (224 when neither is given), and
    synthetic images take its shape unless ``--synthetic-shape`` or ``--image-size`` say otherwise
    (3 x 32 x 32 when none is given). In-memory image folders are read through the decoded-image
    cache (``data/cache.py``) unless ``--no-cache``.
    """
    if cfg.dataset not in LOADERS:
        raise ConfigError(f"unknown data set {cfg.dataset!r}{did_you_mean(cfg.dataset, LOADERS)}; "
                          f"choose from {', '.join(dataset_names())}")
    train, test, (mean, std), augment = LOADERS[cfg.dataset](cfg, input_size)
    streamed = isinstance(train, StreamDataset)
    if streamed:
        train.crop = cfg.crop
        for part in (train, test):
            if part is not None:
                part.decode = cfg.decode
                part.max_pixels = cfg.max_image_pixels
    _warn_unused_options(cfg, streamed)
    val, val_name = test, "test"
    if cfg.val_split:
        train, val = hold_out(train, cfg.val_split)
        val_name = "val"
    if cfg.augment != "auto" and augment != "random-resized-crop":  # streamed sets crop per image
        augment = cfg.augment
    check_labels(train)
    if val is not None:
        check_labels(val, train.num_classes)
    return DataBundle(train, val, val_name, tuple(mean), tuple(std), augment)


def _warn_unused_options(cfg: TrainConfig, streamed: bool) -> None:
    """Say so when an augmentation option given cannot act on this kind of set (in memory or streamed)."""
    if streamed:
        unused = [("--rotate", cfg.rotate), ("--cutout", cfg.cutout), ("--alternate-flip", cfg.alternate_flip)]
        where = "it is streamed (RandomResizedCrop or --crop), these act on in-memory sets"
    else:
        unused = [("--crop", cfg.crop != "random-resized"), ("--decode", cfg.decode != "host")]
        where = "it is held in memory, these act on streamed sets"
    names = [name for name, given in unused if given]
    if names:
        log.warning("%s: %s ignored: %s", cfg.dataset, ", ".join(names), where)


def hold_out(train: ArrayDataset, count: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``count`` images (a fixed random choice) off ``train`` as a validation set."""
    if not 0 < count < len(train):
        raise ConfigError(f"--val-split {count} must be between 1 and {len(train) - 1} "
                          f"(the training set has {len(train)} images)")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return train.subset(perm[count:].sort().values), train.subset(perm[:count].sort().values)


def check_labels(data: ArrayDataset, num_classes: int | None = None) -> None:
    k = num_classes or data.num_classes
    if len(data) == 0:
        raise DataError(f"{data.source or 'data set'}: no images")
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= k:
        raise DataError(f"{data.source or 'data set'}: label {hi if hi >= k else lo} out of range [0, {k})")


def channel_stats(data: ArrayDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of a uint8 set, in [0, 1] units."""
    sample = data.images[: min(len(data), 10000)]  # uint8: ArrayDataset holds nothing else
    # From each channel's histogram of its 256 values: exact, and 5x faster than a float64 copy.
    counts = torch.stack([torch.bincount(sample[:, c].reshape(-1), minlength=256) for c in range(sample.shape[1])])
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1).double()
    mean = (counts.double() @ values) / n
    var = ((counts.double() @ values.square()) - n * mean.square()) / (n - 1).clamp_min(1)  # unbiased, as std()
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().clamp_min(1e-3).tolist())
