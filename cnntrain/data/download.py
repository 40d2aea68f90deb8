"""Checksummed, resumable downloads of data set files, and the one error users see when offline.

A download streams into ``<file>.part``, resumes that file with an HTTP ``Range`` request after an
interruption, checks the MD5/SHA-256 and only then renames it to its final name, so a file under
its final name is always complete. A server that sends (or announces) more bytes than the file's
known size, or than :data:`MAX_DOWNLOAD_BYTES` when the size is not known, is cut off: the
``.part`` is deleted and the next mirror tried. Only ``urllib`` is used: no extra dependency, and proxies set
through the usual ``*_proxy`` variables work.

    >>> res = Resource("t10k-labels-idx1-ubyte.gz", "https://ossci-datasets.s3.amazonaws.com/mnist/"
    ...                "t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c")
    >>> ensure_resources([res], "data/mnist", download=True, verify=True)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cnntrain.digest import file_digest
from cnntrain.errors import DataError

log = logging.getLogger("cnntrain")

_CHUNK = 1 << 20  # bytes per read: large enough that Python overhead is negligible
MAX_DOWNLOAD_BYTES = 16 << 30  # a file whose size is not published is cut off past this
_T = TypeVar("_T")


@dataclass(frozen=True)
class Resource:
    """One downloadable file: its name on disk, where to get it and what it must hash to."""

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    mirrors: tuple[str, ...] = ()  # tried in order after ``url``
    size: int | None = None  # bytes, where published: a download that sends more is stopped

    def __post_init__(self) -> None:
        # A list passed by a caller would make the frozen dataclass unhashable.
        object.__setattr__(self, "mirrors", tuple(self.mirrors))

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors)

    def checksum_text(self) -> str:
        """The expected checksums as text for messages, e.g. ``md5 f68b...``."""
        parts = [f"{algo} {value}" for algo, value in (("sha256", self.sha256), ("md5", self.md5)) if value]
        return ", ".join(parts) if parts else "no published checksum"


def _mismatch(path: Path, resource: Resource) -> str | None:
    """Describe the size or first checksum that differs, or None when all published ones match."""
    if resource.size is not None and path.stat().st_size != resource.size:
        return f"expected {resource.size:,} bytes ({resource.checksum_text()}), got {path.stat().st_size:,} bytes"
    for algo, expected in (("sha256", resource.sha256), ("md5", resource.md5)):
        if expected:
            actual = file_digest(path, algo)
            if actual.lower() != expected.lower():
                return f"expected {algo} {expected.lower()}, got {actual}"
    return None


def verify_file(path: str | os.PathLike, resource: Resource) -> None:
    """Raise :class:`DataError` naming the file, expected and actual checksum when they differ."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing (expected {resource.checksum_text()}, from {resource.url})")
    problem = _mismatch(path, resource)
    if problem:
        raise DataError(
            f"checksum mismatch for {path}: {problem}; the file is corrupt, incomplete or a different "
            f"version: delete it and download it again from {resource.url}"
        )


class _Incomplete(Exception):
    """The connection ended before the announced length: worth a retry that resumes."""


class _TooLarge(Exception):
    """The server sent, or announced, more than the file can hold: no retry of that URL will help."""


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two processes never write the same ``.part`` file.

    Locking the folder itself leaves no lock file behind; downloads into one folder run one at a time.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent downloads are then the caller's business
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _progress(total: int | None, initial: int, name: str):
    """A tqdm bar on an interactive terminal, otherwise nothing (logs stay free of bar debris)."""
    if sys.stderr is None or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name, leave=False)


