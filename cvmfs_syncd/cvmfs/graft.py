"""Grafts: the size, checksums and chunk layout under which CernVM-FS finds a file's data.

A grafted file is published without ``cvmfs_server`` reading its content: the publisher
writes the file's data objects into the repository's storage itself and leaves an empty
placeholder plus a ``.cvmfsgraft-<name>`` marker in the transaction. This module computes
the marker (:class:`GraftResult`) from the file's bytes and, when given an
:class:`ObjectSink`, writes the data objects while it reads, so that every checksum in the
marker names an object a client can fetch and decode.

Rules (they match ``cvmfs_swissknife graft`` wherever that tool produces readable objects):

- ``compression="none"``: a stored object holds the raw bytes; ``"zlib"``: a complete zlib
  stream (level 6) of exactly the bytes it represents. A checksum is the hash of the
  stored bytes, 40 hex digits plus the algorithm suffix (none, ``-rmd160``, ``-shake128``).
- A file is chunked only if it is larger than the chunk size. Chunk boundaries lie at
  multiples of the chunk size of the *input*; the last chunk holds the remainder. Each
  chunk is compressed on its own; chunk objects are named with a ``P`` suffix.
- A chunked file's ``checksum=`` is the null hash, or with ``bulk_hash`` the hash of the
  whole file stored as one object (which is then written too).

Memory stays bounded: at most a few chunks are held at once, and objects larger than
:data:`BUFFERED_CHUNK_LIMIT` (or unchunked files with ``chunk_size=0``) are streamed.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from cvmfs_syncd.cvmfs.hashing import (
    HASH_SUFFIXES,
    ContentHasher,
    content_checksum,
    is_null_checksum,
    null_checksum,
    object_name,
)
from cvmfs_syncd.errors import GraftError

MIB: Final = 1 << 20
DEFAULT_CHUNK_SIZE: Final = 24 * MIB
"""Chunk size ``cvmfs_swissknife graft`` uses when ``-c`` is not given."""

GRAFT_PREFIX: Final = ".cvmfsgraft-"
"""A graft marker of ``dir/name`` is ``dir/.cvmfsgraft-name``."""

GRAFT_NAME_MAX: Final = 255 - len(GRAFT_PREFIX)
"""The longest file name (in bytes) that leaves room for its graft marker's name."""

ZLIB_LEVEL: Final = 6
"""The only level whose streams match the ones CernVM-FS writes (``Z_DEFAULT_COMPRESSION``)."""

COMPRESSIONS: Final = ("none", "zlib")

BUFFERED_CHUNK_LIMIT: Final = 32 * MIB
"""Chunks up to this size are read whole and may be compressed in parallel; larger ones
(and unbounded ones, ``chunk_size=0``) are streamed piece by piece on the calling thread."""

