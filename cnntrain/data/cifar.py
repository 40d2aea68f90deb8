"""CIFAR-10 and CIFAR-100 from the official python or binary archives.

Looks for an extracted folder first (``cifar-10-batches-py``, ``cifar-100-python``,
``cifar-10-batches-bin``, ``cifar-100-binary``), then for the tarball (python preferred, binary
accepted; checksummed, then extracted safely), then downloads the python tarball if allowed.
Pickles are read with an allow-list unpickler, so a tampered batch file cannot run code.

    >>> train = load_cifar("data/cifar", train=True, num_classes=100, label_mode="coarse")  # doctest: +SKIP
    >>> train.images.shape, train.num_classes                                                # doctest: +SKIP
    (torch.Size([50000, 3, 32, 32]), 20)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnntrain.data.archive import safe_extract_tar
from cnntrain.data.base import ArrayDataset
from cnntrain.data.download import Resource, ensure_resources, run_on_local_rank_zero, verify_file
from cnntrain.data.safe_pickle import load_pickle_safely
from cnntrain.errors import ConfigError, DataError

_URL = "https://www.cs.toronto.edu/~kriz/"
_PIXELS = 3 * 32 * 32  # bytes per image, channel-major (1024 R, then G, then B)
_MAX_EXTRACTED = 512 << 20  # bytes; each official archive extracts to about 180 MB


@dataclass(frozen=True)
class _Layout:
    """Where one official archive puts its files once extracted."""

    folder: str
    tarball: Resource
    train: tuple[str, ...]
    test: tuple[str, ...]
    binary: bool
    md5: dict[str, str] = field(default_factory=dict)  # of extracted files, where published


def _tarball(filename: str, md5: str, size: int) -> Resource:
    return Resource(filename, _URL + filename, md5=md5, size=size)


_LAYOUTS: dict[tuple[int, str], _Layout] = {
    (10, "python"): _Layout(
        "cifar-10-batches-py",
        _tarball("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170_498_071),
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        binary=False,
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    (100, "python"): _Layout(
        "cifar-100-python",
        _tarball("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437),
        ("train",),
        ("test",),
        binary=False,
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
    (10, "binary"): _Layout(
        "cifar-10-batches-bin",
        _tarball("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", 170_052_171),
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        binary=True,
    ),
    (100, "binary"): _Layout(
        "cifar-100-binary",
        _tarball("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", 168_513_733),
        ("train.bin",),
        ("test.bin",),
        binary=True,
    ),
}
_FORMATS = ("python", "binary")  # preference order


def cifar_resources(num_classes: int = 10) -> list[Resource]:
    """The official python and binary tarballs of CIFAR-``num_classes``, python first."""
    return [_LAYOUTS[(num_classes, fmt)].tarball for fmt in _FORMATS]


def _find_folder(root: Path, num_classes: int) -> tuple[Path, _Layout] | None:
    for fmt in _FORMATS:
        layout = _LAYOUTS[(num_classes, fmt)]
        for folder in (root / layout.folder, root):
            if folder.name == layout.folder and folder.is_dir():
                return folder, layout
    return None


def _prepare(root: Path, num_classes: int, download: bool, verify: bool) -> None:
    """Make an extracted folder exist under ``root``: extract a present tarball or download one."""
    if _find_folder(root, num_classes):
        return
    for fmt in _FORMATS:
        tarball = _LAYOUTS[(num_classes, fmt)].tarball
        if (root / tarball.filename).is_file():
            if verify:
                verify_file(root / tarball.filename, tarball)
            _extract(root / tarball.filename, root, _LAYOUTS[(num_classes, fmt)])
            return
    python, binary = cifar_resources(num_classes)
    try:
        ensure_resources([python], root, download=download, verify=verify)
    except DataError as e:
        layout = _LAYOUTS[(num_classes, "python")]
        raise DataError(f"{e}\nAn extracted {layout.folder}/ folder or {binary.filename} "
                        f"(md5 {binary.md5}) in {root} is accepted too.") from None
    _extract(root / python.filename, root, _LAYOUTS[(num_classes, "python")])


def _extract(tarball: Path, root: Path, layout: _Layout) -> None:
    safe_extract_tar(tarball, root, max_bytes=_MAX_EXTRACTED)
    if not (root / layout.folder).is_dir():
        raise DataError(f"{tarball} does not contain the folder {layout.folder}/; is it the right archive?")


def _class_count(num_classes: int, label_mode: str) -> int:
    return 20 if label_mode == "coarse" else num_classes


def _field(d: object, key: str, path: Path) -> object:
    """``d[key]`` accepting bytes keys (official, Python 2) and str keys (re-pickled copies)."""
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python batch (a {type(d).__name__}, not a dict)")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path} has no {key!r} entry (keys: {sorted(map(str, d))[:8]}); is it the right file?")


def _check_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= count))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]} at record {bad[0]} is out of range [0, {count})")
    return labels


def _read_python(path: Path, label_key: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle_safely(path, str(path))
    data = _field(batch, "data", path)
    is_array = isinstance(data, np.ndarray)
    if not (is_array and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _PIXELS):
        desc = f"{data.dtype} {data.shape}" if is_array else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [N, {_PIXELS}], got {desc}")
    try:
        labels = np.asarray(_field(batch, label_key, path), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}")
    return data, _check_labels(labels, count, path)


def _read_binary(path: Path, num_classes: int, label_mode: str) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 1 if num_classes == 10 else 2  # CIFAR-100 records: coarse byte, fine byte, pixels
    record = label_bytes + _PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path} is truncated or corrupt: {raw.size} bytes is not a whole number of "
                        f"{record}-byte CIFAR-{num_classes} records")
    records = raw.reshape(-1, record)
    column = 0 if (num_classes == 10 or label_mode == "coarse") else 1
    labels = _check_labels(records[:, column], _class_count(num_classes, label_mode), path)
    return records[:, label_bytes:], labels


def _read_names(folder: Path, layout: _Layout, num_classes: int, label_mode: str) -> list[str]:
    if layout.binary:
        meta = folder / ("batches.meta.txt" if num_classes == 10 else f"{label_mode}_label_names.txt")
        if not meta.is_file():
            raise DataError(f"{meta} is missing; {folder} is incomplete")
        names = [line.strip() for line in meta.read_text(encoding="utf-8", errors="replace").splitlines()]
    else:
        meta = folder / ("batches.meta" if num_classes == 10 else "meta")
        if not meta.is_file():
            raise DataError(f"{meta} is missing; {folder} is incomplete")
        key = "label_names" if num_classes == 10 else f"{label_mode}_label_names"
        raw = _field(load_pickle_safely(meta, str(meta)), key, meta)
        if not isinstance(raw, list):
            raise DataError(f"{meta}: '{key}' is not a list")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    names = [n for n in names if n]
    expected = _class_count(num_classes, label_mode)
    if len(names) != expected:
        raise DataError(f"{meta} lists {len(names)} class names, not the {expected} of CIFAR-{num_classes}")
    return names


def load_cifar(
    root: str | os.PathLike,
    train: bool,
    *,
    num_classes: int = 10,
    label_mode: str = "fine",
    download: bool = False,
    verify: bool = True,
) -> ArrayDataset:
    """Load the training (50,000) or test (10,000) split of CIFAR-10 or CIFAR-100.

    ``label_mode`` "coarse" gives CIFAR-100's 20 superclasses. ``verify`` checks the MD5 of the
    tarball before extracting it and of each extracted python file (binary files have no published
    per-file checksums). ``download`` fetches the python tarball into ``root`` (local rank 0 only
    under torch.distributed). Returns images uint8 [N, 3, 32, 32] (RGB) and labels.
    """
    if num_classes not in (10, 100):
        raise ConfigError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    if label_mode not in ("fine", "coarse") or (label_mode == "coarse" and num_classes == 10):
        raise ConfigError(f"label_mode {label_mode!r} is not available for CIFAR-{num_classes} "
                          "('coarse' exists for CIFAR-100 only)")
    root = Path(root)
    # Local rank 0 downloads/extracts; the others wait, then read the extracted files themselves.
    run_on_local_rank_zero(lambda: _prepare(root, num_classes, download, verify))
    found = _find_folder(root, num_classes)
    if found is None:
        # Only other ranks get here: local rank 0 raised its own error, or the folder is not shared.
        raise DataError(f"no extracted CIFAR-{num_classes} folder in {root}: local rank 0 could not "
                        "prepare it (see its error), or the folder is not on a shared file system")
    folder, layout = found

    datas, labels = [], []
    for name in layout.train if train else layout.test:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing: {folder} is incomplete (delete it to extract anew)")
        if verify and name in layout.md5:
            verify_file(path, Resource(name, layout.tarball.url, md5=layout.md5[name]))
        if layout.binary:
            data, lab = _read_binary(path, num_classes, label_mode)
        else:
            key = "labels" if num_classes == 10 else f"{label_mode}_labels"
            data, lab = _read_python(path, key, _class_count(num_classes, label_mode))
        datas.append(data)
        labels.append(lab)
    meta = "batches.meta" if num_classes == 10 else "meta"
    if verify and meta in layout.md5 and (folder / meta).is_file():
        verify_file(folder / meta, Resource(meta, layout.tarball.url, md5=layout.md5[meta]))
    classes = _read_names(folder, layout, num_classes, label_mode)
    images = torch.from_numpy(np.concatenate(datas)).reshape(-1, 3, 32, 32)
    split = "train" if train else "test"
    return ArrayDataset(images, torch.from_numpy(np.concatenate(labels)), classes,
                        source=f"CIFAR-{num_classes} {label_mode} {split} ({folder})")
