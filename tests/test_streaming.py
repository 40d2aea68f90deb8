"""The streaming pipeline: odd images, determinism, resume, rank shards, eval coverage, training."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnntrain
from cnntrain.config import build_config
from cnntrain.data.datasets import load_data
from cnntrain.data.folder import folder_dataset
from cnntrain.data.loaders import build_loaders
from cnntrain.data.stream_dataset import Encoded, StreamDataset
from cnntrain.data.streaming import StreamLoader
from cnntrain.data.tfrecord import TFRecordWriter, encode_example, example_fields
from cnntrain.errors import DataError
from cnntrain.models import get_spec
from tests.fixtures import jpeg_bytes
from tests.helpers import tiny

CPU = torch.device("cpu")


def write_mixed_folder(root: Path, per_class: int = 5) -> Path:
    """``root/{train,val}/{ant,bee}/``: RGB JPEGs of different sizes plus, in train/ant, a grey PNG,
    a palette GIF, a CMYK JPEG and a zero-byte file; in train/bee a truncated JPEG."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 3)):
        for label, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = 40 + 13 * i, 90 - 7 * i
                colour = np.array([200, 60, 40]) if label == 0 else np.array([40, 80, 200])
                pixels = np.clip(colour + rng.integers(-30, 31, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.jpg", quality=90)
    odd = root / "train" / "ant"
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L").save(odd / "grey.png")
    Image.fromarray(rng.integers(0, 255, (60, 45, 3), dtype=np.uint8)).convert("P").save(odd / "palette.gif")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.jpg")
    (odd / "empty.jpg").write_bytes(b"")
    good = (root / "train" / "bee" / "000.jpg").read_bytes()
    (root / "train" / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_mixed_folder(tmp_path / "photos")


def test_grey_palette_cmyk_become_rgb_and_bad_files_give_none(photos: Path) -> None:
    data = folder_dataset(photos / "train", 24)
    assert len(data) == 14  # 10 JPEGs + grey + palette + CMYK + truncated; the zero-byte file left out
    names = [Path(p).name for p in data.items]
    for name in ("grey.png", "palette.gif", "cmyk.jpg"):
        image = data.load(names.index(name), seed=1)
        assert image is not None and image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert data.load(names.index("truncated.jpg"), seed=1) is None


def test_auto_pipeline_streams_mixed_sizes_and_eval_size_follows_the_model(photos: Path) -> None:
    bundle = load_data(build_config(dataset="folder", data_dir=str(photos)), input_size=get_spec("resnet20").input_size)
    assert isinstance(bundle.train, StreamDataset) and bundle.shape == (3, 32, 32)
    cfg = build_config(dataset="imagenet", data_dir=str(photos), model="inception_v3")
    assert load_data(cfg).shape == (3, 224, 224)  # the model's size not given, --image-size not set: 224
    inception = load_data(cfg, input_size=get_spec("inception_v3").input_size)
    assert inception.shape == (3, 299, 299)  # eval: shorter side 342, centre 299
    loader = StreamLoader(inception.val, 4, device=CPU, mean=inception.mean, std=inception.std, shuffle=False)
    images, _ = next(loader.iterate(0))
    assert images.shape == (4, 3, 299, 299)


def _loader(data, workers=0, rank=0, world=1, shuffle=True, batch=4):
    return StreamLoader(data, batch, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=shuffle, seed=3,
                        rank=rank, world_size=world, workers=workers)


def test_batches_do_not_depend_on_workers_and_resume_is_exact(photos: Path, caplog) -> None:
    data = folder_dataset(photos / "train", 16)
    plain = list(_loader(data).iterate(epoch=1))
    with caplog.at_level("WARNING", "cnntrain"):
        forked = list(_loader(data, workers=2).iterate(epoch=1))
    assert "skipped 1 unreadable" in caplog.text  # the truncated JPEG, counted from inside a worker
    assert len(plain) == len(forked) == 4  # 14 images, batch 4: 3 full + 1 partial
    for (x, y), (u, v) in zip(plain, forked):
        assert torch.equal(x, u) and torch.equal(y, v)
    resumed = list(_loader(data).iterate(epoch=1, start_step=2))
    for (x, y), (u, v) in zip(plain[2:], resumed):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert not torch.equal(plain[0][0], next(_loader(data).iterate(epoch=2))[0])


def test_ranks_take_disjoint_slices_and_eval_scores_every_image_once(photos: Path) -> None:
    data = folder_dataset(photos / "train", 16)
    ranks = [_loader(data, rank=r, world=2, batch=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [sorted(i for s in range(len(ld)) for i in ld.step_indices(0, s).tolist()) for ld in ranks]
    assert not set(seen[0]) & set(seen[1])
    evals = [_loader(data, rank=r, world=2, shuffle=False, batch=3) for r in range(2)]
    covered = sorted(i for ld in evals for s in range(len(ld)) for i in ld.step_indices(0, s).tolist())
    assert covered == list(range(len(data)))


def test_build_loaders_balances_workers_and_threads(photos: Path) -> None:
    cfg = build_config(dataset="folder", data_dir=str(photos), model="resnet20", workers=1, batch_size=4)
    before = torch.get_num_threads()
    try:
        train, val = build_loaders(cfg, load_data(cfg), CPU)
        assert isinstance(train, StreamLoader) and train.workers == 1 and val is not None
        from cnntrain.hardware import usable_cores

        assert torch.get_num_threads() + train.workers <= max(usable_cores(), 2)
    finally:
        torch.set_num_threads(before)


def test_folder_and_tfrecord_copy_train_on_the_same_images(photos: Path, tmp_path: Path) -> None:
    from cnntrain.data.prepare import prepare

    result = prepare(photos, tmp_path / "shards", shards=2, resize=64)
    assert result.counts == {"train": 13, "validation": 6} and result.skipped == 2  # empty + truncated
    common = dict(model="resnet20", image_size=32, epochs=1, batch_size=4, workers=0, synthetic_size=16)
    folder = cnntrain.train(tiny(tmp_path / "f", dataset="folder", data_dir=str(photos), **common))
    shards = cnntrain.train(tiny(tmp_path / "t", dataset="tfrecord", data_dir=str(tmp_path / "shards"), **common))
    # The folder run met the truncated JPEG (skipped in a batch); prepare left it out up front.
    assert folder.summary["eval_images"] == shards.summary["eval_images"] == 6
    # `cnntrain eval` streams the same split and scores every image once.
    assert cnntrain.evaluate(shards.run_dir, workers=1).count == cnntrain.evaluate(folder.run_dir).count == 6
    # 14 files listed (one undecodable, skipped inside its batch) vs 13 records: 4 vs 3 steps of 4.
    assert (folder.steps, shards.steps) == (4, 3)


def test_bbox_distort_crops_from_tfrecord_boxes_always_show_the_object(tmp_path: Path) -> None:
    # A red image with a blue object in its right fifth: small random crops mostly miss it, and
    # crops that keep 10% of the object's box always show some of it.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[..., 0] = 220
    pixels[:, 160:] = (0, 0, 230)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    example = {"image/encoded": [buffer.getvalue()], "image/class/label": [1],
               "image/object/bbox/ymin": [0.0], "image/object/bbox/xmin": [0.8],
               "image/object/bbox/ymax": [1.0], "image/object/bbox/xmax": [1.0]}
    with TFRecordWriter(tmp_path / "train-00000-of-00001") as writer:
        writer.write(encode_example(example))

    def blue_share(crop: str) -> list[float]:
        cfg = build_config(dataset="tfrecord", data_dir=str(tmp_path), image_size=16, min_crop_scale=0.02, crop=crop)
        data = load_data(cfg).train
        return [float((data.load(0, seed)[2] > 128).float().mean()) for seed in range(60)]

    assert min(blue_share("bbox-distort")) > 0
    assert sum(share == 0 for share in blue_share("random-resized")) > 10


def test_object_boxes_are_read_clipped_and_checked() -> None:
    base = {"image/encoded": [b"jpeg"], "image/class/label": [3]}
    boxes = {"image/object/bbox/ymin": [0.1, 0.5, -0.2], "image/object/bbox/xmin": [0.2, 0.5, 0.0],
             "image/object/bbox/ymax": [0.6, 0.5, 1.5], "image/object/bbox/xmax": [0.9, 0.7, 1.0]}
    image, label, found = example_fields(encode_example({**base, **boxes}), "shard: record 0")
    assert image == b"jpeg" and label == 2
    assert [tuple(round(v, 5) for v in b) for b in found] == [(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0)]
    assert example_fields(encode_example(base), "x")[2] == []
    bad = {**base, **boxes, "image/object/bbox/xmax": [0.9]}
    with pytest.raises(DataError, match="shard: record 7: object boxes with 3, 3, 3, 1 values"):
        example_fields(encode_example(bad), "shard: record 7")


@pytest.mark.parametrize("train", [True, False], ids=["train-crops", "eval-crops"])
def test_device_decoding_gives_the_host_pipelines_crops(photos: Path, caplog, train: bool) -> None:
    """--decode device on CPU (libjpeg-turbo in the main process; nvJPEG on CUDA): the same images,
    crops and flips as the workers' PIL decoding, up to resampling; non-JPEG and CMYK files still go
    through PIL, and the truncated JPEG is skipped and counted just the same."""
    host = folder_dataset(photos / "train", 24)
    device = replace(host, decode="device")
    bundle = load_data(build_config(dataset="folder", data_dir=str(photos), model="resnet20", decode="device"))
    assert bundle.train.decode == bundle.val.decode == "device"
    if not train:
        host, device = host.as_eval(), device.as_eval()
    encoded = [isinstance(device.load(i, seed=5), Encoded) for i in range(len(device))]
    assert sum(encoded) == 11  # 10 RGB JPEGs + the truncated one; grey PNG, palette GIF, CMYK JPEG are not
    with caplog.at_level("WARNING", "cnntrain"):
        a = list(_loader(host, workers=1).iterate(epoch=3))
        b = list(_loader(device, workers=1).iterate(epoch=3))
    assert caplog.text.count("skipped 1 unreadable") == 2
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(y, v) and x.shape == u.shape
        difference = (x - u).abs()  # normalised units: 1/255 / std is about 0.017
        assert difference.mean() < 0.05 and difference.max() < 1.0


def test_options_for_the_other_kind_of_set_are_named_as_ignored(photos: Path, caplog) -> None:
    with caplog.at_level("WARNING", "cnntrain"):
        load_data(build_config(dataset="synthetic", crop="bbox-distort", decode="device"))
        assert "synthetic: --crop, --decode ignored: it is held in memory" in caplog.text
        caplog.clear()
        load_data(build_config(dataset="folder", data_dir=str(photos), model="resnet20", rotate=0.2, cutout=4))
        assert "folder: --rotate, --cutout ignored: it is streamed" in caplog.text
        caplog.clear()
        load_data(build_config(dataset="folder", data_dir=str(photos), model="resnet20", crop="bbox-distort"))
        assert "ignored" not in caplog.text


@pytest.mark.parametrize("decode", ["host", "device"])
def test_images_over_the_pixel_limit_are_skipped_unread_and_named(tmp_path: Path, caplog, decode: str) -> None:
    """A JPEG header claiming 20000x20000: neither the workers nor the device decode it (the device
    gets no Encoded for it); the warning names the file, its size and the option."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(jpeg_bytes((40, 30)))
    (folder / "bomb.jpg").write_bytes(jpeg_bytes(claim=(20000, 20000)))
    data = replace(folder_dataset(tmp_path / "train", 16), decode=decode)
    with caplog.at_level("WARNING", "cnntrain"):
        assert data.load(0, seed=1) is None and data.load(1, seed=1) is not None  # bomb.jpg sorts first
    assert f"{folder / 'bomb.jpg'}: the image has 400,000,000 pixels" in caplog.text
    assert "--max-image-pixels" in caplog.text
    tight = replace(data, max_pixels=1000)  # 40x30 = 1,200 pixels
    with caplog.at_level("WARNING", "cnntrain"):
        assert tight.load(1, seed=1) is None
    assert "ok.jpg: the image is 40x30 (1,200 pixels), over the limit of 1,000" in caplog.text
    images, labels = next(_loader(data, batch=2).iterate(epoch=0))
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [0]
    options = dict(dataset="folder", data_dir=str(tmp_path), max_image_pixels=1000)
    assert load_data(build_config(pipeline="stream", **options)).train.max_pixels == 1000  # reaches the workers
    with pytest.raises(DataError, match="none of the 2 image files"):  # and the in-memory decoder
        load_data(build_config(pipeline="memory", **options))


def test_pixel_limit_names_the_shard_and_record_of_a_tfrecord_image(tmp_path: Path, caplog) -> None:
    with TFRecordWriter(tmp_path / "train-00000-of-00001") as writer:
        writer.write(encode_example({"image/encoded": [jpeg_bytes()], "image/class/label": [1]}))
        bomb_at = writer.write(encode_example({"image/encoded": [jpeg_bytes(claim=(30000, 30000))],
                                               "image/class/label": [2]}))
    data = load_data(build_config(dataset="tfrecord", data_dir=str(tmp_path), image_size=16)).train
    with caplog.at_level("WARNING", "cnntrain"):
        assert data.load(0, seed=0) is not None and data.load(1, seed=0) is None
    assert f"train-00000-of-00001: record at byte {bomb_at}: the image has 900,000,000 pixels" in caplog.text