READ_SIZE: Final = MIB
"""Piece size for streamed objects: large enough for few system calls, small for memory."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GraftOptions:
    """How to graft: compression of stored objects, chunk size, hash algorithm, bulk hash.

    ``compression`` is ``"none"`` or ``"zlib"``; ``chunk_size`` is in bytes (``0`` = never
    chunk); ``algorithm`` is ``"sha1"``, ``"rmd160"`` or ``"shake128"``; ``bulk_hash``
    makes a chunked file's ``checksum=`` the hash of the whole file stored as one object.
    Invalid values raise :class:`GraftError`.
    """

    compression: str = "none"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    algorithm: str = "sha1"
    bulk_hash: bool = False

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise GraftError(
                f"unknown compression {self.compression!r} (expected one of "
                f"{', '.join(COMPRESSIONS)})"
            )
        if self.algorithm not in HASH_SUFFIXES:
            raise GraftError(
                f"unknown hash algorithm {self.algorithm!r} (expected one of "
                f"{', '.join(HASH_SUFFIXES)})"
            )
        if self.chunk_size < 0:
            raise GraftError(f"chunk size must not be negative, got {self.chunk_size}")


@dataclass(frozen=True)
class Chunk:
    """One chunk of a chunked file: input ``offset`` and ``size``, checksum of its object."""

    offset: int
    size: int
    checksum: str


@dataclass(frozen=True)
class GraftResult:
    """The content of a ``.cvmfsgraft-<name>`` marker.

    ``size`` is the file size, ``checksum`` the whole-file checksum (the null hash for a
    chunked file without bulk hash), ``compression`` ``"none"`` or ``"zlib"``, ``chunks``
    empty for an unchunked file.
    """

    size: int
    checksum: str
    compression: str
    chunks: tuple[Chunk, ...] = ()

    @property
    def chunked(self) -> bool:
        """True if the file is stored as several chunk objects."""
        return bool(self.chunks)

    def text(self) -> str:
        """Return the exact marker text: ``key=value`` lines, each ending in ``\\n``."""
        lines = [
            f"size={self.size}",
            f"checksum={self.checksum}",
            f"compression={self.compression}",
        ]
        if self.chunks:
            lines.append("chunk_offsets=" + ",".join(str(chunk.offset) for chunk in self.chunks))
            lines.append("chunk_checksums=" + ",".join(chunk.checksum for chunk in self.chunks))
        return "".join(line + "\n" for line in lines)

    def object_names(self) -> tuple[str, ...]:
        """Return the storage paths of every object this graft refers to, without repeats.

        Unchunked: the whole-file object. Chunked: each chunk's ``…P`` object, plus the
        whole-file (bulk) object when ``checksum`` is not the null hash.
        """
        if not self.chunks:
            return (object_name(self.checksum),)
        names = [object_name(chunk.checksum, partial=True) for chunk in self.chunks]
        if not is_null_checksum(self.checksum):
            names.append(object_name(self.checksum))
        return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- sinks


class ObjectWriter(Protocol):
    """An object being written piece by piece, whose name is known only at the end."""

    def write(self, data: bytes) -> object:
        """Append stored bytes to the object."""

    def commit(self, name: str) -> object:
        """Make the object visible under ``name`` (``data/ab/cdef…[P]``); ends the writer."""

    def discard(self) -> None:
        """Drop the object; calling it after :meth:`commit` or twice does nothing."""


class ObjectSink(Protocol):
    """Where :func:`graft_stream` puts the objects it produces.

    ``put`` may be called from several threads at once (``workers > 1``); writers from
    :meth:`open_writer` are used by the calling thread only.
    """

    def put(self, name: str, data: bytes) -> object:
        """Store ``data`` (the stored, possibly compressed, bytes) under ``name``."""

    def open_writer(self) -> ObjectWriter:
        """Start an object too large to be passed to :meth:`put` in one piece."""


class MemoryObjectWriter:
    """An :class:`ObjectWriter` that collects the bytes for a :class:`MemorySink`."""

    def __init__(self, sink: MemorySink) -> None:
        self._sink = sink
        self._parts: list[bytes] | None = []

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`GraftError` after commit/discard."""
        if self._parts is None:
            raise GraftError("write to a finished object")
        self._parts.append(data)

    def commit(self, name: str) -> None:
        """Store the collected bytes under ``name`` in the sink."""
        if self._parts is None:
            raise GraftError("commit of a finished object")
        self._sink.put(name, b"".join(self._parts))
        self._parts = None

    def discard(self) -> None:
        """Forget the collected bytes."""
        self._parts = None


class MemorySink:
    """An :class:`ObjectSink` keeping objects in a dict (``objects``), for tests and dry runs."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` (dict assignment is atomic under the GIL)."""
        self.objects[name] = bytes(data)

    def open_writer(self) -> MemoryObjectWriter:
        """Return a writer that stores its bytes here on commit."""
        return MemoryObjectWriter(self)


# --------------------------------------------------------------------------- engine


def _encode(raw: bytes, compression: str) -> bytes:
    return zlib.compress(raw, ZLIB_LEVEL) if compression == "zlib" else raw


def encode_object(raw: bytes, options: GraftOptions) -> tuple[str, bytes]:
    """Return ``(checksum, stored bytes)`` of ``raw`` stored as one object per ``options``."""
    stored = _encode(raw, options.compression)
    return content_checksum(stored, options.algorithm), stored


