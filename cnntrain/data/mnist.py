"""MNIST and Fashion-MNIST from their official IDX files (gzipped or raw).

Files are looked for in ``root`` itself and in torchvision's layout (``root/MNIST/raw``,
``root/FashionMNIST/raw``), so a folder torchvision has already downloaded is reused as it is.

    >>> train = load_mnist("data/mnist", train=True, download=True)  # doctest: +SKIP
    >>> train.images.shape                                           # doctest: +SKIP
    torch.Size([60000, 1, 28, 28])
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from cnntrain.data.base import ArrayDataset
from cnntrain.data.download import Resource, ensure_resources, run_on_local_rank_zero, verify_file
from cnntrain.errors import ConfigError, DataError

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MIRRORS = ("http://yann.lecun.com/exdb/mnist/",)
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# MD5s of the official .gz files (the ones torchvision checks).
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
# Sizes in bytes of the same files: a download that sends more is stopped (download.py).
_SIZE = {
    "mnist": {
        "train-images-idx3-ubyte": 9_912_422,
        "train-labels-idx1-ubyte": 28_881,
        "t10k-images-idx3-ubyte": 1_648_877,
        "t10k-labels-idx1-ubyte": 4_542,
    },
    "fashion": {
        "train-images-idx3-ubyte": 26_421_880,
        "train-labels-idx1-ubyte": 29_515,
        "t10k-images-idx3-ubyte": 4_422_102,
        "t10k-labels-idx1-ubyte": 5_148,
    },
}
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"],
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}

_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST uses
_IMAGE_NDIM, _LABEL_NDIM = 3, 1
_SIDE = 28  # pixels
MAX_IDX_BYTES = 1 << 30  # an IDX file claiming more is refused (MNIST's largest holds 47 MB)
_GZIP_SLACK = 64  # bytes a decompressed file may hold past what its IDX header announces


def mnist_resources(variant: str = "mnist") -> dict[str, Resource]:
    """The four official ``.gz`` files of ``variant`` ("mnist" or "fashion"), keyed by stem."""
    base, mirrors = (MNIST_URL, MNIST_MIRRORS) if variant == "mnist" else (FASHION_URL, ())
    resources = {}
    for stem, md5 in _MD5[variant].items():
        name = f"{stem}.gz"
        resources[stem] = Resource(name, base + name, md5=md5, mirrors=tuple(m + name for m in mirrors),
                                   size=_SIZE[variant].get(stem))
    return resources


def _idx_size(header: bytes) -> int | None:
    """Total bytes (header and data) the IDX header at the start of ``header`` announces; None when
    it is not a complete IDX header (the structure checks then say what is wrong)."""
    if len(header) < 4 or header[:2] != b"\0\0" or header[3] == 0:
        return None
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return 4 + 4 * ndim + math.prod(dims)


def _gunzip(raw: bytes, path: Path, max_bytes: int) -> bytes:
    """Decompress a gzip file whose content is IDX, never producing more than its header announces
    (plus :data:`_GZIP_SLACK`) or ``max_bytes``: a small file must not inflate to gigabytes."""
    peek = zlib.decompressobj(wbits=31)  # 31: gzip wrapper
    try:
        expected = _idx_size(peek.decompress(raw, 4 + 4 * 255))  # the longest possible IDX header
    except zlib.error as e:
        raise DataError(f"{path} is truncated or corrupt (gzip: {e}); delete it and get it again") from e
    if expected is not None and expected > max_bytes:
        raise DataError(f"{path}: its IDX header announces {expected:,} bytes, more than the {max_bytes:,} an IDX "
                        f"file may hold here; it is not an MNIST file")
    limit = min(max_bytes, (expected or 4 + 4 * 255) + _GZIP_SLACK)
    out = bytearray()
    rest = raw
    try:
        while rest:  # a gzip file may hold several members, one after another
            stream = zlib.decompressobj(wbits=31)
            out += stream.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise DataError(f"{path} decompresses to more than {limit:,} bytes, more than its IDX header "
                                f"announces ({expected or 0:,}); it is corrupt or not an MNIST file")
            if not stream.eof:
                raise DataError(f"{path} is truncated or corrupt (gzip: the compressed data ends early); "
                                "delete it and get it again")
            rest = stream.unused_data
            if not rest.strip(b"\0"):  # zero padding after the last member, as gzip allows
                break
    except zlib.error as e:
        raise DataError(f"{path} is truncated or corrupt (gzip: {e}); delete it and get it again") from e
    return bytes(out)


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None, max_bytes: int = MAX_IDX_BYTES) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzipped or raw) into a uint8 tensor of its dimensions.

    Checks the magic number (two zero bytes, type 0x08, number of dimensions), that
    ``expect_ndim`` matches when given (3 for images, 1 for labels) and that the payload holds
    exactly the announced number of bytes. A gzipped file is never inflated past what its header
    announces (and never past ``max_bytes``), with or without checksum verification. Raises
    :class:`DataError` naming the file otherwise.
    """
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise DataError(f"{path} is {path.stat().st_size:,} bytes, more than the {max_bytes:,} an IDX file may "
                            "hold here; it is not an MNIST file")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        raw = _gunzip(raw, path, max_bytes)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _UBYTE:
        raise DataError(f"{path}: IDX type 0x{dtype_code:02x} is not supported (only unsigned bytes, 0x08)")
    if expect_ndim is not None and ndim != expect_ndim:
        kind = "images" if expect_ndim == _IMAGE_NDIM else "labels"
        raise DataError(f"{path}: magic 0x{dtype_code:02x}{ndim:02x} has {ndim} dimensions but {kind} files "
                        f"have {expect_ndim} (magic 0x08{expect_ndim:02x}); is it the wrong file?")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} is truncated or corrupt: incomplete IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or corrupt: dimensions {dims} need {expected} bytes of data, "
                        f"the file holds {len(raw) - header}")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())  # copy: frombuffer views are read-only


