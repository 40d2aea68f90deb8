"""Load the official CIFAR python pickles without letting a pickle run code.

``pickle.load`` calls whatever callable a pickle names, so a tampered ``data_batch_1`` could run
``os.system``. The official files only need numpy's array reconstruction and ``_codecs.encode``
(how protocol 2 stores ``bytes``), so :class:`_CifarUnpickler` resolves exactly those names and
refuses every other global.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cnntrain.errors import DataError


def _numpy_multiarray() -> Any:
    # numpy 2 moved numpy.core to numpy._core (the old name warns); pickles may use either name.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _text_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to the text codecs protocol 2 uses for ``bytes`` objects."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(obj, encoding, errors)


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _text_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = multiarray._reconstruct
        table[(module, "scalar")] = multiarray.scalar
    return table


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can only build dicts, lists, strings, numbers and numpy arrays."""

    def __init__(self, file: io.BufferedIOBase, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self._name = name
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name} in {self._name}: the file is not an "
                            "official CIFAR pickle (it may be tampered with)") from None


def load_pickle_safely(path_or_bytes: str | os.PathLike | bytes, name: str | None = None) -> Any:
    """Unpickle a CIFAR python batch/meta file (a path or its bytes) allowing only numpy arrays.

    ``name`` is used in messages (defaults to the path). Strings come back as ``bytes``
    (``encoding='bytes'``, as the official files were written by Python 2). Raises
    :class:`DataError` naming the file for a forbidden global or a truncated/corrupt pickle.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        label = name or "<bytes>"
    else:
        path = Path(path_or_bytes)
        label = name or str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {label}: {e}") from e
    try:
        return _CifarUnpickler(io.BytesIO(data), label).load()
    except DataError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...: all mean a bad file
        raise DataError(f"{label} is truncated or corrupt (cannot unpickle: {type(e).__name__}: {e})") from e
