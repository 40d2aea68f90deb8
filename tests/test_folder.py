"""Image folder trees: scanning, decoding every colour mode, corrupt files, sizes, class lists."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.data.folder import decode_image, find_split, load_image_folder, scan_image_folder
from cnntrain.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, open_image
from cnntrain.errors import DataError
from tests.fixtures import jpeg_bytes, png_claiming, write_image_folder


def test_scan_sorted_and_filtered(tmp_path: Path) -> None:
    split = write_image_folder(tmp_path, ("zebra", "ant"), per_class=2)
    (split / "ant" / "UPPER.JPG").write_bytes((split / "ant" / "0000.jpg").read_bytes())
    (split / "ant" / "nested").mkdir()
    Image.new("RGB", (32, 32)).save(split / "ant" / "nested" / "x.png")
    (split / "ant" / "notes.txt").write_text("not an image")
    (split / ".hidden").mkdir()
    samples, classes = scan_image_folder(split)
    assert classes == ["ant", "zebra"]
    names = [(p.relative_to(split).as_posix(), label) for p, label in samples]
    assert names == [("ant/0000.jpg", 0), ("ant/0001.jpg", 0), ("ant/UPPER.JPG", 0), ("ant/nested/x.png", 0),
                     ("zebra/0000.jpg", 1), ("zebra/0001.jpg", 1)]


def test_scan_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} holds no images"):
        scan_image_folder(tmp_path / "empty")


def test_load_and_reuse_class_list(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ("cat", "dog", "eel"), per_class=3, size=(24, 20), fmt="PNG")
    write_image_folder(tmp_path, ("dog",), per_class=2, size=(24, 20), split="val", fmt="PNG")
    train = load_image_folder(tmp_path, "train", workers=2)
    assert train.images.shape == (9, 3, 24, 20) and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.classes == ["cat", "dog", "eel"]
    val = load_image_folder(tmp_path, find_split(tmp_path), classes=train.classes)
    assert val.labels.tolist() == [1, 1] and val.classes == train.classes  # dog keeps index 1
    pixels = np.array(Image.open(tmp_path / "train" / "dog" / "0001.png"))
    assert torch.equal(train.images[4], torch.from_numpy(pixels).permute(2, 0, 1))  # PNG is lossless


def test_unknown_class_in_val(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ("cat", "dog"), per_class=1)
    write_image_folder(tmp_path, ("cat", "dgo"), per_class=1, split="val")
    with pytest.raises(DataError, match="dgo is a class the training set does not have.*did you mean 'dog'"):
        load_image_folder(tmp_path, "val", classes=["cat", "dog"])


def test_find_split(tmp_path: Path) -> None:
    assert find_split(tmp_path) is None
    (tmp_path / "test").mkdir()
    (tmp_path / "validation").mkdir()
    assert find_split(tmp_path) == "validation"


def test_corrupt_files_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    split = write_image_folder(tmp_path, ("a", "b"), per_class=3)
    (split / "a" / "0000.jpg").write_bytes(b"")  # first file: the size probe must skip it too
    (split / "b" / "fake.jpg").write_text("this is text, not a JPEG")
    good = (split / "b" / "0000.jpg").read_bytes()
    (split / "b" / "half.jpg").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        data = load_image_folder(tmp_path, "train")
    assert len(data) == 5 and data.labels.tolist() == [0, 0, 1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "cnntrain"]
    assert len(warnings) == 1 and "skipped 3 unreadable image file(s)" in warnings[0]


def test_nothing_readable(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "train" / "a" / "y.png").write_text("text")
    with pytest.raises(DataError, match="none of the 2 image files"):
        load_image_folder(tmp_path, "train")
    with pytest.raises(DataError, match="none of the 2 image files"):
        load_image_folder(tmp_path, "train", size=(8, 8))


def test_mixed_sizes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ("a",), per_class=2, size=(32, 32))
    Image.new("RGB", (40, 30), "red").save(tmp_path / "train" / "a" / "9999.jpg")
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_image_folder(tmp_path, "train")
    data = load_image_folder(tmp_path, "train", size=(16, 24))
    assert data.images.shape == (3, 3, 16, 24)
    assert data.images[2, 0].float().mean() > 200 and data.images[2, 2].float().mean() < 60  # still red


@pytest.mark.parametrize("mode", ["P", "L", "RGBA", "CMYK", "I;16", "LA"])
def test_decode_converts_to_rgb(tmp_path: Path, mode: str) -> None:
    ext = {"CMYK": "jpg", "P": "gif", "I;16": "png"}.get(mode, "png")
    image = Image.new("RGB", (7, 5), (200, 40, 10)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((5, 7), 40000, np.uint16))
    path = tmp_path / f"x.{ext}"
    image.save(path)
    tensor = decode_image(path)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.uint8
    if mode == "I;16":
        assert tensor.unique().tolist() == [40000 >> 8]


def test_decode_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"{empty} is an empty"):
        decode_image(empty)
    text = tmp_path / "text.png"
    text.write_text("hello")
    with pytest.raises(DataError, match=f"{text} is not a readable image"):
        decode_image(text)


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_bytes(claim=(20000, 20000)))  # 400 Mpx claimed in a few hundred bytes
    with pytest.raises(ImageTooLarge, match=f"{bomb}: .*400,000,000 pixels.*178,956,970.*--max-image-pixels"):
        decode_image(bomb)
    png = tmp_path / "bomb.png"
    png.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(DataError, match=f"{png}: .*10,000,000,000 pixels"):
        decode_image(png)
    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg_bytes((40, 30)))
    with pytest.raises(DataError, match=r"small.jpg: the image is 40x30 \(1,200 pixels\), over the limit of 1,000"):
        decode_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=1200).shape == (3, 30, 40)


def test_a_limit_above_pils_own_lets_larger_headers_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    claim = png_claiming(20000, 20000)
    with pytest.raises(ImageTooLarge), open_image(io.BytesIO(claim), "x.png"):  # PIL's own limit refuses it
        pass
    with open_image(io.BytesIO(claim), "x.png", limit=500_000_000) as image:
        assert image.size == (20000, 20000)  # opened, not decoded
    with open_image(io.BytesIO(claim), "x.png", limit=0) as image:
        assert image.size == (20000, 20000)
    assert MAX_IMAGE_PIXELS == 178_956_970


def test_in_memory_folder_skips_images_over_the_limit_and_names_one(tmp_path: Path, caplog) -> None:
    split = write_image_folder(tmp_path, ("a", "b"), per_class=2)
    (split / "b" / "huge.png").write_bytes(png_claiming(30000, 30000))
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        data = load_image_folder(tmp_path, "train")
    assert len(data) == 4
    assert "skipped 1 unreadable" in caplog.text and "huge.png: the image has 900,000,000 pixels" in caplog.text


def test_real_palette_gif(real_data: Path, tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(real_data / "hymenoptera.tar") as tar:
        member = tar.getmember("hymenoptera_data/train/ants/imageNotFound.gif")
        (tmp_path / "x.gif").write_bytes(tar.extractfile(member).read())
    assert Image.open(tmp_path / "x.gif").mode == "P"
    assert decode_image(tmp_path / "x.gif").shape[0] == 3


def test_channel_stats_equal_the_float_mean_and_std_of_the_images():
    import torch

    from cnntrain.data.base import ArrayDataset
    from cnntrain.data.datasets import channel_stats

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    images[:, 2] //= 4  # channels with different statistics
    mean, std = channel_stats(ArrayDataset(images, torch.zeros(300, dtype=torch.int64), ["a"]))
    as_float = images.double() / 255
    assert mean == pytest.approx(as_float.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(as_float.std(dim=(0, 2, 3)).tolist(), abs=1e-12)
