"""Downloads against a local HTTP server: resume, restart, checksums, offline errors, rank 0 only."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cnntrain.data.download import (
    DownloadError,
    Resource,
    download,
    ensure_resources,
    ensure_resources_distributed,
    file_digest,
    verify_file,
)
from cnntrain.errors import DataError
from tests.fixtures import closed_port_url

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, several read chunks' worth of distinct bytes
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def serve(server, name: str = "blob.bin", data: bytes = PAYLOAD) -> Resource:
    (server.directory / name).write_bytes(data)
    return Resource(name, server.url + name, md5=hashlib.md5(data).hexdigest())


def test_file_digest_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert file_digest(path) == MD5 and file_digest(path, "sha256") == SHA256
    verify_file(path, Resource("f.bin", "http://x/f.bin", md5=MD5, sha256=SHA256))
    with pytest.raises(DataError) as err:
        verify_file(path, Resource("f.bin", "http://x/f.bin", md5="0" * 32))
    msg = str(err.value)
    assert str(path) in msg and "0" * 32 in msg and MD5 in msg


def test_download_fresh(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    path = download(res, tmp_path / "data")
    assert path == tmp_path / "data" / "blob.bin" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]  # no .part, no lock file


def test_download_resumes_partial_part(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "blob.bin.part").write_bytes(PAYLOAD[:12345])
    path = download(res, folder)
    assert path.read_bytes() == PAYLOAD
    assert http_server.requests == [("/blob.bin", "bytes=12345-")]
    assert not (folder / "blob.bin.part").exists()


def test_complete_part_is_kept_after_416(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)  # interrupted between last byte and rename
    assert download(res, tmp_path).read_bytes() == PAYLOAD
    assert http_server.requests == [("/blob.bin", f"bytes={len(PAYLOAD)}-")]


def test_download_restarts_when_server_ignores_range(http_server, tmp_path: Path) -> None:
    http_server.honour_range = False
    res = serve(http_server)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "blob.bin.part").write_bytes(b"garbage" * 100)
    assert download(res, folder).read_bytes() == PAYLOAD  # a 200 answer is written from the start


def test_download_resumes_after_dropped_connection(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    http_server.cut_after["blob.bin"] = 30000
    path = download(res, tmp_path, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert http_server.requests == [("/blob.bin", None), ("/blob.bin", "bytes=30000-")]


def test_stale_part_is_discarded_after_checksum_mismatch(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    (tmp_path / "blob.bin.part").write_bytes(b"\xff" * 5000)  # wrong prefix, resumed by the server
    assert download(res, tmp_path, retries=2).read_bytes() == PAYLOAD
    assert [r for _, r in http_server.requests] == ["bytes=5000-", None]


def test_wrong_checksum_leaves_nothing(http_server, tmp_path: Path) -> None:
    serve(http_server)
    res = Resource("blob.bin", http_server.url + "blob.bin", sha256="ab" * 32)
    with pytest.raises(DataError) as err:
        download(res, tmp_path, retries=1)
    msg = str(err.value)
    assert res.url in msg and "ab" * 32 in msg and SHA256 in msg
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


@pytest.mark.parametrize("send_length", [True, False], ids=["announced", "streamed"])
def test_more_bytes_than_the_known_size_stop_the_download(http_server, tmp_path: Path, send_length: bool) -> None:
    """Announced too large (refused before reading) or streamed without a length (cut off at the
    size): the .part is deleted, the mirror tried, and the error names the URL and the file."""
    http_server.send_length = send_length
    serve(http_server, "big.bin", PAYLOAD + bytes(50_000))  # a different, larger file at the first URL
    serve(http_server, "ok.bin")
    res = Resource("blob.bin", http_server.url + "big.bin", md5=MD5, size=len(PAYLOAD))
    with pytest.raises(DownloadError) as err:
        download(res, tmp_path / "data", retries=1)
    msg = str(err.value)
    assert f"{http_server.url}big.bin" in msg and str(tmp_path / "data" / "blob.bin") in msg
    assert f"more than the {len(PAYLOAD):,}" in msg and ("announces" if send_length else "sent more than") in msg
    assert not err.value.unreachable and list((tmp_path / "data").iterdir()) == []  # no .part left
    mirrored = Resource("blob.bin", res.url, md5=MD5, size=len(PAYLOAD), mirrors=[http_server.url + "ok.bin"])
    assert download(mirrored, tmp_path / "data", retries=3).read_bytes() == PAYLOAD
    assert [p for p, _ in http_server.requests].count("/big.bin") == 2  # not retried: once per download


def test_unknown_size_is_capped_and_known_size_checked_on_disk(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    with pytest.raises(DownloadError, match=r"sent more than the 1,000 bytes expected"):
        http_server.send_length = False
        download(res, tmp_path / "data", retries=1, max_bytes=1000)
    (tmp_path / "blob.bin").write_bytes(PAYLOAD[:-1])
    with pytest.raises(DataError, match=rf"expected {len(PAYLOAD):,} bytes \(md5 {MD5}\), got {len(PAYLOAD) - 1:,}"):
        verify_file(tmp_path / "blob.bin", Resource("blob.bin", res.url, md5=MD5, size=len(PAYLOAD)))


def test_mirror_used_after_404(http_server, tmp_path: Path) -> None:
    serve(http_server, "real.bin")
    mirror = http_server.url + "real.bin"
    res = Resource("real.bin", http_server.url + "missing/real.bin", md5=MD5, mirrors=[mirror])
    assert download(res, tmp_path).read_bytes() == PAYLOAD
    assert [p for p, _ in http_server.requests] == ["/missing/real.bin", "/real.bin"]  # 404 is not retried


def test_offline_gives_one_error_naming_everything(tmp_path: Path) -> None:
    base = closed_port_url()
    resources = [Resource("a.gz", base + "a.gz", md5="1" * 32),
                 Resource("b.gz", base + "b.gz", sha256="2" * 64)]
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        ensure_resources(resources, tmp_path / "data", download=True, verify=True, retries=1)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    for text in ("a.gz", base + "a.gz", "md5 " + "1" * 32, "b.gz", base + "b.gz", "sha256 " + "2" * 64,
                 str(tmp_path / "data")):
        assert text in msg
    assert not list((tmp_path / "data").glob("*.gz"))


def test_missing_without_download(tmp_path: Path) -> None:
    res = Resource("x.tar.gz", "https://example.org/x.tar.gz", md5="3" * 32)
    with pytest.raises(DataError) as err:
        ensure_resources([res], tmp_path, download=False, verify=True)
    msg = str(err.value)
    assert "x.tar.gz" in msg and res.url in msg and "3" * 32 in msg and str(tmp_path) in msg


def test_present_files_are_verified_not_downloaded(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    (tmp_path / "blob.bin").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure_resources([res], tmp_path, download=True, verify=True)
    assert ensure_resources([res], tmp_path, download=True, verify=False) == [tmp_path / "blob.bin"]
    assert http_server.requests == []


def test_distributed_variant_without_process_group(http_server, tmp_path: Path) -> None:
    res = serve(http_server)
    paths = ensure_resources_distributed([res], tmp_path, download=True, verify=True)
    assert paths[0].read_bytes() == PAYLOAD


_RANK_SCRIPT = textwrap.dedent("""
    import sys, datetime
    import torch.distributed as dist
    from cnntrain.data.download import Resource, ensure_resources_distributed
    url, md5, folder = sys.argv[1:4]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    res = Resource("blob.bin", url, md5=md5)
    paths = ensure_resources_distributed([res], folder, download=True, verify=True)
    assert paths[0].stat().st_size > 0
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_only_local_rank_zero_downloads(http_server, tmp_path: Path, free_port: int) -> None:
    res = serve(http_server)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, res.url, MD5, str(tmp_path / "d")],
                                      env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert http_server.requests == [("/blob.bin", None)]  # one download, not one per rank


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