class _StreamedObject:
    """One object produced piece by piece: compressed, hashed and optionally written."""

    def __init__(self, options: GraftOptions, writer: ObjectWriter | None) -> None:
        self._compressor = zlib.compressobj(ZLIB_LEVEL) if options.compression == "zlib" else None
        self._hasher = ContentHasher(options.algorithm)
        self._writer = writer
        self._checksum: str | None = None

    def feed(self, raw: bytes) -> None:
        self._emit(self._compressor.compress(raw) if self._compressor is not None else raw)

    def finish(self) -> str:
        if self._compressor is not None:
            self._emit(self._compressor.flush())
        self._checksum = self._hasher.checksum()
        return self._checksum

    def commit(self, *, partial: bool) -> None:
        if self._checksum is None:
            raise GraftError("an object was committed before its checksum was known")
        if self._writer is not None:
            self._writer.commit(object_name(self._checksum, partial=partial))
            self._writer = None

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.discard()
            self._writer = None

    def _emit(self, stored: bytes) -> None:
        if stored:
            self._hasher.update(stored)
            if self._writer is not None:
                self._writer.write(stored)


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of input; short reads of pipes do not end it."""
    try:
        first = stream.read(size)
        if len(first) == size or not first:
            return bytes(first)
        parts = [first]
        missing = size - len(first)
        while missing:
            more = stream.read(missing)
            if not more:
                break
            parts.append(more)
            missing -= len(more)
    except OSError as error:
        raise GraftError(f"reading the input failed: {error.strerror or error}") from error
    return b"".join(parts)


def _new_writer(sink: ObjectSink | None) -> ObjectWriter | None:
    return sink.open_writer() if sink is not None else None


def graft_stream(
    stream: BinaryIO,
    options: GraftOptions,
    sink: ObjectSink | None = None,
    *,
    workers: int = 1,
) -> GraftResult:
    """Read ``stream`` to its end and return its graft; store its objects in ``sink``.

    ``stream`` is read until end of input (short reads from pipes do not end it).
    ``options`` chooses compression, chunk size, algorithm and bulk hash. With a ``sink``,
    every object named in the result is put there: each chunk as ``…P`` (or the whole file
    when unchunked), and with ``bulk_hash`` on a chunked file also the whole file as one
    object. ``workers > 1`` compresses and stores up to that many chunks in parallel threads
    (only for chunk sizes up to :data:`BUFFERED_CHUNK_LIMIT`). Memory use is bounded by a
    few chunks.

    Raises :class:`GraftError` if reading fails or ``workers < 1``; errors of the sink
    (e.g. :class:`~cvmfs_syncd.errors.StorageError`) propagate unchanged. Objects already
    put when an error occurs stay in the sink; unfinished streamed ones are discarded.
    """
    if workers < 1:
        raise GraftError(f"workers must be at least 1, got {workers}")
    if 0 < options.chunk_size <= BUFFERED_CHUNK_LIMIT:
        return _graft_buffered(stream, options, sink, workers)
    return _graft_streamed(stream, options, sink)


def graft_file(
    path: str | Path,
    options: GraftOptions,
    sink: ObjectSink | None = None,
    *,
    workers: int = 1,
) -> GraftResult:
    """Graft the file at ``path``; see :func:`graft_stream`.

    Raises :class:`GraftError` if the file cannot be opened or read.
    """
    try:
        stream = Path(path).open("rb")  # noqa: SIM115 - closed below, errors mapped first
    except OSError as error:
        raise GraftError(f"cannot open {path}: {error.strerror or error}") from error
    with stream:
        return graft_stream(stream, options, sink, workers=workers)


def _store_chunk(raw: bytes, options: GraftOptions, sink: ObjectSink | None) -> str:
    checksum, stored = encode_object(raw, options)
    if sink is not None:
        sink.put(object_name(checksum, partial=True), stored)
    return checksum


class _ChunkPipeline:
    """Runs chunk jobs inline (one worker) or on a thread pool, keeping their order."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, "graft") if workers > 1 else None
        self._in_flight: deque[tuple[int, int, Future[str]]] = deque()
        self.chunks: list[Chunk] = []

    def submit(self, offset: int, raw: bytes, job: Callable[[bytes], str]) -> None:
        future: Future[str]
        if self._pool is not None:
            future = self._pool.submit(job, raw)
        else:
            future = Future()
            future.set_result(job(raw))
        self._in_flight.append((offset, len(raw), future))
        # Waiting here keeps at most `workers` chunks compressing while the next is read.
        while len(self._in_flight) >= self._workers:
            self._complete_oldest()

    def drain(self) -> None:
        while self._in_flight:
            self._complete_oldest()

    def close(self) -> None:
        for _, _, future in self._in_flight:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _complete_oldest(self) -> None:
        offset, size, future = self._in_flight.popleft()
        self.chunks.append(Chunk(offset, size, future.result()))


