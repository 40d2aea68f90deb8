"""``cnntrain data prepare`` / ``data verify``: counts, determinism, labels, resize, damage detection."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cnntrain.cli import main
from cnntrain.data.prepare import prepare, verify
from cnntrain.data.tfrecord import decode_example, iter_records, shard_paths
from cnntrain.errors import ConfigError, DataError
from tests.fixtures import png_claiming
from tests.test_streaming import write_mixed_folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_mixed_folder(tmp_path / "photos")


def test_prepare_skips_images_over_the_pixel_limit(photos: Path, tmp_path: Path) -> None:
    (photos / "train" / "bee" / "bomb.png").write_bytes(png_claiming(40000, 40000))
    result = prepare(photos, tmp_path / "out", shards=1, resize=48)
    assert result.counts["train"] == 13 and result.skipped == 3  # empty + truncated + the 1.6-gigapixel PNG
    assert prepare(photos, tmp_path / "tight", shards=1, max_pixels=3600).counts["train"] == 5  # <= 3,600 px


def test_prepare_writes_labelled_resized_rgb_jpegs(photos: Path, tmp_path: Path) -> None:
    result = prepare(photos, tmp_path / "out", shards=3, resize=48)
    assert result.counts == {"train": 13, "validation": 6} and result.skipped == 2
    names = sorted(p.name for p in shard_paths(tmp_path / "out", "train"))
    assert names == ["train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003"]
    examples = [decode_example(d) for p in shard_paths(tmp_path / "out", "train") for _, d in iter_records(p)]
    labels = sorted(e["image/class/label"][0] for e in examples)
    assert labels == [1] * 8 + [2] * 5  # 1-based: ant has 5 JPEGs + grey + palette + CMYK
    for e in examples:
        with Image.open(io.BytesIO(e["image/encoded"][0])) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) <= 48
            assert [image.height, image.width] == e["image/height"] + e["image/width"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == ["ant", "bee"] and sum(len(s["labels"]) for s in index["shards"].values()) == 19


def test_prepare_is_deterministic(photos: Path, tmp_path: Path) -> None:
    prepare(photos, tmp_path / "a", shards=2, resize=40)
    prepare(photos, tmp_path / "b", shards=2, resize=40, workers=1)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_verify_detects_a_flipped_byte_through_the_cli(photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["data", "prepare", str(photos), str(out), "--shards", "2", "--resize", "40"]) == 0
    assert main(["data", "verify", str(out)]) == 0
    assert "19 records in 4 shards, 0 corrupt" in capsys.readouterr().out
    shard = out / "train-00001-of-00002"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert main(["data", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "CORRUPT" in text and "train-00001-of-00002: record" in text and "CRC mismatch" in text
    assert [r.path.name for r in verify(out) if r.error] == ["train-00001-of-00002"]


def test_tar_format(photos: Path, tmp_path: Path) -> None:
    prepare(photos, tmp_path / "tar", shards=2, fmt="tar")
    rows = verify(tmp_path / "tar")
    assert [r.records for r in rows] == [6, 7, 3, 3] and not any(r.error for r in rows)
    with tarfile.open(rows[0].path) as tar:
        members = tar.getmembers()
        assert members[0].name.endswith(".jpg") and members[1].name.endswith(".cls")
        assert all(m.mtime == 0 for m in members)


def test_bad_arguments(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--format"):
        prepare(photos, tmp_path / "x", fmt="zip")
    with pytest.raises(ConfigError, match="--shards"):
        prepare(photos, tmp_path / "x", shards=0)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(DataError, match="no train"):
        verify(tmp_path / "x")


@pytest.mark.slow
def test_real_photos_folder_and_shards_hold_the_same_images(real_data: Path, tmp_path: Path) -> None:
    """hymenoptera.tar (many JPEG sizes, one palette GIF): the streamed folder and its TFRecord copy
    list the same images, and every one of them decodes."""
    from cnntrain.data.archive import safe_extract_tar
    from cnntrain.data.folder import folder_dataset
    from cnntrain.data.tfrecord import tfrecord_dataset

    safe_extract_tar(real_data / "hymenoptera.tar", tmp_path / "src")
    root = tmp_path / "src" / "hymenoptera_data"
    result = prepare(root, tmp_path / "tf", shards=2, resize=64)
    assert result.skipped == 0 and not any(r.error for r in verify(tmp_path / "tf"))
    for folder, prefix in (("train", "train"), ("val", "validation")):
        files = folder_dataset(root / folder, 32)
        shards = tfrecord_dataset(tmp_path / "tf", prefix, 32)
        assert len(files) == len(shards) == result.counts[prefix]
        assert sorted(files.labels.tolist()) == sorted(shards.labels.tolist()) and shards.classes == files.classes
        assert all(shards.load(i, seed=i) is not None for i in range(len(shards)))
