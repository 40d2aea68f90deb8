"""Writers of tiny data sets in the real on-disk formats, and a local HTTP server for download tests.

Plain functions (not only pytest fixtures) so any test can build the data it needs::

    from tests.fixtures import write_mnist, write_cifar_python_tar, write_image_folder
    write_mnist(tmp_path, n_train=64, n_test=16)          # then load_mnist(tmp_path, ..., verify=False)

Files written here never match the official checksums: load them with ``verify=False``.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import re
import tarfile
import threading
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CIFAR_PIXELS = 3 * 32 * 32


# ---------------------------------------------------------------------------------------- IDX / MNIST

def write_idx(path: str | os.PathLike, array: np.ndarray, *, gz: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (magic 0x08, ndim; big-endian uint32 dims); gzip when
    ``gz`` (default: when the name ends with .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz if gz is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mnist_arrays(n: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable MNIST-like data: images uint8 [n, 28, 28] (a bright row band per class), labels [n]."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes)[rng.permutation(n)].astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 230
    return images, labels


def write_mnist(folder: str | os.PathLike, n_train: int = 60, n_test: int = 20, variant: str = "mnist",
                *, gz: bool = True, seed: int = 0) -> Path:
    """Write the four MNIST IDX files into ``folder``. ``variant`` ("mnist"/"fashion") only makes
    call sites readable: both variants share file names and format."""
    folder = Path(folder)
    for split, n, split_seed in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = mnist_arrays(n, split_seed)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)
    return folder


# ---------------------------------------------------------------------------------------------- CIFAR

def cifar_arrays(n: int, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learnable CIFAR-like data: uint8 [n, 3072] rows (a colour per class plus noise), fine labels,
    coarse labels (``fine // 5``, 20 superclasses, as a stand-in for the official mapping)."""
    rng = np.random.default_rng(seed)
    fine = (np.arange(n) % num_classes)[rng.permutation(n)].astype(np.int64)
    colours = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
    noise = rng.integers(-25, 26, size=(n, 3, 1024))
    data = np.clip(colours[fine][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(n, CIFAR_PIXELS)
    return data, fine, fine // 5


def faint_cifar_arrays(n: int, num_classes: int = 10, seed: int = 0, amplitude: float = 6.0,
                       noise: float = 64.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`cifar_arrays` but hard to learn quickly: each class is a faint blocky pattern
    (``amplitude`` grey levels, 8x8 blocks) under Gaussian noise of ``noise`` grey levels. LeNet
    needs a few hundred steps, so how fast a training method learns shows in the accuracy."""
    rng = np.random.default_rng(seed)
    fine = (np.arange(n) % num_classes)[rng.permutation(n)].astype(np.int64)
    patterns = np.kron(np.random.default_rng(99).normal(size=(num_classes, 3, 4, 4)), np.ones((1, 1, 8, 8)))
    images = 128 + amplitude * patterns[fine] + rng.normal(0, noise, size=(n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, CIFAR_PIXELS), fine, fine // 5


def _class_names(num_classes: int, label_mode: str = "fine") -> list[str]:
    if num_classes == 10:
        return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return [f"{label_mode}{i}" for i in range(20 if label_mode == "coarse" else 100)]


def cifar_python_files(num_classes: int = 10, n_train: int = 50, n_test: int = 10,
                       seed: int = 0, arrays=cifar_arrays) -> dict[str, bytes]:
    """Relative path -> bytes of an official-format python CIFAR folder (protocol-2 pickles of
    dicts with bytes keys); ``arrays`` makes the images and labels (see :func:`cifar_arrays`)."""
    def dump(obj: object) -> bytes:
        return pickle.dumps(obj, protocol=2)  # protocol 2, as the official (Python 2) files

    files: dict[str, bytes] = {}
    if num_classes == 10:
        folder = "cifar-10-batches-py"
        data, fine, _ = arrays(n_train, 10, seed)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            files[f"{folder}/data_batch_{i}"] = dump({
                b"batch_label": f"training batch {i} of 5".encode(), b"labels": fine[part].tolist(),
                b"data": data[part], b"filenames": [b"x.png"] * len(part)})
        data, fine, _ = arrays(n_test, 10, seed + 1)
        files[f"{folder}/test_batch"] = dump({b"batch_label": b"testing batch 1 of 1",
                                              b"labels": fine.tolist(), b"data": data})
        files[f"{folder}/batches.meta"] = dump({b"num_cases_per_batch": 10000, b"num_vis": CIFAR_PIXELS,
                                                b"label_names": [n.encode() for n in _class_names(10)]})
    else:
        folder = "cifar-100-python"
        for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
            data, fine, coarse = arrays(n, 100, s)
            files[f"{folder}/{name}"] = dump({b"batch_label": name.encode(), b"fine_labels": fine.tolist(),
                                              b"coarse_labels": coarse.tolist(), b"data": data})
        files[f"{folder}/meta"] = dump({
            b"fine_label_names": [n.encode() for n in _class_names(100, "fine")],
            b"coarse_label_names": [n.encode() for n in _class_names(100, "coarse")]})
    return files


def cifar_binary_files(num_classes: int = 10, n_train: int = 50, n_test: int = 10,
                       seed: int = 0) -> dict[str, bytes]:
    """Relative path -> bytes of an official-format binary CIFAR folder (fixed-size records)."""
    files: dict[str, bytes] = {}
    if num_classes == 10:
        folder = "cifar-10-batches-bin"
        data, fine, _ = cifar_arrays(n_train, 10, seed)
        records = np.concatenate([fine[:, None].astype(np.uint8), data], axis=1)
        for i, part in enumerate(np.array_split(records, 5), start=1):
            files[f"{folder}/data_batch_{i}.bin"] = part.tobytes()
        data, fine, _ = cifar_arrays(n_test, 10, seed + 1)
        test_records = np.concatenate([fine[:, None].astype(np.uint8), data], axis=1)
        files[f"{folder}/test_batch.bin"] = test_records.tobytes()
        files[f"{folder}/batches.meta.txt"] = ("\n".join(_class_names(10)) + "\n\n").encode()
    else:
        folder = "cifar-100-binary"
        for name, n, s in (("train.bin", n_train, seed), ("test.bin", n_test, seed + 1)):
            data, fine, coarse = cifar_arrays(n, 100, s)
            labels = np.stack([coarse, fine], axis=1).astype(np.uint8)
            files[f"{folder}/{name}"] = np.concatenate([labels, data], axis=1).tobytes()
        files[f"{folder}/fine_label_names.txt"] = "\n".join(_class_names(100, "fine")).encode()
        files[f"{folder}/coarse_label_names.txt"] = "\n".join(_class_names(100, "coarse")).encode()
    return files


def write_files(root: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``{relative path: bytes}`` under ``root`` (e.g. an extracted CIFAR folder)."""
    root = Path(root)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_tar(path: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``{member name: bytes}`` as a tar archive, gzipped when the name ends with .gz/.tgz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for folder in sorted({rel.split("/")[0] for rel in files if "/" in rel}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _tar_path(path: str | os.PathLike, official: str) -> Path:
    path = Path(path)
    return path if path.name.endswith((".tar.gz", ".tgz", ".tar")) else path / official


def write_cifar_python_tar(path: str | os.PathLike, num_classes: int = 10, n_train: int = 50,
                           n_test: int = 10, *, seed: int = 0) -> Path:
    """Write an official-layout python CIFAR tarball; ``path`` is the file or a folder (then the
    official name, e.g. ``cifar-10-python.tar.gz``, is used). Returns the tarball's path."""
    official = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"
    return write_tar(_tar_path(path, official), cifar_python_files(num_classes, n_train, n_test, seed))


def write_cifar_binary_tar(path: str | os.PathLike, num_classes: int = 10, n_train: int = 50,
                           n_test: int = 10, *, seed: int = 0) -> Path:
    """Like :func:`write_cifar_python_tar` for the binary format (``cifar-10-binary.tar.gz``, ...)."""
    official = "cifar-10-binary.tar.gz" if num_classes == 10 else "cifar-100-binary.tar.gz"
    return write_tar(_tar_path(path, official), cifar_binary_files(num_classes, n_train, n_test, seed))


# -------------------------------------------------------------------------------------- image folders

def write_image_folder(root: str | os.PathLike, classes: Sequence[str] = ("cat", "dog"), per_class: int = 4,
                       size: tuple[int, int] = (32, 32), *, split: str = "train", fmt: str = "JPEG",
                       seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/<NNNN>.<ext>`` images of ``size=(h, w)``: a colour per class plus
    noise, so models can learn them. Returns ``root/<split>``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}[fmt]
    split_dir = Path(root) / split
    for label, name in enumerate(classes):
        (split_dir / name).mkdir(parents=True, exist_ok=True)
        colour = np.random.default_rng(label + 99).integers(30, 226, size=3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.integers(-25, 26, size=(*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(split_dir / name / f"{i:04d}.{ext}", fmt)
    return split_dir


def jpeg_bytes(size: tuple[int, int] = (16, 16), *, claim: tuple[int, int] | None = None, seed: int = 0) -> bytes:
    """A small RGB JPEG of ``size=(w, h)``. ``claim=(w, h)`` (each at most 65535) patches its SOF0
    header to announce that size instead: a decompression bomb's header, a few hundred bytes that
    decoders would give gigabytes for (nothing after the header matches it)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=90)
    data = bytearray(out.getvalue())
    if claim is not None:
        sof = data.index(b"\xff\xc0")  # baseline SOF0: marker, length (2), precision (1), height (2), width (2)
        data[sof + 5: sof + 9] = claim[1].to_bytes(2, "big") + claim[0].to_bytes(2, "big")
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces ``width`` x ``height`` RGB pixels (up to 2^31 - 1 each) with one
    empty IDAT: opening it reads the size, decoding it would allocate width * height * 3 bytes."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------- HTTP server

class _Handler(SimpleHTTPRequestHandler):
    """Serves files; honours ``Range: bytes=N-`` with 206 unless told not to; can cut a response."""

    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = Path(self.translate_path(self.path))
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.server.send_length:
            self.send_header("Content-Length", str(len(body)))
        else:  # the body ends when the connection closes
            self.close_connection = True
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut_after.pop(path.name, None)
        if cut is not None:  # simulate a dropped connection: announce everything, send a part
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str | None]]
    honour_range: bool
    cut_after: dict[str, int]
    send_length: bool


class LocalHTTPServer:
    """Serve ``directory`` on 127.0.0.1 (random port) in a thread; use as a context manager.

    ``url`` ends with '/'. ``requests`` records (path, Range header). ``honour_range=False``
    answers 200 with the whole file to Range requests. ``cut_after[name] = n`` makes the next
    response for file ``name`` stop after ``n`` body bytes (a dropped connection).
    ``send_length = False`` leaves Content-Length out: the body ends when the connection closes.
    """

    def __init__(self, directory: str | os.PathLike, honour_range: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_Handler, directory=str(self.directory))
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.requests, self.httpd.honour_range, self.httpd.cut_after = [], honour_range, {}
        self.httpd.send_length = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # A short poll interval makes shutdown() (and so each test's teardown) quick.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.httpd.requests

    @property
    def cut_after(self) -> dict[str, int]:
        return self.httpd.cut_after

    @property
    def send_length(self) -> bool:
        return self.httpd.send_length

    @send_length.setter
    def send_length(self, value: bool) -> None:
        self.httpd.send_length = value

    @property
    def honour_range(self) -> bool:
        return self.httpd.honour_range

    @honour_range.setter
    def honour_range(self, value: bool) -> None:
        self.httpd.honour_range = value

    def __enter__(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connection refused at once): simulates being offline."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
