"""Extract tar archives without ever writing outside the target folder.

Every member is checked before it is written (no absolute paths, no ``..``, no links, no device
files), everything is extracted into a hidden temporary folder inside ``dest`` and only moved into
place once the whole archive has been read, so a hostile or truncated archive leaves nothing behind.
The regular files' sizes (from their headers, before any is written) may add up to at most
``max_bytes`` (:data:`MAX_EXTRACT_BYTES` unless the caller knows better): a small compressed archive
can expand to fill the disk.
The checks are our own, so the behaviour is the same on every Python; where :mod:`tarfile` has the
``"data"`` extraction filter (3.10.12+, 3.11.4+) it is used as a second line of defence.
"""

from __future__ import annotations

import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from cnntrain.errors import DataError

_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
# Raised by the "data" filter; an empty tuple catches nothing where the filter does not exist.
_FILTER_ERRORS: tuple[type[Exception], ...] = (tarfile.FilterError,) if _HAS_DATA_FILTER else ()
_BLOCK = 512  # tar header/record block size in bytes
MAX_EXTRACT_BYTES = 4 << 30  # total size of the files one archive may extract


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse any member that could write outside the destination or create something odd."""
    name = member.name
    windows_drive = name[1:2] == ":" and name[:1].isalpha()
    if name.startswith(("/", "\\")) or windows_drive:
        raise DataError(f"refusing to extract {archive}: member {name!r} has an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DataError(f"refusing to extract {archive}: member {name!r} contains a '..' component")
    if member.issym() or member.islnk():
        # Links are never needed by data sets and are the usual way out of the target folder.
        kind = "symlink" if member.issym() else "hard link"
        raise DataError(
            f"refusing to extract {archive}: member {name!r} is a {kind} to {member.linkname!r} "
            "(links are not extracted)"
        )
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"refusing to extract {archive}: member {name!r} is a device, FIFO or other special file"
        )


def _check_end_of_archive(archive: Path, tar: tarfile.TarFile) -> None:
    """Detect truncation that :mod:`tarfile` tolerates: a cut exactly between two members, or a cut
    gzip trailer (its CRC is only checked once the stream is read to the end)."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    block = fileobj.read(_BLOCK)
    if len(block) < _BLOCK or block.count(0) != _BLOCK:
        raise DataError(f"{archive} is truncated or corrupt: the end-of-archive marker is missing")
    while fileobj.read(1 << 20):
        pass


def _move_into(src: Path, dst: Path, archive: Path) -> None:
    """Move ``src`` to ``dst``, merging folders that already exist (files are replaced atomically)."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _move_into(child, dst / child.name, archive)
        src.rmdir()
        return
    if src.is_file() and dst.is_file() and not dst.is_symlink():
        os.replace(src, dst)
        return
    kind = "folder" if src.is_dir() else "file"
    raise DataError(f"cannot extract {archive}: {dst} already exists and is not a {kind}")


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike,
                     max_bytes: int = MAX_EXTRACT_BYTES) -> list[Path]:
    """Extract ``archive`` (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) into ``dest`` and return the
    paths of the regular files written, in archive order.

    Raises :class:`DataError` naming the archive (and member) for a truncated or corrupt archive,
    an absolute path, a ``..`` component, a symlink or hard link, a device file, or files adding up
    to more than ``max_bytes``; nothing is written outside ``dest`` and nothing is left in ``dest``
    when it fails.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        relative = _extract_all(archive, tmp, max_bytes)
        top_level = sorted({rel.parts[0] for rel in relative} | {p.name for p in tmp.iterdir()})
        for name in top_level:
            _move_into(tmp / name, dest / name, archive)
        return [dest / rel for rel in relative]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _corrupt(archive: Path, err: BaseException) -> DataError:
    return DataError(f"{archive} is truncated or corrupt ({err}); delete it and download it again")


def _extract_all(archive: Path, tmp: Path, max_bytes: int) -> list[Path]:
    """Check and extract every member into ``tmp``; return the relative paths of regular files."""
    files: list[Path] = []
    total = 0
    try:
        # "r:*" (not the stream mode "r|*") so the end-of-archive check below can seek.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member(archive, member)
                total += member.size if member.isfile() else 0
                if total > max_bytes:
                    raise DataError(f"refusing to extract {archive}: its files add up to more than {max_bytes:,} "
                                    f"bytes (reached at member {member.name!r}); it is not the archive expected")
                if _HAS_DATA_FILTER:
                    tar.extract(member, tmp, set_attrs=False, filter="data")
                else:  # pragma: no cover - older Pythons; our own checks above already ran
                    tar.extract(member, tmp, set_attrs=False)
                target = (tmp / member.name).resolve()
                if not target.is_relative_to(tmp.resolve()):  # belt and braces
                    raise DataError(f"refusing to extract {archive}: {member.name!r} escapes the folder")
                if member.isfile():
                    files.append(target.relative_to(tmp.resolve()))
            _check_end_of_archive(archive, tar)
    except DataError:
        raise
    except _FILTER_ERRORS as e:
        raise DataError(f"refusing to extract {archive}: {e}") from e
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(archive, e) from e
    except OSError as e:
        if e.errno is None:  # gzip.BadGzipFile, bz2 format errors: the archive, not the disk
            raise _corrupt(archive, e) from e
        raise DataError(f"cannot extract {archive} into {tmp.parent}: {e}") from e
    return files
