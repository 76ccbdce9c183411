"""Reading an archive front to back: hashing its bytes, undoing its compression, opening its tar.

Decompression is done here with the standard library's file readers (``gzip``, ``lzma``,
``bz2``), which check the gzip CRC and length, report a compressed stream cut short
(EOFError) and decompress in bounded pieces; the plain tar stream is read by
:class:`cvmfs_syncd.ingest.tarformat.TarReader`. Nothing here seeks, so a pipe or an S3
response body works as well as a file.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from cvmfs_syncd.ingest.model import ArchiveStreamError, Readable
from cvmfs_syncd.ingest.names import Compression
from cvmfs_syncd.ingest.tarformat import (
    NAME_ENCODING,
    NAME_ERRORS,
    DamagedArchive,
    TarReader,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Bytes asked of a stream at a time.
CHUNK_BYTES = 1024 * 1024
#: Most bytes read after the end-of-archive marker (zero padding to the record size; GNU
#: tar's largest blocking factor makes records of a few MiB at most).
TRAILER_MAX = 8 * 1024 * 1024

__all__ = [
    "CHUNK_BYTES",
    "NAME_ENCODING",
    "NAME_ERRORS",
    "TRAILER_MAX",
    "DamagedArchive",
    "DigestReader",
    "detect_compression",
    "finish_archive",
    "open_archive",
]

# What the first bytes of a stream say about its compression. Formats with no reader here
# are recognised only to say so; anything else is taken for a plain tar.
_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"BZh", Compression.BZIP2),
)
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"LZIP", "lzip"),
    (b"\x1f\x9d", "compress (.Z)"),
)
_MAGIC_BYTES = 6


def _open_gzip(raw: io.BufferedReader[DigestReader]) -> io.BufferedIOBase:
    return gzip.GzipFile(fileobj=raw, mode="rb")


def _open_xz(raw: io.BufferedReader[DigestReader]) -> io.BufferedIOBase:
    return lzma.LZMAFile(raw, mode="rb")


def _open_bzip2(raw: io.BufferedReader[DigestReader]) -> io.BufferedIOBase:
    return bz2.BZ2File(raw, mode="rb")


def _open_plain(raw: io.BufferedReader[DigestReader]) -> io.BufferedIOBase:
    return raw


#: How each compression is undone (the suffix table is in :mod:`cvmfs_syncd.ingest.names`).
_OPENERS: dict[Compression, Callable[[io.BufferedReader[DigestReader]], io.BufferedIOBase]] = {
    Compression.NONE: _open_plain,
    Compression.GZIP: _open_gzip,
    Compression.XZ: _open_xz,
    Compression.BZIP2: _open_bzip2,
}


#: What decompressing a damaged, truncated or foreign stream raises: gzip raises
#: BadGzipFile (an OSError), bz2 a plain OSError, a cut stream EOFError. Failures of the
#: underlying stream are ArchiveStreamError, which is none of these.
_UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    ValueError,
)


@contextmanager
def _as_damage() -> Iterator[None]:
    """Raise what reading the archive raises as DamagedArchive (the cause chained).

    Used around the reading calls only, so that an error of the caller's own code (or of
    its output) is never taken for damage to the archive.
    """
    try:
        yield
    except (ArchiveStreamError, DamagedArchive):
        raise
    except _UNREADABLE_ERRORS as exc:
        raise DamagedArchive(f"{exc or 'failed'} ({type(exc).__name__})") from exc


class DigestReader(io.RawIOBase):
    """The archive's bytes as they arrive: counted, hashed (SHA-256), failures wrapped.

    An exception from the underlying stream becomes :class:`ArchiveStreamError` (with the
    cause chained), so that a broken connection is never mistaken for a damaged archive.
    """

    def __init__(self, source: Readable) -> None:
        super().__init__()
        self._source = source
        self._hash = hashlib.sha256()
        self._pending = b""
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = super().read(size)
        return b"" if data is None else data  # None only from non-blocking streams

    def _pull(self, size: int) -> bytes:
        try:
            data = self._source.read(size)
        except Exception as exc:
            raise ArchiveStreamError(f"reading the archive failed: {exc}") from exc
        if len(data) > size:
            raise ArchiveStreamError(f"the archive stream returned {len(data)} bytes for {size}")
        self._hash.update(data)
        self.count += len(data)
        return data

    def head(self, size: int) -> bytes:
        """Return the first ``size`` bytes (fewer only at the end), to be read again."""
        while len(self._pending) < size:
            data = self._pull(size - len(self._pending))
            if not data:
                break
            self._pending += data
        return self._pending[:size]

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._pending:
            size = min(len(view), len(self._pending))
            view[:size] = self._pending[:size]
            self._pending = self._pending[size:]
            return size
        data = self._pull(len(view))
        view[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and hash) the rest of the stream, discarding it."""
        self._pending = b""
        while self._pull(CHUNK_BYTES):
            pass

    def hexdigest(self) -> str:
        """Return the SHA-256 of every byte read so far, in hex."""
        return self._hash.hexdigest()


def detect_compression(head: bytes) -> Compression:
    """Return the compression the first bytes of a stream show (NONE when none is known).

    Raise :class:`DamagedArchive` for a compression that is recognised but not supported.
    """
    for magic, compression in _MAGIC:
        if head.startswith(magic):
            return compression
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise DamagedArchive(f"the archive is {name}-compressed, which is not supported")
    return Compression.NONE


@contextmanager
def open_archive(raw: DigestReader, compression: Compression | None = None) -> Iterator[TarReader]:
    """Yield a TarReader reading ``raw``, decompressed as ``compression`` says (None: as its
    first bytes show).

    Reading from it (its members, their content, :func:`finish_archive`) raises
    :class:`DamagedArchive` if the stream is not such an archive, :class:`ArchiveStreamError`
    if reading the stream fails.
    """
    with ExitStack() as stack:
        with _as_damage():
            if compression is None:
                compression = detect_compression(raw.head(_MAGIC_BYTES))
            buffered = io.BufferedReader(raw, CHUNK_BYTES)
            plain = stack.enter_context(_OPENERS[compression](buffered))
        yield TarReader(_Decompressed(plain))


class _Decompressed:
    """The plain tar stream, its decompression failures raised as DamagedArchive."""

    def __init__(self, plain: io.BufferedIOBase) -> None:
        self._plain = plain

    def read(self, size: int, /) -> bytes:
        with _as_damage():
            return self._plain.read(size)


def finish_archive(tar: TarReader, raw: DigestReader) -> None:
    """Read what follows the end-of-archive marker, then the rest of the raw stream.

    Raise :class:`DamagedArchive` if anything but zero padding follows the marker (a second
    archive appended to the first would otherwise be ignored) or more than
    :data:`TRAILER_MAX` bytes of it.
    """
    tar.trailer(TRAILER_MAX)
    with _as_damage():
        raw.drain()
