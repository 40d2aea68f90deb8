"""Safe tar extraction: round trip, truncation, and every way out of the target folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cnntrain.data.archive import safe_extract_tar
from cnntrain.errors import DataError
from tests.fixtures import write_tar

FILES = {"pkg/a.txt": b"alpha", "pkg/sub/b.bin": bytes(range(256)) * 50}


def hostile_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar with a harmless file first, then the given hand-made members."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        ok = tarfile.TarInfo("good/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("name", ["x.tar.gz", "x.tgz", "x.tar"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    archive = write_tar(tmp_path / name, FILES)
    dest = tmp_path / "out"
    written = safe_extract_tar(archive, dest)
    assert written == [dest / "pkg/a.txt", dest / "pkg/sub/b.bin"]
    assert all((dest / rel).read_bytes() == data for rel, data in FILES.items())
    assert sorted(p.name for p in dest.iterdir()) == ["pkg"]  # the temporary folder is gone
    safe_extract_tar(archive, dest)  # extracting again over the same files is fine


@pytest.mark.parametrize("keep", [0.5, 0.97, -4])
def test_truncated_tar_gz(tmp_path: Path, keep: float) -> None:
    archive = write_tar(tmp_path / "x.tar.gz", FILES)
    data = archive.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) + int(keep)  # -4: only the gzip trailer cut
    archive.write_bytes(data[:cut])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        safe_extract_tar(archive, tmp_path / "out")
    assert str(archive) in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_plain_tar_between_members(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "x.tar", FILES)
    archive.write_bytes(archive.read_bytes()[: 512 * 3])  # dir header, a.txt header + data block
    with pytest.raises(DataError, match="truncated or corrupt"):
        safe_extract_tar(archive, tmp_path / "out")


def test_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="truncated or corrupt"):
        safe_extract_tar(bogus, tmp_path / "out")


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (file_member("../escaped.txt"), "'..'"),
        (file_member("good/../../escaped.txt"), "'..'"),
        (link_member("link", "../../outside"), "symlink"),
        (link_member("good/hard", "../escaped.txt", tarfile.LNKTYPE), "hard link"),
        (link_member("inside", "good/ok.txt"), "symlink"),  # even links inside are refused
    ],
)
def test_refuses_escapes(tmp_path: Path, member, reason: str) -> None:
    archive = hostile_tar(tmp_path / "evil.tar", [member])
    dest = tmp_path / "a" / "b"
    with pytest.raises(DataError, match=reason) as err:
        safe_extract_tar(archive, dest)
    assert str(archive) in str(err.value) and member[0].name in str(err.value)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert list(dest.iterdir()) == []  # not even the harmless member before it is left


def test_refuses_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "absolute.txt"
    archive = hostile_tar(tmp_path / "evil.tar.gz", [file_member(str(target))])
    with pytest.raises(DataError, match="absolute path"):
        safe_extract_tar(archive, tmp_path / "out")
    assert not target.exists()


def test_refuses_symlink_then_write_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members = [link_member("lnk", str(outside)), file_member("lnk/pwned.txt")]
    archive = hostile_tar(tmp_path / "evil.tar", members)
    with pytest.raises(DataError, match="symlink"):
        safe_extract_tar(archive, tmp_path / "out")
    assert list(outside.iterdir()) == []


def test_refuses_device_and_fifo(tmp_path: Path) -> None:
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        info = tarfile.TarInfo("dev")
        info.type = kind
        archive = hostile_tar(tmp_path / "dev.tar", [(info, None)])
        with pytest.raises(DataError, match="device"):
            safe_extract_tar(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_merges_into_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "pkg").mkdir(parents=True)
    (dest / "pkg" / "keep.txt").write_text("mine")
    (dest / "pkg" / "a.txt").write_text("old")
    safe_extract_tar(write_tar(tmp_path / "x.tar", FILES), dest)
    assert (dest / "pkg" / "keep.txt").read_text() == "mine"
    assert (dest / "pkg" / "a.txt").read_bytes() == b"alpha"


def test_files_adding_up_past_the_cap_are_refused_and_nothing_is_left(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "bomb.tar.gz", {"pkg/a.bin": bytes(600_000), "pkg/b.bin": bytes(600_000)})
    assert archive.stat().st_size < 10_000  # zeros compress ~1000:1
    dest = tmp_path / "out"
    with pytest.raises(DataError, match=r"refusing to extract .*bomb.tar.gz: its files add up to more than "
                                        r"1,000,000 bytes \(reached at member 'pkg/b.bin'\)"):
        safe_extract_tar(archive, dest, max_bytes=1_000_000)
    assert list(dest.iterdir()) == []
    assert len(safe_extract_tar(archive, dest, max_bytes=1_200_000)) == 2
