"""The allow-list unpickler: loads CIFAR-style pickles, refuses anything that could run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cnntrain.data.safe_pickle import load_pickle_safely
from cnntrain.errors import DataError


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loads_cifar_style_batch(tmp_path: Path) -> None:
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4],
             b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072), b"scalar": np.int64(7),
             b"filenames": [b"a.png", b"b.png", b"c.png"]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    loaded = load_pickle_safely(path)
    assert loaded[b"labels"] == [3, 1, 4] and loaded[b"batch_label"] == b"training batch 1 of 5"
    assert np.array_equal(loaded[b"data"], batch[b"data"]) and loaded[b"data"].dtype == np.uint8
    assert loaded[b"scalar"] == 7
    assert load_pickle_safely(path.read_bytes(), "bytes")[b"labels"] == [3, 1, 4]


def test_loads_numpy1_module_names(tmp_path: Path) -> None:
    # The official files (and numpy 1.x) name numpy.core.multiarray; numpy 2 writes numpy._core.
    raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert load_pickle_safely(raw, "old")[b"data"].shape == (2, 3072)


def test_real_batches_meta(real_data: Path) -> None:
    meta = load_pickle_safely(real_data / "cifar10-meta" / "batches.meta")
    assert meta[b"label_names"][:2] == [b"airplane", b"automobile"] and len(meta[b"label_names"]) == 10


def test_hostile_reduce_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _RunsShell(marker)}, protocol=2))
    with pytest.raises(DataError) as err:
        load_pickle_safely(path)
    assert f"refusing to unpickle {os.system.__module__}.system in {path}" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"),
                                         ("numpy.lib.npyio", "load"), ("builtins", "getattr")])
def test_other_globals_refused(module: str, name: str) -> None:
    # A protocol-2 pickle that only names the global: enough to reach find_class.
    raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
    with pytest.raises(DataError, match=f"refusing to unpickle {module}.{name} in evil"):
        load_pickle_safely(raw, "evil")


def test_codecs_encode_limited_to_text_codecs() -> None:
    assert load_pickle_safely(pickle.dumps(b"\x00\xffbytes", protocol=2), "ok") == b"\x00\xffbytes"
    raw = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="rot13"):
        load_pickle_safely(raw, "odd")


def test_truncated_pickle(tmp_path: Path) -> None:
    raw = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}, protocol=2)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_pickle_safely(raw[: len(raw) // 2], "test_batch")
    assert "test_batch" in str(err.value)