def _fetch(url: str, part: Path, timeout: float, limit: int) -> bool:
    """Append the rest of ``url`` to ``part`` (or rewrite it when the server ignores ``Range``),
    never letting ``part`` grow past ``limit`` bytes (raises :class:`_TooLarge` instead).

    Returns True when bytes already in ``part`` were kept (a resumed download).
    """
    have = part.stat().st_size if part.exists() else 0
    if have > limit:  # left by an older run or another server: cannot be a prefix of this file
        part.unlink()
        have = 0
    headers = {"User-Agent": "cnntrain"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # The .part already holds the whole file (or more): let the checksum decide.
            return True
        raise
    with response:
        content_range = response.headers.get("Content-Range") or ""
        if have and response.status == 206 and content_range.startswith(f"bytes {have}-"):
            mode, offset = "ab", have
        elif response.status == 206:
            part.unlink(missing_ok=True)  # a range we did not ask for: the next try starts from zero
            raise _Incomplete(f"unexpected Content-Range {content_range!r}")
        else:
            # A 200 to a Range request is the whole file again: start over instead of appending.
            if have:
                log.info("%s does not support resuming; restarting %s", url, part.name)
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and offset + expected > limit:
            raise _TooLarge(f"announces {offset + expected:,} bytes, more than the {limit:,} expected")
        bar = _progress(None if expected is None else offset + expected, offset, part.name[: -len(".part")])
        received = 0
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except http.client.IncompleteRead as e:
                        out.write(e.partial)  # keep what arrived: the retry resumes after it
                        raise _Incomplete(f"connection closed after {offset + received} bytes") from e
                    if not chunk:
                        break
                    if offset + received + len(chunk) > limit:
                        raise _TooLarge(f"sent more than the {limit:,} bytes expected")
                    out.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if expected is not None and received < expected:
            raise _Incomplete(f"connection closed after {offset + received} of {offset + expected} bytes")
    return offset > 0


class DownloadError(DataError):
    """Every URL of a resource failed. ``unreachable``: no server answered at all (offline)."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


def download(resource: Resource, folder: str | os.PathLike, *, timeout: float = 60, retries: int = 3,
             max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Download ``resource`` into ``folder`` and return its path, resuming a partial ``.part`` file.

    ``timeout`` is in seconds per network operation; ``retries`` is the number of attempts per URL
    (waiting 1 s, 2 s, 4 s ... in between). A URL that sends more than ``resource.size`` bytes (or
    ``max_bytes`` when the size is not known) is cut off, its ``.part`` deleted, and the next mirror
    tried. Raises :class:`DownloadError` (a :class:`DataError`) when every URL fails, and
    :class:`DataError` when the complete file has the wrong checksum; in both cases nothing is left
    under the final name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / resource.filename
    part = folder / (resource.filename + ".part")
    errors: list[str] = []
    answered = False  # did any server answer with an HTTP status?
    limit = resource.size if resource.size is not None else max_bytes
    with _folder_lock(folder):
        # Another process may have finished the file while this one waited for the lock.
        if final.is_file() and _mismatch(final, resource) is None:
            return final
        for url in resource.urls:
            for attempt in range(1, max(1, retries) + 1):
                try:
                    resumed = _fetch(url, part, timeout, limit)
                except _TooLarge as e:
                    part.unlink(missing_ok=True)  # not a prefix of the file we want: nothing to resume
                    errors.append(f"{url} {e} for {final}; the partial file was deleted")
                    answered = True
                    break  # the same URL would send the same again: next mirror
                except (OSError, http.client.HTTPException, _Incomplete) as e:
                    errors.append(f"{url}: {_describe(e)}")
                    # urlopen wraps connection failures (refused, DNS, connect timeout) in URLError.
                    connect_failed = isinstance(e, urllib.error.URLError) and not isinstance(
                        e, urllib.error.HTTPError)
                    answered |= not connect_failed
                    # A 4xx answer will not change on a retry; go to the next mirror instead.
                    if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500:
                        break
                    if attempt < retries:
                        time.sleep(min(2.0 ** (attempt - 1), 30.0))
                    continue
                problem = _mismatch(part, resource)
                if problem is None:
                    os.replace(part, final)  # atomic: readers never see a half-written file
                    return final
                part.unlink(missing_ok=True)
                if resumed:
                    # The kept prefix may be stale (the file changed on the server): the next try is fresh.
                    errors.append(f"{url}: checksum mismatch after resuming ({problem})")
                    answered = True
                    continue
                raise DataError(
                    f"downloaded {url} but its checksum does not match: {problem}; the server or a "
                    f"proxy returned different content. Nothing was saved as {final}."
                )
    raise DownloadError(f"could not download {resource.filename}: " + "; ".join(errors[-3:]),
                        unreachable=not answered)


_download_one = download  # ensure_resources has a parameter named ``download``


def _missing_message(missing: Sequence[Resource], folder: Path, reason: str) -> str:
    lines = [f"missing data file{'s' if len(missing) > 1 else ''} in {folder}{reason}:"]
    for res in missing:
        lines.append(f"  {res.filename}  from {res.url}  ({res.checksum_text()})")
    lines.append(
        f"Download {'them' if len(missing) > 1 else 'it'} into {folder} (e.g. with curl -O <url>), "
        "or enable downloading (download=True, --download) on a machine with network access."
    )
    return "\n".join(lines)


def ensure_resources(
    resources: Sequence[Resource],
    folder: str | os.PathLike,
    *,
    download: bool,
    verify: bool,
    timeout: float = 60,
    retries: int = 3,
) -> list[Path]:
    """Make every resource present (and checksum-verified unless ``verify=False``) in ``folder``.

    Returns their paths in order. Files already present are verified, never re-downloaded. Missing
    files are downloaded when ``download`` is true; files still missing after that (no download
    allowed, network down) are reported together in one :class:`DataError` listing each file, its
    URL, its checksum and the folder to put it in.
    """
    folder = Path(folder)
    paths = [folder / res.filename for res in resources]
    missing: list[Resource] = []
    for res, path in zip(resources, paths):
        if path.is_file():
            if verify:
                verify_file(path, res)
        else:
            missing.append(res)
    if not missing:
        return paths
    if not download:
        raise DataError(_missing_message(missing, folder, ""))
    still_missing: list[Resource] = []
    failures: list[str] = []
    offline = False
    for res in missing:
        if offline:
            still_missing.append(res)
            continue
        try:
            _download_one(res, folder, timeout=timeout, retries=retries)
        except DownloadError as e:
            still_missing.append(res)
            failures.append(str(e))
            # When no server can be reached at all, trying the other files only adds waiting.
            offline = e.unreachable
    if still_missing:
        reason = f" (download failed: {failures[0]})" if failures else ""
        raise DataError(_missing_message(still_missing, folder, reason))
    return paths


def _local_rank() -> int:
    import torch.distributed as dist

    value = os.environ.get("LOCAL_RANK")
    if value is not None and value.strip().isdigit():
        return int(value)
    # Without LOCAL_RANK only global rank 0 downloads; other nodes then need the files on shared disk.
    return dist.get_rank()


def run_on_local_rank_zero(fn: Callable[[], _T]) -> _T | None:
    """Run ``fn`` on local rank 0 only while the other ranks wait on a barrier.

    Without an initialised process group, just runs ``fn``. On the other ranks returns None. An
    exception in ``fn`` is re-raised on local rank 0 only after the barrier, so the other ranks
    are never left waiting for a process that has died; they find out by checking for the files.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result: _T | None = None
    error: BaseException | None = None
    if _local_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised after the barrier
            error = e
    dist.barrier()
    if error is not None:
        raise error
    return result


def ensure_resources_distributed(
    resources: Sequence[Resource],
    folder: str | os.PathLike,
    *,
    download: bool,
    verify: bool,
    timeout: float = 60,
    retries: int = 3,
) -> list[Path]:
    """:func:`ensure_resources` where local rank 0 downloads while the other ranks wait.

    After the barrier every other rank checks that the files are present (not their checksums,
    which local rank 0 has just checked) and raises the usual missing-file error otherwise. The
    wait is bounded by the process group's timeout (``init_process_group(timeout=...)``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ensure_resources(resources, folder, download=download, verify=verify, timeout=timeout,
                                retries=retries)
    paths = run_on_local_rank_zero(
        lambda: ensure_resources(resources, folder, download=download, verify=verify, timeout=timeout,
                                 retries=retries)
    )
    if paths is not None:
        return paths
    return ensure_resources(resources, folder, download=False, verify=False)
