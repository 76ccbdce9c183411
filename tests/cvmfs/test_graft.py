"""The graft engine as a library: results, stored objects, streaming, parallelism, errors."""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd.cvmfs import graft, hashing
from cvmfs_syncd.cvmfs.graft import (
    Chunk,
    GraftOptions,
    GraftResult,
    MemorySink,
    graft_file,
    graft_stream,
)
from cvmfs_syncd.cvmfs.hashing import (
    ContentHasher,
    Ripemd160,
    algorithm_of,
    content_checksum,
    null_checksum,
    object_name,
)
from cvmfs_syncd.errors import GraftError, StorageError

SUFFIX = {"sha1": "", "rmd160": "-rmd160", "shake128": "-shake128"}


def reference_checksum(stored: bytes, algorithm: str) -> str:
    """Hash stored bytes with the standard library, spelled as in graft files."""
    if algorithm == "sha1":
        digest = hashlib.sha1(stored, usedforsecurity=False).hexdigest()
    elif algorithm == "rmd160":
        digest = hashlib.new("ripemd160", stored).hexdigest()
    else:
        digest = hashlib.shake_128(stored).hexdigest(20)
    return digest + SUFFIX[algorithm]


def reference_name(checksum: str, partial: bool) -> str:
    """Spell an object's storage path by hand."""
    return "data/" + checksum[:2] + "/" + checksum[2:] + ("P" if partial else "")


def reference_graft(data: bytes, options: GraftOptions) -> tuple[GraftResult, dict[str, bytes]]:
    """Compute a graft and its objects by the documented rule, independently of the engine."""

    def encode(raw: bytes) -> bytes:
        return zlib.compress(raw, 6) if options.compression == "zlib" else raw

    size = options.chunk_size
    whole = encode(data)
    whole_checksum = reference_checksum(whole, options.algorithm)
    if not size or len(data) <= size:
        result = GraftResult(len(data), whole_checksum, options.compression)
        return result, {reference_name(whole_checksum, partial=False): whole}
    objects: dict[str, bytes] = {}
    chunks = []
    for offset in range(0, len(data), size):
        stored = encode(data[offset : offset + size])
        checksum = reference_checksum(stored, options.algorithm)
        chunks.append(Chunk(offset, len(data[offset : offset + size]), checksum))
        objects[reference_name(checksum, partial=True)] = stored
    checksum = "0" * 40 + SUFFIX[options.algorithm]
    if options.bulk_hash:
        checksum = whole_checksum
        objects[reference_name(checksum, partial=False)] = whole
    return GraftResult(len(data), checksum, options.compression, tuple(chunks)), objects


class TricklingStream(io.RawIOBase):
    """A readable stream that returns at most a few bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data = memoryview(data)
        self._position = 0
        self._random = random.Random(seed)

    def readable(self) -> bool:
        """The stream can be read."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Copy between one and 97 bytes (a short read), 0 at the end."""
        count = min(len(buffer), self._random.randint(1, 97), len(self._data) - self._position)
        buffer[:count] = self._data[self._position : self._position + count]
        self._position += count
        return count


class PatternStream(io.RawIOBase):
    """``size`` bytes of a compressible pattern, produced on demand (nothing held in memory)."""

    def __init__(self, size: int) -> None:
        self._remaining = size
        self._block = bytes(range(256)) * 4096

    def readable(self) -> bool:
        """The stream can be read."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the repeating pattern."""
        count = min(len(buffer), self._remaining, len(self._block))
        buffer[:count] = self._block[:count]
        self._remaining -= count
        return count


class CountingSink:
    """A sink that only counts what it receives (for memory measurements)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.stored_bytes = 0

    def put(self, name: str, data: bytes) -> None:
        """Count the object."""
        self.names.append(name)
        self.stored_bytes += len(data)

    def open_writer(self) -> CountingWriter:
        """Return a writer that counts too."""
        return CountingWriter(self)


class CountingWriter:
    """Writer of :class:`CountingSink`."""

    def __init__(self, sink: CountingSink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> None:
        """Count the bytes."""
        self._sink.stored_bytes += len(data)

    def commit(self, name: str) -> None:
        """Count the object."""
        self._sink.names.append(name)

    def discard(self) -> None:
        """Nothing to drop."""


class FailingSink(MemorySink):
    """A memory sink whose ``put`` fails from the ``fail_at``-th call on; tracks writers."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.calls = 0
        self.open_writers: list[TrackedWriter] = []

    def put(self, name: str, data: bytes) -> None:
        """Store, or raise :class:`StorageError` once ``fail_at`` calls were made."""
        self.calls += 1
        if self.calls >= self.fail_at:
            raise StorageError(f"refusing {name}")
        super().put(name, data)

    def open_writer(self) -> TrackedWriter:
        """Return a writer whose end (commit or discard) is recorded."""
        writer = TrackedWriter(self)
        self.open_writers.append(writer)
        return writer


