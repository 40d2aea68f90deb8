"""Shared fixtures. The writers themselves live in ``fixtures.py`` so non-pytest code can use them."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

# Tests import shared helpers as ``tests.<module>``; plain ``pytest`` (unlike ``python -m pytest``)
# does not put the repository root on sys.path, so do it here (conftest loads before any test).
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.fixtures import LocalHTTPServer  # noqa: E402 - needs the path set above


@pytest.fixture(autouse=True, scope="session")
def _decoded_image_cache(tmp_path_factory):
    """In-memory image folders cache their decoded images in this session's temporary folder, never
    in the user's ~/.cache/cnntrain (CLI subprocesses inherit it through the environment)."""
    before = os.environ.get("CNNTRAIN_CACHE")
    os.environ["CNNTRAIN_CACHE"] = str(tmp_path_factory.mktemp("cnntrain-cache"))
    yield
    if before is None:
        os.environ.pop("CNNTRAIN_CACHE", None)
    else:
        os.environ["CNNTRAIN_CACHE"] = before


@pytest.fixture
def http_server(tmp_path: Path):
    """A :class:`fixtures.LocalHTTPServer` serving ``tmp_path / "www"`` on 127.0.0.1."""
    with LocalHTTPServer(tmp_path / "www") as server:
        yield server


@pytest.fixture
def real_data() -> Path:
    """The shared folder of real data files (``CNNTRAIN_REAL_DATA`` or ``../shared/data``); skips
    the test when it is absent."""
    env = os.environ.get("CNNTRAIN_REAL_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set CNNTRAIN_REAL_DATA)")
    return path


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group for collective code run in the test process itself."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()
