"""Augmentation policies and random erasing (data/augment.py), repeated augmentation (data/samplers.py):
torchvision's transforms per image and seed, on both pipelines, and resume exactness with them on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

import cnntrain
from cnntrain.config import build_config
from cnntrain.data.augment import POLICY_TAG, PolicyAugment, apply_seeded, build_policy, draw_seeds
from cnntrain.data.base import ArrayDataset
from cnntrain.data.folder import folder_dataset
from cnntrain.data.mixing import BatchStage, with_augmentation
from cnntrain.data.pipeline import BatchPlan, DeviceLoader, mix_seed
from cnntrain.data.samplers import RepeatedAugOrder
from cnntrain.data.streaming import StreamLoader
from cnntrain.errors import ConfigError
from tests.fixtures import write_image_folder
from tests.helpers import metrics_rows, same_weights, tiny

CPU = torch.device("cpu")

# Each policy as torchvision builds it, independently of build_policy.
TORCHVISION = {
    "randaugment": lambda: v2.RandAugment(num_ops=3, magnitude=12, num_magnitude_bins=21),
    "trivialaugment": lambda: v2.TrivialAugmentWide(num_magnitude_bins=21),
    "autoaugment-imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
    "autoaugment-cifar10": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    "autoaugment-svhn": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.SVHN),
    "augmix": lambda: v2.AugMix(severity=4, mixture_width=2),
}
OPTIONS = dict(magnitude=12, num_ops=3, bins=21, severity=4, width=2)


def _images(n: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_each_policy_changes_each_image_as_torchvision_does_on_its_seed(name):
    images, seeds = _images(), [11, 12, 13, 14, 15, 16]
    policy = build_policy(name, **OPTIONS)
    out = apply_seeded(policy, images, seeds)
    reference = TORCHVISION[name]()
    for image, seed, got in zip(images, seeds, out):
        torch.manual_seed(seed)
        assert torch.equal(got, reference(image))
    assert not torch.equal(out, images)  # the policy did act
    state = torch.get_rng_state()
    apply_seeded(policy, images, seeds)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone


def test_random_erasing_is_torchvisions_on_the_normalised_batch():
    images = torch.randn(8, 3, 16, 16)
    stage = BatchStage(_FixedLoader(images), erase=1.0)
    out, labels = stage.apply(images, torch.arange(8), epoch=3, step=5)
    assert torch.equal(labels, torch.arange(8))  # no mixing: the labels pass through
    g = torch.Generator().manual_seed(mix_seed(7, 3, 0, 5, 0xB47C))
    reference = v2.RandomErasing(p=1.0, value="random")
    for image, seed, got in zip(images, draw_seeds(g, 8), out):
        torch.manual_seed(seed)
        assert torch.equal(got, reference(image))
    assert (out != images).any(dim=(1, 2, 3)).all()  # p=1: every image has an erased patch


class _FixedLoader:
    """The least a BatchStage wraps: a seed, a rank and batches."""

    seed, rank = 7, 0

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return 4

    def iterate(self, epoch: int, start_step: int = 0):
        for _ in range(start_step, 4):
            yield self.images.clone(), torch.arange(len(self.images)) % 3


def test_in_memory_pipeline_applies_the_policy_per_image_on_the_device():
    data = ArrayDataset(_images(16, 20), torch.arange(16) % 4, [str(k) for k in range(4)])
    cfg = build_config(dataset="synthetic", auto_augment="trivialaugment", augment="none")
    loader = with_augmentation(cfg, 4, _device_loader(data), world_size=1)
    assert isinstance(loader.augment, PolicyAugment)
    images, labels = next(loader.iterate(epoch=2))
    plain = _device_loader(data)
    idx = plain.step_indices(2, 0)
    g = torch.Generator().manual_seed(mix_seed(5, 2, 0, 0))  # the batch's generator (seed, epoch, rank, step)
    expected = apply_seeded(v2.TrivialAugmentWide(), data.images[idx], draw_seeds(g, len(idx)))
    assert torch.equal(labels, data.labels[idx])
    assert torch.equal(images, plain.normalise(expected))


def _device_loader(data, **kw) -> DeviceLoader:
    return DeviceLoader(data, 8, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=5, **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_image_folder(root, ("ant", "bee"), per_class=6, size=(40, 30))
    return root


def test_streamed_sets_apply_the_policy_in_the_workers_and_resume_exactly(photos):
    data = folder_dataset(photos / "train", 16)
    cfg = build_config(dataset="folder", auto_augment="randaugment", random_erase=0.5, mixup=0.4, cutmix=1.0,
                       repeated_aug=2)

    def loader(workers: int = 0):
        plain = StreamLoader(data, 4, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3,
                             workers=workers)
        return with_augmentation(cfg, 2, plain)

    assert data.policy is None  # the loader's copy of the set carries the policy, not the caller's
    sample = loader().data.load(0, seed=99)
    torch.manual_seed(mix_seed(99, POLICY_TAG))
    assert torch.equal(sample, v2.RandAugment()(data.load(0, seed=99)))
    full = list(loader().iterate(epoch=1))
    forked = list(loader(workers=2).iterate(epoch=1))
    resumed = list(loader().iterate(epoch=1, start_step=1))
    assert len(full) == 3 and full[0][1].shape == (4, 2)  # 12 images, batch 4; soft targets
    for (x, y), (u, v) in zip(full, forked):
        assert torch.equal(x, u) and torch.equal(y, v)
    for (x, y), (u, v) in zip(full[1:], resumed):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_device_decoding_applies_the_policy_after_the_crop_with_the_same_seed(photos):
    data = replace(folder_dataset(photos / "train", 16), decode="device", policy=build_policy("autoaugment-imagenet"))
    plain = StreamLoader(replace(data, policy=None), 4, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True,
                         seed=3)
    policed = StreamLoader(data, 4, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3)
    keys = plain._batch_keys(0, 0)[0]
    encoded = [data.load(i, seed) for i, seed in keys]
    assert all(e.seed == mix_seed(seed, POLICY_TAG) for e, (_, seed) in zip(encoded, keys))
    (x, _), (u, _) = next(plain.iterate(0)), next(policed.iterate(0))
    for crop, got, e in zip(x, u, encoded):
        pixels = ((crop * 0.25 + 0.5) * 255).round().to(torch.uint8)  # back to the decoded crop
        torch.manual_seed(e.seed)
        assert torch.equal(got, policed.normalise(v2.AutoAugment()(pixels)[None])[0])


def test_repeated_aug_covers_every_image_n_times_across_two_ranks_and_resumes_mid_epoch():
    size, n, batch, world = 48, 3, 4, 2
    plans = [BatchPlan(size, batch, device=CPU, mean=(0.0,), std=(1.0,), shuffle=True, seed=9, rank=r,
                       world_size=world) for r in range(world)]
    for plan in plans:
        plan.order = RepeatedAugOrder(size, n, seed=9, global_batch=batch * world, world_size=world)
    counts = torch.zeros(size, dtype=torch.long)
    for epoch in range(n):  # one cycle of N epochs: every image exactly N times
        per_rank = [plan.epoch_indices(epoch) for plan in plans]
        assert sum(len(p) for p in per_rank) == size  # an epoch keeps its length
        seen = torch.cat(per_rank)
        assert set(torch.bincount(seen, minlength=size).tolist()) == {0, n}  # 1/N of the images, N times each
        assert (torch.bincount(per_rank[0], minlength=size) < n).all()  # the copies are split over both ranks
        counts += torch.bincount(seen, minlength=size)
    assert counts.tolist() == [n] * size
    assert not torch.equal(plans[0].epoch_indices(n), plans[0].epoch_indices(0))  # the next cycle reshuffles
    # Resume mid-epoch: a fresh plan continues the same order from any step.
    again = BatchPlan(size, batch, device=CPU, mean=(0.0,), std=(1.0,), shuffle=True, seed=9, rank=1, world_size=world)
    again.order = RepeatedAugOrder(size, n, seed=9, global_batch=batch * world, world_size=world)
    for step in range(3, len(again)):
        assert torch.equal(again.step_indices(4, step), plans[1].step_indices(4, step))


def test_copies_of_an_image_are_augmented_apart():
    data = ArrayDataset(_images(8, 12), torch.zeros(8, dtype=torch.long), ["a"])
    cfg = build_config(dataset="synthetic", auto_augment="augmix", repeated_aug=4)
    loader = with_augmentation(cfg, 1, _device_loader(data, augment=None))
    images, _ = next(loader.iterate(0))
    idx = loader.step_indices(0, 0)
    assert idx[0] == idx[1] and not torch.equal(images[0], images[1])


@pytest.mark.parametrize("options,message", [
    (dict(repeated_aug=2, balanced_sampler=True), "drop one"),
    (dict(random_erase=1.5), "--random-erase is a probability"),
    (dict(aa_magnitude=31), "--aa-magnitude"),
    (dict(auto_augment="rand"), "did you mean .randaugment"),
])
def test_options_it_cannot_honour_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config(**options)


class Crash(Exception):
    pass


class CrashAt(cnntrain.Callback):
    def on_checkpoint(self, loop, path) -> None:
        if loop.state.step == 9:
            raise Crash


def test_resume_with_policies_mixing_and_repeats_on_equals_uninterrupted(tmp_path):
    options = dict(synthetic_shape=[3, 16, 16], synthetic_size=128, batch_size=16, auto_augment="trivialaugment",
                   random_erase=0.5, mixup=0.2, cutmix=1.0, mix_prob=0.8, repeated_aug=2, label_smoothing=0.1,
                   save_every=3, display_every=5, epochs=2)
    full = cnntrain.train(tiny(tmp_path / "full", **options))
    part = tiny(tmp_path / "part", **options)
    with pytest.raises(Crash):
        cnntrain.train(part, callbacks=[CrashAt()])  # mid epoch 2 (8 steps per epoch)
    resumed = cnntrain.train({**part, "resume": "auto"})
    assert same_weights(full.run_dir, resumed.run_dir)
    assert metrics_rows(full.run_dir) == metrics_rows(resumed.run_dir)



def test_a_stream_dataset_copy_keeps_its_policy(photos):
    data = replace(folder_dataset(photos / "train", 16), policy=build_policy("trivialaugment"))
    assert data.subset(torch.tensor([0, 1])).policy is data.policy
    assert data.as_eval().load(0, seed=1) is not None  # evaluation never applies it