class TrackedWriter(graft.MemoryObjectWriter):
    """A memory writer that remembers whether it was committed or discarded."""

    def __init__(self, sink: MemorySink) -> None:
        super().__init__(sink)
        self.ended = False

    def commit(self, name: str) -> None:
        """Commit and remember."""
        self.ended = True
        super().commit(name)

    def discard(self) -> None:
        """Discard and remember."""
        self.ended = True
        super().discard()


@pytest.fixture(params=["buffered", "streamed"])
def engine_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test through whole-chunk buffering and through piecewise streaming."""
    if request.param == "buffered":
        yield "buffered"
        return
    with (
        mock.patch.object(graft, "BUFFERED_CHUNK_LIMIT", 0),
        mock.patch.object(graft, "READ_SIZE", 1000),
    ):
        yield "streamed"


data_strategy = st.one_of(
    st.binary(max_size=5000),
    st.builds(
        lambda seed, size, period: (random.Random(seed).randbytes(period) * (size // period + 1))[
            :size
        ],
        st.integers(0, 1000),
        st.integers(0, 20000),
        st.integers(1, 300),
    ),
)
options_strategy = st.builds(
    GraftOptions,
    compression=st.sampled_from(["none", "zlib"]),
    chunk_size=st.sampled_from([0, 1, 100, 1000, 4096, 7777]),
    algorithm=st.sampled_from(["sha1", "rmd160", "shake128"]),
    bulk_hash=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(data=data_strategy, options=options_strategy, workers=st.sampled_from([1, 2, 3]))
def test_results_and_objects_follow_the_rule(
    data: bytes, options: GraftOptions, workers: int
) -> None:
    """Buffered grafting gives the rule's result and stores exactly the rule's objects."""
    sink = MemorySink()
    result = graft_stream(io.BytesIO(data), options, sink, workers=workers)
    expected, objects = reference_graft(data, options)
    assert result == expected
    assert sink.objects == objects
    assert set(result.object_names()) == set(objects)


@settings(max_examples=80, deadline=None)
@given(data=data_strategy, options=options_strategy, seed=st.integers(0, 100))
def test_streamed_path_and_short_reads_give_the_same_result(
    data: bytes, options: GraftOptions, seed: int
) -> None:
    """Piecewise streaming and a stream of short reads change nothing in results or objects."""
    expected, objects = reference_graft(data, options)
    for limit in (graft.BUFFERED_CHUNK_LIMIT, 0):
        with (
            mock.patch.object(graft, "BUFFERED_CHUNK_LIMIT", limit),
            mock.patch.object(graft, "READ_SIZE", 333),
        ):
            for stream in (
                io.BufferedReader(TricklingStream(data, seed), buffer_size=64),
                cast(BinaryIO, TricklingStream(data, seed)),  # raw: every read is short
            ):
                sink = MemorySink()
                assert graft_stream(stream, options, sink) == expected
                assert sink.objects == objects


@pytest.mark.usefixtures("engine_path")
def test_stored_objects_decode_to_the_file() -> None:
    """With zlib every object is a complete stream; chunks concatenate to the input."""
    data = random.Random(1).randbytes(5000) + bytes(20000) + b"tail" * 999
    options = GraftOptions(compression="zlib", chunk_size=4096, bulk_hash=True)
    sink = MemorySink()
    result = graft_stream(io.BytesIO(data), options, sink)
    assert result.chunked
    pieces = [
        zlib.decompress(sink.objects[object_name(c.checksum, partial=True)]) for c in result.chunks
    ]
    assert b"".join(pieces) == data
    assert [len(piece) for piece in pieces] == [c.size for c in result.chunks]
    assert zlib.decompress(sink.objects[object_name(result.checksum)]) == data


@pytest.mark.usefixtures("engine_path")
@pytest.mark.parametrize(
    ("compression", "checksum"),
    [
        ("none", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        ("zlib", "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78"),
    ],
)
def test_empty_input(compression: str, checksum: str) -> None:
    """An empty file is one object: the empty string, or the 8-byte empty zlib stream."""
    sink = MemorySink()
    result = graft_stream(io.BytesIO(b""), GraftOptions(compression=compression), sink)
    assert result == GraftResult(0, checksum, compression)
    assert result.text() == f"size=0\nchecksum={checksum}\ncompression={compression}\n"
    assert list(sink.objects) == [object_name(checksum)]


@pytest.mark.usefixtures("engine_path")
def test_exact_multiple_has_no_empty_last_chunk() -> None:
    """Three full chunks give offsets 0, N, 2N; a single full chunk stays unchunked."""
    options = GraftOptions(chunk_size=1024)
    three = graft_stream(io.BytesIO(bytes(3072)), options)
    assert [chunk.offset for chunk in three.chunks] == [0, 1024, 2048]
    one = graft_stream(io.BytesIO(bytes(1024)), options)
    assert not one.chunked
    assert one.checksum == content_checksum(bytes(1024))


@pytest.mark.usefixtures("engine_path")
def test_bulk_hash_changes_only_the_checksum() -> None:
    """``bulk_hash`` replaces the null hash by the whole-file hash; chunk lines stay equal."""
    data = random.Random(2).randbytes(10000)
    plain = graft_stream(io.BytesIO(data), GraftOptions(chunk_size=4000, algorithm="rmd160"))
    bulk = graft_stream(
        io.BytesIO(data), GraftOptions(chunk_size=4000, algorithm="rmd160", bulk_hash=True)
    )
    assert plain.checksum == null_checksum("rmd160") == "0" * 40 + "-rmd160"
    assert bulk.checksum == content_checksum(data, "rmd160")
    assert plain.chunks == bulk.chunks
    assert plain.text().splitlines()[2:] == bulk.text().splitlines()[2:]


def test_text_of_a_chunked_graft() -> None:
    """The marker lists size, checksum, compression, offsets and chunk checksums in order."""
    result = GraftResult(5, "0" * 40, "none", (Chunk(0, 3, "a" * 40), Chunk(3, 2, "b" * 40)))
    assert result.text() == (
        f"size=5\nchecksum={'0' * 40}\ncompression=none\n"
        f"chunk_offsets=0,3\nchunk_checksums={'a' * 40},{'b' * 40}\n"
    )


def test_object_names_without_repeats() -> None:
    """Identical chunks are named once; the bulk object is listed when there is one."""
    data = bytes(4096 * 3)
    result = graft_stream(io.BytesIO(data), GraftOptions(chunk_size=4096, bulk_hash=True))
    digest = hashlib.sha1(bytes(4096), usedforsecurity=False).hexdigest()
    whole = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    assert result.object_names() == (
        f"data/{digest[:2]}/{digest[2:]}P",
        f"data/{whole[:2]}/{whole[2:]}",
    )
    assert object_name("ab" + "c" * 38 + "-shake128", partial=True) == (
        "data/ab/" + "c" * 38 + "-shake128P"
    )


def test_parallel_workers_give_the_same_result_as_one() -> None:
    """Compressing chunks in threads yields exactly the sequential result and objects."""
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    options = GraftOptions(compression="zlib", chunk_size=256 * 1024, bulk_hash=True)
    sinks = [MemorySink(), MemorySink()]
    results = [
        graft_stream(io.BytesIO(data), options, sink, workers=workers)
        for sink, workers in zip(sinks, (1, 2), strict=True)
    ]
    assert results[0] == results[1]
    assert sinks[0].objects == sinks[1].objects


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        (GraftOptions(compression="zlib", chunk_size=1 << 20, bulk_hash=True), 12 << 20),
        (GraftOptions(compression="zlib", chunk_size=0), 6 << 20),
        (GraftOptions(compression="none", chunk_size=64 << 20, bulk_hash=True), 6 << 20),
    ],
    ids=["buffered-chunks", "never-chunked", "streamed-chunks"],
)
def test_memory_stays_bounded(options: GraftOptions, limit: int) -> None:
    """Grafting 96 MiB keeps the Python heap far below the file size."""
    sink = CountingSink()
    stream = io.BufferedReader(PatternStream(96 << 20), buffer_size=1 << 16)
    tracemalloc.start()
    try:
        result = graft_stream(stream, options, sink, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == 96 << 20
    assert peak < limit, f"peak {peak} bytes"


@pytest.mark.usefixtures("engine_path")
def test_sink_failure_propagates_and_discards_writers() -> None:
    """An error of the sink reaches the caller; unfinished streamed objects are dropped."""
    data = random.Random(4).randbytes(50000)
    sink = FailingSink(fail_at=2)
    options = GraftOptions(chunk_size=5000, bulk_hash=True)
    with pytest.raises(StorageError, match="refusing"):
        graft_stream(io.BytesIO(data), options, sink, workers=2)
    assert all(writer.ended for writer in sink.open_writers)


def test_streamed_sink_failure_discards_writers() -> None:
    """When committing a streamed object fails, every other open writer is discarded."""
    data = random.Random(5).randbytes(30000)
    sink = FailingSink(fail_at=1)  # writers commit through put(), so the first commit fails
    with (
        mock.patch.object(graft, "BUFFERED_CHUNK_LIMIT", 0),
        pytest.raises(StorageError),
    ):
        graft_stream(io.BytesIO(data), GraftOptions(chunk_size=7000, bulk_hash=True), sink)
    assert sink.open_writers
    assert all(writer.ended for writer in sink.open_writers)
    assert sink.objects == {}


class BrokenStream(io.RawIOBase):
    """A stream whose reads fail with an I/O error."""

    def readable(self) -> bool:
        """The stream claims to be readable."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # noqa: ARG002
        """Fail."""
        raise OSError(5, "Input/output error")


