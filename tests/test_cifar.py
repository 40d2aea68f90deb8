"""CIFAR-10/100, python and binary formats, fine and coarse labels, tarballs, folders, bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import cnntrain.data.cifar as cifar
from cnntrain.data.cifar import load_cifar
from cnntrain.errors import ConfigError, DataError
from tests.fixtures import (
    cifar_arrays,
    cifar_binary_files,
    cifar_python_files,
    write_cifar_binary_tar,
    write_cifar_python_tar,
    write_files,
    write_tar,
)


def expected(n: int, num_classes: int, seed: int, label_mode: str = "fine"):
    """The images [n, 3, 32, 32] and labels the fixture writers put into a split."""
    data, fine, coarse = cifar_arrays(n, num_classes, seed)
    labels = coarse if label_mode == "coarse" else fine
    return torch.from_numpy(data).reshape(n, 3, 32, 32), torch.from_numpy(labels)


@pytest.mark.parametrize("writer", [write_cifar_python_tar, write_cifar_binary_tar])
def test_cifar10_tarballs(tmp_path: Path, writer) -> None:
    writer(tmp_path, 10, n_train=23, n_test=7)
    train = load_cifar(tmp_path, train=True, verify=False)
    test = load_cifar(tmp_path, train=False, verify=False)
    images, labels = expected(23, 10, 0)
    assert train.images.shape == (23, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, images) and torch.equal(train.labels, labels)
    assert torch.equal(test.labels, expected(7, 10, 1)[1])
    assert train.classes[0] == "airplane" and len(train.classes) == 10


@pytest.mark.parametrize("writer", [write_cifar_python_tar, write_cifar_binary_tar])
@pytest.mark.parametrize("label_mode", ["fine", "coarse"])
def test_cifar100_tarballs(tmp_path: Path, writer, label_mode: str) -> None:
    writer(tmp_path, 100, n_train=40, n_test=10)
    train = load_cifar(tmp_path, train=True, num_classes=100, label_mode=label_mode, verify=False)
    images, labels = expected(40, 100, 0, label_mode)
    assert torch.equal(train.images, images) and torch.equal(train.labels, labels)
    assert train.num_classes == (20 if label_mode == "coarse" else 100)
    assert train.classes[1] == f"{label_mode}1"
    assert len(load_cifar(tmp_path, train=False, num_classes=100, label_mode=label_mode, verify=False)) == 10


def test_extracted_folder_preferred_over_tarball(tmp_path: Path) -> None:
    write_files(tmp_path, cifar_python_files(10, 15, 5))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not even a tarball")
    assert len(load_cifar(tmp_path, train=True, verify=False)) == 15
    assert len(load_cifar(tmp_path / "cifar-10-batches-py", train=True, verify=False)) == 15  # root = folder


def test_binary_folder_accepted(tmp_path: Path) -> None:
    write_files(tmp_path, cifar_binary_files(100, 12, 4))
    assert len(load_cifar(tmp_path, train=True, num_classes=100, verify=False)) == 12


def test_tarball_checksum_verified(tmp_path: Path) -> None:
    write_cifar_python_tar(tmp_path, 10)
    with pytest.raises(DataError, match="c58f30108f718f92721af3b95e74349a") as err:
        load_cifar(tmp_path, train=True)
    assert "cifar-10-python.tar.gz" in str(err.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted from an unverified file


def test_extracted_files_verified(tmp_path: Path) -> None:
    write_files(tmp_path, cifar_python_files(10, 10, 5))
    with pytest.raises(DataError, match="c99cafc152244af753f735de768cd75f"):
        load_cifar(tmp_path, train=True, verify=True)


def test_missing_everything_one_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path, train=True, num_classes=100)
    msg = str(err.value)
    for text in ("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", str(tmp_path), "cifar-100-binary.tar.gz"):
        assert text in msg


def test_download_from_local_server(http_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = write_cifar_python_tar(http_server.directory, 10, 20, 5)
    layout = cifar._LAYOUTS[(10, "python")]
    resource = dataclasses.replace(layout.tarball, url=http_server.url + tarball.name,
                                   md5=hashlib.md5(tarball.read_bytes()).hexdigest(), size=tarball.stat().st_size)
    monkeypatch.setitem(cifar._LAYOUTS, (10, "python"), dataclasses.replace(layout, tarball=resource, md5={}))
    data = load_cifar(tmp_path, train=True, download=True, verify=True)
    assert len(data) == 20 and (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_extraction_is_capped_also_without_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar_python_tar(tmp_path, 10, 50, 10)  # about 190 kB extracted
    monkeypatch.setattr(cifar, "_MAX_EXTRACTED", 100_000)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: its files add up to more than 100,000 bytes"):
        load_cifar(tmp_path, train=True, verify=False)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_hostile_pickle_not_executed(tmp_path: Path) -> None:
    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    marker = tmp_path / "marker"
    files = cifar_python_files(10, 10, 5)
    hostile = pickle.dumps({b"data": RunsShell(), b"labels": []}, protocol=2)
    files["cifar-10-batches-py/data_batch_3"] = hostile
    write_files(tmp_path, files)
    with pytest.raises(DataError, match="refusing to unpickle .*system in .*data_batch_3"):
        load_cifar(tmp_path, train=True, verify=False)
    assert not marker.exists()


def test_bad_python_batches(tmp_path: Path) -> None:
    files = cifar_python_files(10, 10, 5)
    bad = {b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(bad, protocol=2)
    write_files(tmp_path, files)
    with pytest.raises(DataError, match=r"test_batch: label 10 at record 4 is out of range \[0, 10\)"):
        load_cifar(tmp_path, train=False, verify=False)
    bad = {b"data": np.zeros((5, 1024), np.uint8), b"labels": [0] * 5}
    (tmp_path / "cifar-10-batches-py/test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: 'data' must be uint8 \[N, 3072\]"):
        load_cifar(tmp_path, train=False, verify=False)
    (tmp_path / "cifar-10-batches-py/data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2 is missing"):
        load_cifar(tmp_path, train=True, verify=False)


def test_bad_binary_files(tmp_path: Path) -> None:
    files = cifar_binary_files(100, 10, 5)
    files["cifar-100-binary/test.bin"] = files["cifar-100-binary/test.bin"][:-100]
    write_files(tmp_path, files)
    with pytest.raises(DataError, match="test.bin is truncated or corrupt.*3074-byte"):
        load_cifar(tmp_path, train=False, num_classes=100, verify=False)
    records = np.frombuffer(files["cifar-100-binary/train.bin"], np.uint8).reshape(10, 3074).copy()
    records[3, 0] = 20  # coarse label out of range, fine labels still fine
    (tmp_path / "cifar-100-binary/train.bin").write_bytes(records.tobytes())
    assert len(load_cifar(tmp_path, train=True, num_classes=100, label_mode="fine", verify=False)) == 10
    with pytest.raises(DataError, match=r"label 20 at record 3 is out of range \[0, 20\)"):
        load_cifar(tmp_path, train=True, num_classes=100, label_mode="coarse", verify=False)


def test_truncated_tarball(tmp_path: Path) -> None:
    tarball = write_cifar_python_tar(tmp_path, 10)
    tarball.write_bytes(tarball.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_cifar(tmp_path, train=True, verify=False)


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_cifar(tmp_path, train=True, num_classes=10, label_mode="coarse")
    with pytest.raises(ConfigError):
        load_cifar(tmp_path, train=True, num_classes=20)


def test_tarball_without_expected_folder(tmp_path: Path) -> None:
    write_tar(tmp_path / "cifar-10-python.tar.gz", {"other/data_batch_1": b"x"})
    with pytest.raises(DataError, match="does not contain the folder cifar-10-batches-py"):
        load_cifar(tmp_path, train=True, verify=False)