def _locate(root: Path, stem: str, variant: str) -> Path | None:
    """The first existing copy of ``stem``: gzipped before raw, ``root`` before torchvision's layout."""
    for folder in (root, root / _TORCHVISION_FOLDER[variant] / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(
    root: str | os.PathLike,
    train: bool,
    *,
    variant: str = "mnist",
    download: bool = False,
    verify: bool = True,
) -> ArrayDataset:
    """Load the training (60,000) or test (10,000) split of MNIST or Fashion-MNIST.

    ``variant`` is "mnist" or "fashion". Missing files are downloaded into ``root`` when
    ``download`` is true (local rank 0 only under torch.distributed); ``verify`` checks the MD5 of
    ``.gz`` files (raw, already decompressed files have no published checksum and are only
    checked for structure). Returns images uint8 [N, 1, 28, 28] and labels in [0, 10).
    """
    if variant not in _MD5:
        raise ConfigError(f"unknown MNIST variant {variant!r}; choose 'mnist' or 'fashion'")
    root = Path(root)
    split = "train" if train else "t10k"
    stems = [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"]
    resources = mnist_resources(variant)

    def prepare() -> None:
        found = {stem: _locate(root, stem, variant) for stem in stems}
        missing = [resources[stem] for stem, path in found.items() if path is None]
        if missing:  # one error names every missing file; with download=True they are fetched
            ensure_resources(missing, root, download=download, verify=verify)
        for stem, path in found.items():
            if verify and path is not None and path.suffix == ".gz":
                verify_file(path, resources[stem])

    # Every rank must reach the barrier inside, so this runs whatever each rank sees on disk.
    run_on_local_rank_zero(prepare)
    found = {stem: _locate(root, stem, variant) for stem in stems}
    missing = [resources[stem] for stem, path in found.items() if path is None]
    if missing:  # other ranks, when local rank 0 failed or the folder is not shared: same message
        ensure_resources(missing, root, download=False, verify=False)

    images_path, labels_path = found[stems[0]], found[stems[1]]
    images = read_idx(images_path, expect_ndim=_IMAGE_NDIM)
    labels = read_idx(labels_path, expect_ndim=_LABEL_NDIM)
    if tuple(images.shape[1:]) != (_SIDE, _SIDE):
        raise DataError(f"{images_path}: images are {tuple(images.shape[1:])} pixels, MNIST images are 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels; the two files do not belong together")
    if labels.numel() and int(labels.max()) >= len(CLASSES[variant]):
        bad = int(torch.nonzero(labels >= len(CLASSES[variant]))[0])
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range [0, 10)")
    return ArrayDataset(images.unsqueeze(1), labels.to(torch.int64), list(CLASSES[variant]),
                        source=f"{variant} {'train' if train else 'test'} ({images_path.parent})")