@pytest.mark.usefixtures("engine_path")
def test_read_errors_become_graft_errors() -> None:
    """An I/O error while reading raises GraftError naming the cause."""
    with pytest.raises(GraftError, match="Input/output error"):
        graft_stream(cast(BinaryIO, BrokenStream()), GraftOptions())


def test_graft_file_reads_a_path(tmp_path: Path) -> None:
    """graft_file grafts a file by path and reports a missing one as GraftError."""
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert graft_file(path, GraftOptions()).checksum == "f572d396fae9206628714fb2ce00f72e94f2258f"
    with pytest.raises(GraftError, match="No such file"):
        graft_file(tmp_path / "missing", GraftOptions())


@pytest.mark.parametrize(
    "arguments",
    [
        {"compression": "gzip"},
        {"compression": "default"},
        {"algorithm": "md5"},
        {"algorithm": "SHA1"},
        {"chunk_size": -1},
    ],
)
def test_invalid_options_are_rejected(arguments: dict[str, object]) -> None:
    """Unknown compressions or algorithms and negative chunk sizes raise GraftError."""
    with pytest.raises(GraftError):
        GraftOptions(**arguments)  # type: ignore[arg-type]


def test_workers_must_be_positive() -> None:
    """workers=0 raises GraftError."""
    with pytest.raises(GraftError, match="workers"):
        graft_stream(io.BytesIO(b""), GraftOptions(), workers=0)


