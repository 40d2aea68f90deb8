"""The decoded-image cache of in-memory image folders: hits, rebuilds on any change, damaged files
decoded again with a warning, atomic writes, and --no-cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from cnntrain.cli import build_parser
from cnntrain.config import build_config
from cnntrain.data import cache as cache_module
from cnntrain.data import folder
from cnntrain.data.cache import CACHE_ENV, MAGIC, cache_root
from cnntrain.data.datasets import load_data
from cnntrain.data.folder import load_image_folder
from tests.fixtures import write_image_folder

PER_CLASS = 5  # x 2 classes


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Every file the folder loader decodes, in order: empty when a load came from the cache."""
    seen: list[Path] = []
    real = folder._decode_array

    def counting(path, size, max_pixels=folder.MAX_IMAGE_PIXELS):
        seen.append(path)
        return real(path, size, max_pixels)

    monkeypatch.setattr(folder, "_decode_array", counting)
    return seen


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "photos", ("cat", "dog"), per_class=PER_CLASS, size=(12, 10))
    return tmp_path / "photos"


def _load(photos: Path, cache_dir: Path, **kw):
    return load_image_folder(photos, "train", cache_dir=cache_dir, **kw)


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "decoded").glob("*")) if (cache_dir / "decoded").is_dir() else []


def test_second_load_maps_the_cache_without_decoding(photos, tmp_path, decodes, caplog):
    first = _load(photos, tmp_path / "c")
    assert len(decodes) == 2 * PER_CLASS + 1  # the first image twice: it fixes the size
    [cached_file] = _cache_files(tmp_path / "c")
    decodes.clear()
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        second = _load(photos, tmp_path / "c")
    assert decodes == [] and "decoded images from the cache" in caplog.text
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.images.shape == (2 * PER_CLASS, 3, 12, 10) and second.classes == ["cat", "dog"]
    assert second.labels.dtype == torch.int64
    second.images[0] += 1  # a private copy on write: the cache file does not change
    assert torch.equal(_load(photos, tmp_path / "c").images, first.images)
    assert _cache_files(tmp_path / "c") == [cached_file]


