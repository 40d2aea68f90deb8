"""Training from tar shards (``data prepare --format tar``): read in place, same images as the
TFRecord copy, and every malformed shard a ``DataError`` naming it."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

import cnntrain
from cnntrain.data.prepare import prepare
from cnntrain.data.tarshards import scan_shard, tar_dataset
from cnntrain.errors import DataError
from tests.helpers import tiny, weights
from tests.test_streaming import write_mixed_folder


def test_tar_and_tfrecord_copies_train_to_the_same_weights(tmp_path: Path) -> None:
    photos = write_mixed_folder(tmp_path / "photos")
    prepare(photos, tmp_path / "tf", shards=2, resize=48)
    prepare(photos, tmp_path / "tar", shards=2, resize=48, fmt="tar")
    data = tar_dataset(tmp_path / "tar", "train", 32)
    assert len(data) == 13 and data.classes == ["ant", "bee"]
    assert sorted(data.labels.tolist()) == [0] * 8 + [1] * 5
    assert data.load(0, seed=0).shape == (3, 32, 32)
    common = dict(model="resnet20", image_size=32, epochs=1, batch_size=4, workers=0)
    tf = cnntrain.train(tiny(tmp_path / "run-tf", dataset="tfrecord", data_dir=str(tmp_path / "tf"), **common))
    tar = cnntrain.train(tiny(tmp_path / "run-tar", dataset="tar", data_dir=str(tmp_path / "tar"), **common))
    assert tar.summary["eval_images"] == 6 and tar.steps == tf.steps == 3
    wa, wb = weights(tf.run_dir), weights(tar.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same JPEG bytes in the same order


def _shard(path: Path, members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


JPEG = b"\xff\xd8" + b"x" * 100  # never decoded by the scan


@pytest.mark.parametrize("members, links, message", [
    ([("a.jpg", JPEG), ("a.cls", b"1"), ("b.jpg", JPEG)], (), "image 'b' has no b.cls label"),
    ([("a.jpg", JPEG), ("a.cls", b"cat")], (), r"a.cls holds b'cat', not a class index"),
    ([("a.jpg", JPEG), ("a.cls", b"0")], ("b.jpg",), "member 'b.jpg' is not a regular file"),
])
def test_malformed_shards_are_data_errors_naming_the_shard(tmp_path: Path, members, links, message) -> None:
    path = _shard(tmp_path / "train-0.tar", members, links)
    with pytest.raises(DataError, match=message) as info:
        scan_shard(path)
    assert str(path) in str(info.value)


def test_class_indices_outside_the_classes_name_the_shard_and_member(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "train-0.tar", [("a.jpg", JPEG), ("a.cls", b"0"), ("b.jpg", JPEG), ("b.cls", b"-1")])
    with pytest.raises(DataError, match=r"train-0.tar: b.cls holds class index -1, outside 0 or more"):
        tar_dataset(tmp_path, "train", 32)
    _shard(shard, [("a.jpg", JPEG), ("a.cls", b"0"), ("b.jpg", JPEG), ("b.cls", b"2")])
    assert tar_dataset(tmp_path, "train", 32).classes == ["0", "1", "2"]  # no class list: made up
    (tmp_path / "index.json").write_text(json.dumps({"classes": ["ant", "bee"]}))
    with pytest.raises(DataError, match=r"train-0.tar: b.cls holds class index 2, outside \[0, 2\)"):
        tar_dataset(tmp_path, "train", 32)
    with pytest.raises(DataError, match=r"b.cls holds class index 2, outside \[0, 1\)"):
        scan_shard(shard, num_classes=1)


def test_truncated_and_compressed_shards_are_refused(tmp_path: Path) -> None:
    path = _shard(tmp_path / "train-0.tar", [("a.jpg", JPEG * 20), ("a.cls", b"0")])
    raw = path.read_bytes()
    assert len(scan_shard(path)) == 1
    cut = tmp_path / "train-1.tar"
    cut.write_bytes(raw[:700])  # inside a.jpg's data
    with pytest.raises(DataError, match="train-1.tar: (truncated|damaged)"):
        scan_shard(cut)
    packed = tmp_path / "train-2.tar"
    packed.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="train-2.tar: not a readable uncompressed tar shard"):
        scan_shard(packed)
    with pytest.raises(DataError, match="no tar shards"):
        tar_dataset(tmp_path, "validation", 32)
