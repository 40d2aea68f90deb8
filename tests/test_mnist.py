"""MNIST / Fashion-MNIST IDX parsing and loading: layouts, every malformation, download, real files."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cnntrain.data.mnist as mnist
from cnntrain.data.mnist import load_mnist, read_idx
from cnntrain.errors import DataError
from tests.fixtures import MNIST_STEMS, mnist_arrays, write_idx, write_mnist


def test_loads_written_files(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=30, n_test=12)
    train = load_mnist(tmp_path, train=True, verify=False)
    test = load_mnist(tmp_path, train=False, verify=False)
    images, labels = mnist_arrays(30, 0)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(train.labels, torch.from_numpy(labels).long())
    assert len(test) == 12 and train.classes == [str(i) for i in range(10)]


def test_raw_and_torchvision_layouts(tmp_path: Path) -> None:
    write_mnist(tmp_path / "raw", 20, 10, gz=False)
    assert len(load_mnist(tmp_path / "raw", train=True)) == 20  # raw files: no checksum to verify
    write_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", 20, 10)
    data = load_mnist(tmp_path / "tv", train=False, variant="fashion", verify=False)
    assert len(data) == 10 and data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


def test_missing_files_all_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, train=True)
    msg = str(err.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "f68b3c2dcbeaaa9fbdd348bbdeb94873", mnist.MNIST_URL, str(tmp_path)):
        assert name in msg


def test_verify_catches_non_official_files(tmp_path: Path) -> None:
    write_mnist(tmp_path, 10, 10)
    with pytest.raises(DataError, match="checksum mismatch.*9fb629c4189551a2d022fa330f9573f3"):
        load_mnist(tmp_path, train=False, verify=True)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", mnist_arrays(10)[0])
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_wrong_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path, 10, 10)
    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    tmp = tmp_path / "swap"
    shutil.move(images, tmp)
    shutil.move(labels, images)
    shutil.move(tmp, labels)
    with pytest.raises(DataError, match="1 dimensions but images files have 3") as err:
        load_mnist(tmp_path, train=False, verify=False)
    assert str(images) in str(err.value)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x1f\x00\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + bytes(8))  # 0x0d: float32
    with pytest.raises(DataError, match="type 0x0d"):
        read_idx(bad)


def test_wrong_dims_and_payload(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 27, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="28x28") as err:
        load_mnist(tmp_path, train=False, verify=False)
    assert str(path) in str(err.value)
    raw = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(6)  # 6 bytes for 5 labels
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="need 5 bytes of data, the file holds 6"):
        read_idx(path)


def test_gzip_is_never_inflated_past_what_the_idx_header_announces(tmp_path: Path) -> None:
    """Also without checksum verification (--no-verify): 10 labels announced, 8 MB of zeros packed
    behind them (8 kB compressed) stop at the header's 18 bytes plus a little slack."""
    write_mnist(tmp_path, 10, 10)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    header = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big")
    labels.write_bytes(gzip.compress(header + bytes(10) + bytes(8 << 20)))
    with pytest.raises(DataError, match=r"decompresses to more than 82 bytes, more than its IDX header announces "
                                        r"\(18\)") as err:
        load_mnist(tmp_path, train=False, verify=False)
    assert str(labels) in str(err.value)
    labels.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (1 << 16).to_bytes(4, "big") * 3))  # 2^48 bytes
    with pytest.raises(DataError, match="announces 281,474,976,710,672 bytes, more than the 1,073,741,824"):
        read_idx(labels)
    two_members = gzip.compress(header) + gzip.compress(bytes(range(10)))  # as `cat a.gz b.gz` makes
    labels.write_bytes(two_members)
    assert read_idx(labels).tolist() == list(range(10))


def test_label_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, 10, 10)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.array([1, 2, 10, 3, 4, 5, 6, 7, 8, 9], np.uint8))
    with pytest.raises(DataError, match=r"label 10 at index 2 is out of range \[0, 10\)") as err:
        load_mnist(tmp_path, train=False, verify=False)
    assert str(labels) in str(err.value)
    write_idx(labels, np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_mnist(tmp_path, train=False, verify=False)


def test_download_from_local_server(http_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(http_server.directory, 16, 8)
    md5s = {stem: hashlib.md5((http_server.directory / f"{stem}.gz").read_bytes()).hexdigest()
            for stem in MNIST_STEMS}
    monkeypatch.setitem(mnist._MD5, "mnist", md5s)
    monkeypatch.setitem(mnist._SIZE, "mnist", {stem: (http_server.directory / f"{stem}.gz").stat().st_size
                                               for stem in MNIST_STEMS})
    monkeypatch.setattr(mnist, "MNIST_URL", http_server.url)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", ())
    data = load_mnist(tmp_path / "dl", train=True, download=True, verify=True)
    assert len(data) == 16
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [f"{s}.gz" for s in MNIST_STEMS[:2]]


def test_real_mnist_test_split(real_data: Path) -> None:
    data = load_mnist(real_data / "mnist", train=False)  # official files: MD5s verified
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.labels.bincount().tolist()[:3] == [980, 1135, 1032]
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist(real_data / "mnist", train=True)


def test_real_fashion_sample(real_data: Path) -> None:
    data = load_mnist(real_data / "fashion-mnist-sample", train=True, variant="fashion", verify=False)
    assert data.images.shape == (50, 1, 28, 28) and data.labels[:4].tolist() == [9, 0, 0, 3]
