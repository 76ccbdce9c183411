"""Building archives in memory for the ingest tests, and reading streams the way S3 does."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from dataclasses import dataclass

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Entry:
    """One member to archive: ``kind`` is a tarfile type byte."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    mtime: float = MTIME


def file(name: str, data: bytes = b"", mode: int = 0o644, mtime: float = MTIME) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, mode=mode, mtime=mtime)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, target=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, target=target)


def special(name: str, kind: bytes) -> Entry:
    return Entry(name, kind)


def tar_bytes(*entries: Entry, tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """Return a plain tar holding ``entries`` in order (non-UTF-8 names as surrogates)."""
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tar_format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            info.mode = entry.mode
            info.mtime = entry.mtime
            info.linkname = entry.target
            info.uid, info.gid, info.uname, info.gname = 1000, 1000, "builder", "builders"
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def compress(data: bytes, how: str) -> bytes:
    """Return ``data`` compressed with ``how`` ("none", "gzip", "xz" or "bzip2")."""
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "xz":
        return lzma.compress(data)
    if how == "bzip2":
        return bz2.compress(data)
    return data


class Trickle:
    """A stream with nothing but ``read``, giving at most ``chunk`` bytes per call, as a
    network body may; ``fail_after``: raise ConnectionError once that many bytes were read."""

    def __init__(self, data: bytes, chunk: int = 4093, fail_after: int | None = None) -> None:
        self._data = data
        self._chunk = chunk
        self._fail_after = fail_after
        self.position = 0

    def read(self, size: int = -1, /) -> bytes:
        if self._fail_after is not None and self.position >= self._fail_after:
            raise ConnectionError("connection reset by peer")
        if size < 0:
            size = len(self._data)
        size = min(size, self._chunk)
        chunk = self._data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


def members_of(data: bytes) -> list[tarfile.TarInfo]:
    """Return every member of plain tar ``data``, reading each one's content completely
    (so that a cut-short member raises ReadError)."""
    found = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar:
            if info.isreg():
                content = tar.extractfile(info)
                assert content is not None
                content.read()
            found.append(info)
    return found


def contents_of(data: bytes) -> dict[str, bytes]:
    """Return the content of every regular member of plain tar ``data`` by name."""
    found = {}
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar:
            if info.isreg():
                content = tar.extractfile(info)
                assert content is not None
                found[info.name] = content.read()
    return found