def _graft_buffered(
    stream: BinaryIO, options: GraftOptions, sink: ObjectSink | None, workers: int
) -> GraftResult:
    chunk_size = options.chunk_size
    first = _read_up_to(stream, chunk_size)
    # Whether the file is chunked (and so whether the first object gets a P) is only known
    # once something follows the first chunk.
    second = _read_up_to(stream, chunk_size) if len(first) == chunk_size else b""
    if not second:
        checksum, stored = encode_object(first, options)
        if sink is not None:
            sink.put(object_name(checksum), stored)
        return GraftResult(len(first), checksum, options.compression)

    bulk = _StreamedObject(options, _new_writer(sink)) if options.bulk_hash else None
    pipeline = _ChunkPipeline(workers)

    def job(raw: bytes) -> str:
        return _store_chunk(raw, options, sink)

    try:
        offset = 0
        pending = [first, second]
        del first, second
        while True:
            raw = pending.pop(0) if pending else _read_up_to(stream, chunk_size)
            if not raw:
                break
            if bulk is not None:
                bulk.feed(raw)
            pipeline.submit(offset, raw, job)
            offset += len(raw)
            del raw
        pipeline.drain()
        if bulk is None:
            checksum = null_checksum(options.algorithm)
        else:
            checksum = bulk.finish()
            bulk.commit(partial=False)
    finally:
        pipeline.close()
        if bulk is not None:
            bulk.discard()
    return GraftResult(offset, checksum, options.compression, tuple(pipeline.chunks))


def _feed_chunk(
    stream: BinaryIO, chunk_size: int, part: _StreamedObject, bulk: _StreamedObject | None
) -> int:
    """Feed one chunk (all of the input when ``chunk_size`` is 0) to ``part`` and ``bulk``."""
    consumed = 0
    while chunk_size == 0 or consumed < chunk_size:
        want = READ_SIZE if chunk_size == 0 else min(READ_SIZE, chunk_size - consumed)
        data = _read_up_to(stream, want)
        if not data:
            break
        part.feed(data)
        if bulk is not None:
            bulk.feed(data)
        consumed += len(data)
    return consumed


def _graft_streamed(
    stream: BinaryIO, options: GraftOptions, sink: ObjectSink | None
) -> GraftResult:
    chunk_size = options.chunk_size
    # The bulk object is started speculatively: the first chunk's bytes are not kept, and
    # only at its end do we learn whether the file is chunked at all.
    bulk = (
        _StreamedObject(options, _new_writer(sink))
        if options.bulk_hash and chunk_size > 0
        else None
    )
    parts: list[_StreamedObject] = []
    chunks: list[Chunk] = []
    offset = 0
    try:
        while True:
            part = _StreamedObject(options, _new_writer(sink))
            parts.append(part)
            consumed = _feed_chunk(stream, chunk_size, part, bulk)
            if consumed == 0 and chunks:
                part.discard()  # the input ended exactly at a chunk boundary
                parts.pop()
                break
            chunks.append(Chunk(offset, consumed, part.finish()))
            offset += consumed
            if len(chunks) >= 2:
                # From the second chunk on the file is known to be chunked.
                for finished in parts:
                    finished.commit(partial=True)
                parts.clear()
            if chunk_size == 0 or consumed < chunk_size:
                break
        if len(chunks) == 1:
            parts[0].commit(partial=False)
            return GraftResult(offset, chunks[0].checksum, options.compression)
        if bulk is None:
            checksum = null_checksum(options.algorithm)
        else:
            checksum = bulk.finish()
            bulk.commit(partial=False)
        return GraftResult(offset, checksum, options.compression, tuple(chunks))
    finally:
        for part in parts:
            part.discard()
        if bulk is not None:
            bulk.discard()