def _touch(photos: Path) -> None:
    path = photos / "train" / "cat" / "0001.jpg"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _rewrite_same_size_and_time(photos: Path) -> None:
    # Another image's bytes at the same path, size and modification time: the change time still moves.
    path, other = photos / "train" / "cat" / "0001.jpg", photos / "train" / "dog" / "0001.jpg"
    st = path.stat()
    data = other.read_bytes()
    path.write_bytes(data[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _add(photos: Path) -> None:
    (photos / "train" / "dog" / "extra.jpg").write_bytes((photos / "train" / "dog" / "0000.jpg").read_bytes())


def _remove(photos: Path) -> None:
    (photos / "train" / "dog" / "0004.jpg").unlink()


@pytest.mark.parametrize("change, count", [(_touch, 10), (_rewrite_same_size_and_time, 10), (_add, 11),
                                           (_remove, 9)], ids=["touched", "rewritten", "added", "removed"])
def test_a_changed_folder_is_decoded_again(photos, tmp_path, decodes, caplog, change, count):
    _load(photos, tmp_path / "c")
    change(photos)
    decodes.clear()
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        data = _load(photos, tmp_path / "c")
    assert len(decodes) >= count and len(data) <= count and "changed since it was cached" in caplog.text
    assert len(_cache_files(tmp_path / "c")) == 1  # replaced, not added
    decodes.clear()
    assert torch.equal(_load(photos, tmp_path / "c").images, data.images) and decodes == []  # cached again


def test_other_options_are_other_cache_files(photos, tmp_path, decodes):
    small = _load(photos, tmp_path / "c", size=(8, 8))
    full = _load(photos, tmp_path / "c")
    val = _load(photos, tmp_path / "c", classes=["cat", "dog", "eel"])
    assert small.images.shape[2:] == (8, 8) and full.images.shape[2:] == (12, 10) and val.num_classes == 3
    assert len(_cache_files(tmp_path / "c")) == 3
    decodes.clear()
    assert _load(photos, tmp_path / "c", size=(8, 8)).images.shape[2:] == (8, 8) and decodes == []


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip_pixel(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # in the pixels (the labels are the last 80 bytes)
    path.write_bytes(bytes(data))


def _flip_metadata(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 40 + 5] ^= 0x01  # inside the JSON metadata
    path.write_bytes(bytes(data))


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"X" + path.read_bytes()[1:])


def _cut_in_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


def _grown(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 4096)


@pytest.mark.parametrize("damage, why", [(_truncate, "bytes where its metadata say"), (_flip_pixel, "CRC-32"),
                                         (_flip_metadata, "SHA-256"), (_bad_magic, "not a cnntrain cache file"),
                                         (_cut_in_header, "cut short"), (_grown, "bytes where its metadata say")])
def test_a_damaged_cache_file_is_decoded_again_with_a_warning(photos, tmp_path, decodes, caplog, damage, why):
    first = _load(photos, tmp_path / "c")
    [path] = _cache_files(tmp_path / "c")
    damage(path)
    decodes.clear()
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        again = _load(photos, tmp_path / "c")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is damaged" in w and why in w for w in warnings), warnings
    assert decodes and torch.equal(again.images, first.images)
    decodes.clear()
    assert torch.equal(_load(photos, tmp_path / "c").images, first.images) and decodes == []  # rewritten whole


def test_a_write_that_dies_leaves_no_cache_to_read(photos, tmp_path, decodes, monkeypatch, caplog):
    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.os, "replace", crash)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        data = _load(photos, tmp_path / "c")
    assert len(data) == 2 * PER_CLASS and "cannot write the decoded-image cache" in caplog.text
    assert _cache_files(tmp_path / "c") == []  # neither the cache file nor its temporary file
    monkeypatch.undo()
    # A writer killed half-way leaves its temporary file: never read, removed once it is old.
    _load(photos, tmp_path / "c")
    [path] = _cache_files(tmp_path / "c")
    half = path.with_name(f"{path.stem}.k1ll3d.tmp")  # as tempfile names them
    half.write_bytes(MAGIC + b"half")
    decodes.clear()
    _load(photos, tmp_path / "c")
    assert decodes == [] and half.exists()
    old = half.stat().st_mtime - 2 * cache_module._STALE_TEMP_S
    os.utime(half, (old, old))
    (photos / "train" / "cat" / "new.jpg").write_bytes((photos / "train" / "cat" / "0000.jpg").read_bytes())
    _load(photos, tmp_path / "c")  # a write of this folder's cache sweeps the dead temporary files
    assert not half.exists()


def test_no_cache_reads_and_writes_nothing(photos, tmp_path, decodes):
    cfg = build_config(dataset="folder", data_dir=str(photos), pipeline="memory", cache_dir=str(tmp_path / "c"))
    load_data(cfg)
    decodes.clear()
    cached = load_data(cfg)
    assert decodes == [] and len(_cache_files(tmp_path / "c")) == 1
    off = cfg.replace(cache=False, cache_dir=str(tmp_path / "off"))
    fresh = load_data(off)
    assert len(decodes) > 2 * PER_CLASS and not (tmp_path / "off").exists()
    assert torch.equal(fresh.train.images, cached.train.images)
    args = build_parser().parse_args(["train", "--no-cache", "--cache-dir", "/somewhere"])
    assert (args.cache, args.cache_dir) == (False, "/somewhere")


def test_cache_folder_defaults_to_the_environment_then_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root("") == tmp_path / "env" and cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root("") == tmp_path / "home" / ".cache" / "cnntrain"
    assert cache_root("~/elsewhere") == tmp_path / "home" / "elsewhere"


def test_a_folder_with_unreadable_files_repeats_its_warning_from_the_cache(photos, tmp_path, caplog):
    (photos / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        first = _load(photos, tmp_path / "c")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        second = _load(photos, tmp_path / "c")
    assert "skipped 1 unreadable image file(s)" in caplog.text and "broken.jpg" in caplog.text
    assert len(second) == len(first) == 2 * PER_CLASS and torch.equal(first.labels, second.labels)