def test_checksum_parsing_and_null_hashes() -> None:
    """algorithm_of reads suffixes; malformed checksums raise GraftError."""
    assert algorithm_of("a" * 40) == "sha1"
    assert algorithm_of("a" * 40 + "-rmd160") == "rmd160"
    assert algorithm_of("a" * 40 + "-shake128") == "shake128"
    for bad in ("a" * 39, "A" * 40, "a" * 40 + "-md5", "a" * 40 + "P"):
        with pytest.raises(GraftError):
            algorithm_of(bad)
    with pytest.raises(GraftError):
        null_checksum("md5")
    with pytest.raises(GraftError):
        ContentHasher("md5")


def test_shake128_is_cut_to_20_bytes() -> None:
    """SHAKE-128 checksums are 20-byte outputs with the -shake128 suffix."""
    expected = hashlib.shake_128(b"abc").hexdigest(20) + "-shake128"
    assert content_checksum(b"abc", "shake128") == expected


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=700), split=st.integers(0, 700))
def test_pure_python_ripemd160_matches_hashlib(data: bytes, split: int) -> None:
    """The fallback RIPEMD-160 equals OpenSSL's, also when fed in two pieces."""
    whole = Ripemd160(data)
    pieces = Ripemd160()
    pieces.update(data[:split])
    pieces.update(data[split:])
    expected = hashlib.new("ripemd160", data).hexdigest()
    assert whole.hexdigest() == pieces.hexdigest() == expected
    assert whole.digest() == bytes.fromhex(expected)


def test_ripemd160_known_answers() -> None:
    """The fallback gives the published RIPEMD-160 test vectors."""
    assert Ripemd160(b"").hexdigest() == "9c1185a5c5e9fc54612808977ee8f548b2258d31"
    assert Ripemd160(b"abc").hexdigest() == "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc"
    million = Ripemd160()
    for _ in range(1000):
        million.update(b"a" * 1000)
    assert million.hexdigest() == "52783243c1697bdbe16d37f97f68f08325dc1528"


def test_fallback_is_used_without_openssl_ripemd160() -> None:
    """Without hashlib's ripemd160 the hasher switches to the pure-Python implementation."""
    with mock.patch.object(hashing, "_hashlib_has_ripemd160", return_value=False):
        hasher = ContentHasher("rmd160")
        hasher.update(b"abc")
        assert hasher.checksum() == "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc-rmd160"
