import math

import torch

from cnntrain.data.base import ArrayDataset
from cnntrain.data.pipeline import Augment, DeviceLoader, cutout, random_crop, rotate


def _data(n=103, shape=(3, 8, 8)):
    images = torch.arange(n * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, *shape)
    return ArrayDataset(images, torch.arange(n) % 10, [str(i) for i in range(10)])


def _loader(data, **kw):
    args = dict(device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3)
    args.update(kw)
    return DeviceLoader(data, 10, **args)


def test_ranks_see_disjoint_shards_covering_the_epoch():
    data = _data(103)
    for world in (1, 2, 3):
        seen = [_loader(data, rank=r, world_size=world).epoch_indices(epoch=4) for r in range(world)]
        all_seen = torch.cat(seen)
        assert len(set(all_seen.tolist())) == len(all_seen), "an image was given to two ranks"
        dropped = 103 - len(all_seen)
        # Only the tail of a partial global batch too small to split may be dropped.
        assert dropped < 2 * world
        steps = {len(_loader(data, rank=r, world_size=world)) for r in range(world)}
        assert len(steps) == 1, "ranks must run the same number of steps"


def test_order_is_a_pure_function_of_seed_and_epoch():
    data = _data()
    a, b = _loader(data), _loader(data)
    assert torch.equal(a.epoch_indices(2), b.epoch_indices(2))
    assert not torch.equal(a.epoch_indices(2), a.epoch_indices(3))
    assert not torch.equal(a.epoch_indices(2), _loader(data, seed=4).epoch_indices(2))


def test_resuming_mid_epoch_yields_the_same_batches():
    data = _data()
    loader = _loader(data, augment=Augment(flip=True, pad=2, cutout=3))
    full = list(loader.iterate(epoch=1))
    tail = list(loader.iterate(epoch=1, start_step=4))
    assert len(tail) == len(full) - 4
    for (x1, y1), (x2, y2) in zip(full[4:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_eval_covers_every_image_exactly_once_across_ranks():
    data = _data(101)
    labels = []
    for rank in range(3):
        loader = _loader(data, shuffle=False, rank=rank, world_size=3)
        labels += [y for _, y in loader.iterate(0)]
    images_seen = sum(len(y) for y in labels)
    assert images_seen == 101


def test_normalisation_and_channels_last():
    data = _data(4)
    x, _ = next(_loader(data, shuffle=False, channels_last=True).iterate(0))
    expected = (data.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_random_crop_shifts_each_image_by_its_own_offset():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4) + 1
    out = random_crop(images, 2, torch.tensor([2, 0]), torch.tensor([2, 4]))
    assert torch.equal(out[0], images[0])  # offset (pad, pad) is the identity
    # offset (0, 4): rows shifted down by 2 (zeros on top), columns shifted left by 2 (zeros right)
    assert torch.equal(out[1, 0, 2:, :2], images[1, 0, :2, 2:])
    assert out[1, 0, :2].sum() == 0 and out[1, 0, :, 2:].sum() == 0


def test_cutout_zeroes_a_square():
    images = torch.full((1, 1, 8, 8), 7, dtype=torch.uint8)
    out = cutout(images, 4, torch.tensor([4]), torch.tensor([4]))
    assert (out[0, 0, 2:6, 2:6] == 0).all()
    assert int((out == 0).sum()) == 16


def test_flip_flips_about_half_and_only_horizontally():
    images = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(200, 1, 1, 1)
    out = Augment(flip=True)(images, torch.Generator().manual_seed(0))
    flipped = (out == images.flip(3)).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 60 < int(flipped.sum()) < 140


def test_alternate_flip_shows_every_image_both_ways_in_consecutive_epochs():
    # Rows differ left to right, so a mirrored image is told apart from the original.
    images = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(40, 3, 8, 8).contiguous()
    data = ArrayDataset(images, torch.arange(40), [str(i) for i in range(40)])  # label = image index
    loader = _loader(data, augment=Augment.from_name("flip", alternate_flip=True), mean=(0,) * 3, std=(1 / 255,) * 3)

    def mirrored(epoch):
        flags = {}
        for x, y in loader.iterate(epoch):
            for image, label in zip(x, y):
                flags[int(label)] = bool(image[0, 0, 0] == 7)
        return flags

    e0, e1, e2 = mirrored(0), mirrored(1), mirrored(2)
    assert sorted(e0) == sorted(e1) == list(range(40))
    assert all(e0[i] != e1[i] for i in e0)  # each image once each way over two epochs
    assert e0 == e2
    assert 8 < sum(e0.values()) < 32  # the starting side is random per image


def test_translate_pads_by_reflection_and_crop_by_zeros():
    images = (torch.arange(64).view(1, 1, 8, 8) + 1).to(torch.uint8)
    shift = torch.tensor([0])  # offset 0: the top-left corner of the padded image
    zero = random_crop(images, 2, shift, shift)
    reflected = random_crop(images, 2, shift, shift, mode="reflect")
    assert (zero[0, 0, :2] == 0).all() and (zero[0, 0, :, :2] == 0).all()
    assert torch.equal(reflected[0, 0, 2:, 2:], images[0, 0, :6, :6])
    assert torch.equal(reflected[0, 0, 0, 2:], images[0, 0, 2, :6])  # row -2 mirrors row 2
    assert Augment.from_name("translate-flip", pad=2).reflect and not Augment.from_name("crop-flip", pad=2).reflect


def test_rotate_turns_about_the_centre_on_square_and_oblong_images():
    square = torch.randint(1, 255, (2, 3, 8, 8), dtype=torch.uint8)
    turned = rotate(square, torch.tensor([math.pi / 2, 0.0]))
    assert torch.equal(turned[0], square[0].rot90(1, (1, 2))) and torch.equal(turned[1], square[1])
    oblong = torch.randint(1, 255, (1, 3, 4, 8), dtype=torch.uint8)  # wider than high: a quarter turn
    turned = rotate(oblong, torch.tensor([math.pi / 2]))  # keeps the central 4 x 4, the rest is black
    assert torch.equal(turned[..., 2:6], oblong[..., 2:6].rot90(1, (2, 3)))
    assert int(turned[..., :2].max()) == int(turned[..., 6:].max()) == 0
    assert torch.equal(rotate(oblong, torch.tensor([math.pi])), oblong.flip(2).flip(3))


def test_nnabla_rotation_draws_each_images_angle_within_the_limit():
    grey = torch.full((300, 1, 16, 16), 200, dtype=torch.uint8)
    augment = Augment.from_name("flip", rotate=0.25)
    out = augment(grey, torch.Generator().manual_seed(1))
    assert torch.equal(out, augment(grey, torch.Generator().manual_seed(1)))
    assert (out[:, :, 6:10, 6:10] == 200).all()  # the middle is always inside the picture
    corner = out[:, 0, 0, 0].float()  # black comes in at the corners, more the further it turns
    assert corner.min() < 50 and corner.max() > 150
    # 0.25 rad at most: a corner never turns by more than 0.25 * 11.3 px = 2.8 px, so the pixel two
    # in from the corner along the diagonal is always at least partly inside.
    assert (out[:, 0, 3, 3] > 0).all()
    assert Augment.from_name("none", rotate=0.1) is not None and Augment.from_name("none") is None
