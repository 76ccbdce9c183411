"""prepare: write the data objects of a batch's files into the repository's storage before
its transaction opens.

Inside the transaction the lane then only places an empty placeholder and a
``.cvmfsgraft-<name>`` marker per file (:mod:`cvmfs_syncd.pipeline.place`); ``publish``
reads the markers instead of compressing and uploading every file, so the repository is
locked for a fraction of the time a copy needs.

What makes this safe:

- ``publish`` never checks a graft's objects, so every object is verified after writing
  (:class:`~cvmfs_syncd.cvmfs.storage.RecordingSink`): read back, hashed, world-readable.
- Every object name is journalled *before* it is written; an object found already
  stored is taken off the record again, so an abandoned batch (or recovery after a crash)
  deletes exactly the objects it created and never one a revision may use.
- Objects are not fsynced one by one: one ``syncfs`` of the storage makes the whole batch
  durable before a marker refers to any of it (a local publish flushes before signing).
- A file that changes while it is read is not prepared (its op goes back to pending).
- gc can delete an object between preparing and the transaction (an object already
  stored may be referenced only by revisions gc discards; ``CVMFS_AUTO_GC`` runs gc inside
  any publish): ``last_gc`` is read before preparing and again once the transaction is
  open (:meth:`Preparer.missing`), and missing objects are written again.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Protocol, cast

import structlog

from cvmfs_syncd.cvmfs.graft import GRAFT_PREFIX, GraftOptions, encode_object, graft_stream
from cvmfs_syncd.cvmfs.hashing import object_name
from cvmfs_syncd.cvmfs.objects import ObjectStore, StoredObjectWriter
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.storage import LocalObjectStore, RecordingSink, RecordingWriter, open_storage
from cvmfs_syncd.errors import GraftError, RepositoryConfigError, StorageError, UnsafeName
from cvmfs_syncd.model import Op
from cvmfs_syncd.paths import split_repo_path
from cvmfs_syncd.planner import Applied, ApplyOutcome
from cvmfs_syncd.state import State

log = structlog.get_logger(__name__)

#: Graft chunk size when the repository does not say (the swissknife default).
DEFAULT_GRAFT_CHUNK = 24 * 1024 * 1024
#: CVMFS_MIN_CHUNK_SIZE when server.conf does not set it (cvmfs_server mkfs's default).
DEFAULT_MIN_CHUNK = 4 * 1024 * 1024

#: Small files are encoded in memory and stored in groups of at most this many objects or
#: bytes: one journal commit per group, not per object.
_GROUP_OBJECTS = 512
_IN_MEMORY_LIMIT = 4 * 1024 * 1024
#: Files from this size are read and compressed in the worker threads.
_PARALLEL_FROM = 64 * 1024
_GROUP_BYTES = 64 * 1024 * 1024


def graft_options(layout: RepositoryLayout) -> GraftOptions:
    """Return graft options matching the repository's compression, hash and chunking.

    Raise GraftError for settings the engine cannot produce.
    """
    compression = layout.settings.get("CVMFS_COMPRESSION_ALGORITHM", "default") or "default"
    if compression in ("default", "zlib"):
        compression = "zlib"
    elif compression != "none":
        raise GraftError(f"{layout.name}: unsupported CVMFS_COMPRESSION_ALGORITHM={compression}")
    algorithm = layout.settings.get("CVMFS_HASH_ALGORITHM", "sha1") or "sha1"
    chunk = 0
    if layout.flag("CVMFS_USE_FILE_CHUNKING", default=True):
        raw = layout.settings.get("CVMFS_MAX_CHUNK_SIZE", "")
        chunk = int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_GRAFT_CHUNK
    return GraftOptions(compression=compression, chunk_size=chunk, algorithm=algorithm)


def small_file_limit(layout: RepositoryLayout) -> int | None:
    """Files below this size are one object when ``publish`` stores them (None: any size).

    ``publish`` cuts files of ``CVMFS_MIN_CHUNK_SIZE`` and more into content-defined
    chunks; below it a file is one zlib stream, exactly what a graft of it stores.
    """
    if not layout.flag("CVMFS_USE_FILE_CHUNKING", default=True):
        return None
    raw = layout.settings.get("CVMFS_MIN_CHUNK_SIZE", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MIN_CHUNK


def unsupported(layout: RepositoryLayout) -> str:
    """Return why this host cannot write the repository's objects itself ("" if it can).

    Then every file goes through the transaction as a copy.
    """
    if layout.gateway_url is not None:
        return (
            "a gateway publisher: objects reach the storage through the gateway, and neither "
            "grafts nor objects written beside it are recorded there"
        )
    try:
        graft_options(layout)
    except GraftError as exc:
        return str(exc)
    if layout.flag("CVMFS_INCLUDE_XATTRS"):
        return "CVMFS_INCLUDE_XATTRS=true: a graft cannot carry extended attributes"
    if layout.storage_type not in ("local", "S3"):
        return f"storage {layout.storage_type!r} is not writable from this host"
    from cvmfs_syncd.pipeline.identity import zlib_matches_cvmfs

    ok, why = zlib_matches_cvmfs()
    if not ok and graft_options(layout).compression == "zlib":
        return f"Python's zlib does not produce CernVM-FS's objects: {why}"
    return ""


def marker_path(repo_path: str) -> str:
    """Return the repository path of the ``.cvmfsgraft-`` file of ``repo_path``."""
    parts = split_repo_path(repo_path)
    return "/".join([*parts[:-1], GRAFT_PREFIX + parts[-1]])


def gc_mark(layout: RepositoryLayout) -> str:
    """Return ``last_gc`` of the repository's ``.cvmfs_status.json`` ("" if none)."""
    try:
        data = json.loads(layout.read_storage_file(".cvmfs_status.json") or b"{}")
    except (RepositoryConfigError, ValueError):
        return ""
    return str(data.get("last_gc", "")) if isinstance(data, dict) else ""


class Content(Protocol):
    """An opened input: its bytes, and whether it is still the version that was planned."""

    mode: int
    mtime_ns: int

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes (all when negative)."""

    def unchanged(self, size: int) -> bool:
        """Return True if the input is still the planned version after ``size`` bytes."""

    def close(self) -> None:
        """Release the input."""


#: Opens the content of one op's input, or says why it cannot be (changed, gone, refused).
Opener = Callable[[Op], "Content | Applied"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A file whose objects are stored: what its marker and placeholder get."""

    op: Op
    graft: str
    objects: tuple[str, ...]
    mode: int
    mtime_ns: int


@dataclass
class PrepareResult:
    """What preparing a batch did."""

    prepared: dict[str, Prepared] = field(default_factory=dict)
    #: ops that could not be prepared, with why (changed and vanished go back to pending)
    failed: list[tuple[Op, Applied]] = field(default_factory=list)
    #: ops whose objects this host could not store: they are copied instead
    fallback: list[Op] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    reused: set[str] = field(default_factory=set)
    #: inputs that failed with an error (not a change): the lane backs off on repeats
    errors: int = 0
    gc_mark: str = ""
    bytes: int = 0
    seconds: float = 0.0


class _JournalFirstSink(RecordingSink):
    """A recording sink that journals each object's name before it writes the object.

    A crash at any point then leaves a record of every object that may exist; a name that
    turns out to be stored already is taken off the record (it is never ours to delete).
    """

    def __init__(self, store: ObjectStore, state: State | None, batch_id: int) -> None:
        super().__init__(store)
        self._state = state
        self._batch_id = batch_id

    def journal(self, names: Sequence[str]) -> None:
        """Record names about to be written."""
        if self._state is not None and names:
            self._state.record_created_objects(self._batch_id, names)

    def unjournal(self, names: Sequence[str]) -> None:
        """Take names off the record (they existed already)."""
        if self._state is not None and names:
            self._state.forget_objects(self._batch_id, names)

    def put(self, name: str, data: bytes) -> None:
        """Journal, store and verify one object (see :meth:`RecordingSink.put`)."""
        if self.store.exists(name):
            super().put(name, data)
            return
        self.journal([name])
        super().put(name, data)
        if name not in self.created:
            self.unjournal([name])

    def open_writer(self) -> RecordingWriter:
        """Start a large object; its name is journalled when it is known, before commit."""
        return _JournalFirstWriter(self, self.store.open_writer())


class _JournalFirstWriter(RecordingWriter):
    def __init__(self, sink: _JournalFirstSink, inner: StoredObjectWriter) -> None:
        super().__init__(sink, inner)
        self._journal_sink = sink
        self._inner_writer = inner

    def commit(self, name: str) -> None:
        sink = self._journal_sink
        sink.journal([name])
        created = self._inner_writer.commit(name)
        if not created:
            sink.unjournal([name])
        sink.record(name, created)


@dataclass(frozen=True, slots=True)
class _Encoded:
    op: Op
    checksum: str
    stored: bytes
    size: int
    mode: int
    mtime_ns: int


class Preparer:
    """Writes the data objects of one repository's batches (local directory or S3 bucket)."""

    def __init__(
        self,
        layout: RepositoryLayout,
        *,
        state: State | None = None,
        workers: int = 2,
        store: ObjectStore | None = None,
    ) -> None:
        self.layout = layout
        self.state = state
        self.workers = max(1, workers)
        self.problem = unsupported(layout)
        self.options = graft_options(layout) if not self.problem else GraftOptions()
        self.small_limit = small_file_limit(layout)
        self._store = store
        self._lock = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        """The repository's object store, opened on first use (raises StorageError)."""
        with self._lock:
            if self._store is None:
                self._store = open_storage(
                    self.layout.upstream_storage, self.layout.name, durable=False
                )
            return self._store

    def is_small(self, size: int) -> bool:
        """True if a file of ``size`` bytes is one object when ``publish`` stores it."""
        return self.small_limit is None or size < self.small_limit

    def close(self) -> None:
        """Close the object store's connections."""
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    # -- preparing a batch ----------------------------------------------------------------

    def prepare(
        self,
        batch_id: int,
        ops: Sequence[Op],
        opener: Opener,
        *,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> PrepareResult:
        """Store the objects of every op (all GRAFT ops); return what was prepared."""
        started = time.monotonic()
        result = PrepareResult(gc_mark=gc_mark(self.layout))
        if not ops:
            return result
        try:
            store = self.store
        except StorageError as exc:
            log.warning("storage not writable from this host; copying", error=str(exc))
            result.fallback = list(ops)
            return result
        sink = _JournalFirstSink(store, self.state, batch_id)
        small = [o for o in ops if o.fingerprint is not None and self._in_memory(o)]
        large = [o for o in ops if o.fingerprint is not None and not self._in_memory(o)]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="prepare") as pool:
            group: list[_Encoded] = []
            group_bytes = 0
            for encoded in self._encode_all(pool, small, opener, result):
                heartbeat()
                group.append(encoded)
                group_bytes += len(encoded.stored)
                if len(group) >= _GROUP_OBJECTS or group_bytes >= _GROUP_BYTES:
                    self._store_group(pool, sink, group, result)
                    group, group_bytes = [], 0
            if group:
                self._store_group(pool, sink, group, result)
        for op in large:
            heartbeat()
            self._graft_large(op, opener, sink, result)
        try:
            store.flush()
        except OSError as exc:
            raise StorageError(f"flushing {store.description} failed: {exc}") from exc
        result.created = list(sink.created)
        result.reused = set(sink.reused)
        result.seconds = time.monotonic() - started
        return result

    def _in_memory(self, op: Op) -> bool:
        """Small files are read whole and stored in groups; the rest is streamed."""
        size = op.fingerprint.size if op.fingerprint is not None else 0
        return self.is_small(size) and size < _IN_MEMORY_LIMIT

    def _encode_all(
        self, pool: ThreadPoolExecutor, ops: Sequence[Op], opener: Opener, result: PrepareResult
    ) -> Iterator[_Encoded]:
        """Read and encode small files: larger ones in the pool, a bounded window ahead,
        the smallest inline (for a few KiB, handing work to a thread costs more than the
        work, and threads doing system calls under the GIL slow each other down)."""
        window = max(self.workers * 4, 16)
        in_flight: deque[tuple[Op, Future[_Encoded | Applied]]] = deque()
        for op in ops:
            size = op.fingerprint.size if op.fingerprint is not None else 0
            if self.workers > 1 and size >= _PARALLEL_FROM:
                in_flight.append((op, pool.submit(self._encode, op, opener)))
                if len(in_flight) < window:
                    continue
                done, future = in_flight.popleft()
                outcome = self._outcome(done, future.result, result)
            else:
                outcome = self._outcome(op, functools.partial(self._encode, op, opener), result)
            if outcome is not None:
                yield outcome
        while in_flight:
            op, future = in_flight.popleft()
            outcome = self._outcome(op, future.result, result)
            if outcome is not None:
                yield outcome

    def _outcome(
        self, op: Op, run: Callable[[], _Encoded | Applied], result: PrepareResult
    ) -> _Encoded | None:
        try:
            outcome = run()
        except UnsafeName as exc:
            outcome = Applied(ApplyOutcome.REFUSED, f"unsafe name: {exc}")
        except Exception as exc:
            # One input must not take the lane down: it goes back to pending.
            if not isinstance(exc, OSError | StorageError | GraftError):
                log.exception("preparing an input failed unexpectedly", path=op.repo_path)
            result.errors += 1
            outcome = Applied(ApplyOutcome.CHANGED, str(exc))
        if isinstance(outcome, Applied):
            result.failed.append((op, outcome))
            return None
        return outcome

    def _encode(self, op: Op, opener: Opener) -> _Encoded | Applied:
        fp = op.fingerprint
        assert fp is not None  # noqa: S101 (filtered by the caller)
        opened = opener(op)
        if isinstance(opened, Applied):
            return opened
        try:
            data = _read_all(opened, fp.size + 1)
            if len(data) != fp.size or not opened.unchanged(len(data)):
                return Applied(ApplyOutcome.CHANGED, "changed while being prepared")
            mode, mtime_ns = opened.mode, opened.mtime_ns
        finally:
            opened.close()
        checksum, stored = encode_object(data, self.options)
        return _Encoded(op, checksum, stored, len(data), mode, mtime_ns)

    def _store_group(
        self,
        pool: ThreadPoolExecutor,
        sink: _JournalFirstSink,
        group: Sequence[_Encoded],
        result: PrepareResult,
    ) -> None:
        """Journal the group's new names in one commit, then store and verify each."""
        unique: dict[str, bytes] = {}
        for encoded in group:
            unique.setdefault(object_name(encoded.checksum), encoded.stored)
        # A local file system is fastest from one thread; a remote store (S3) waits on the
        # network, so its requests go out in parallel.
        each = map if isinstance(sink.store, LocalObjectStore) else pool.map
        present = set(each(lambda n: n if sink.store.exists(n) else "", unique))
        new = [name for name in unique if name not in present]
        sink.journal(new)
        try:
            list(each(lambda item: RecordingSink.put(sink, *item), unique.items()))
        except StorageError as exc:
            log.warning("storing prepared objects failed; copying instead", error=str(exc))
            result.fallback += [e.op for e in group]
            return
        finally:
            created = set(sink.created)
            sink.unjournal([name for name in new if name not in created])
        for encoded in group:
            name = object_name(encoded.checksum)
            graft = f"size={encoded.size}\nchecksum={encoded.checksum}\n"
            graft += f"compression={self.options.compression}\n"
            result.prepared[encoded.op.repo_path] = Prepared(
                encoded.op, graft, (name,), encoded.mode, encoded.mtime_ns
            )
            result.bytes += encoded.size

    def _graft_large(
        self, op: Op, opener: Opener, sink: _JournalFirstSink, result: PrepareResult
    ) -> None:
        fp = op.fingerprint
        assert fp is not None  # noqa: S101 (filtered by the caller)
        try:
            opened = opener(op)
        except UnsafeName as exc:
            result.failed.append((op, Applied(ApplyOutcome.REFUSED, f"unsafe name: {exc}")))
            return
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("preparing an input failed unexpectedly", path=op.repo_path)
            result.errors += 1
            result.failed.append((op, Applied(ApplyOutcome.CHANGED, str(exc))))
            return
        if isinstance(opened, Applied):
            result.failed.append((op, opened))
            return
        before = set(sink.created)
        # Below the minimum chunk size ``publish`` stores one object: so does the graft.
        options = replace(self.options, chunk_size=0) if self.is_small(fp.size) else self.options
        try:
            graft = graft_stream(cast("BinaryIO", opened), options, sink, workers=self.workers)
            unchanged = graft.size == fp.size and opened.unchanged(graft.size)
            mode, mtime_ns = opened.mode, opened.mtime_ns
        except StorageError as exc:
            self.delete_objects([n for n in sink.created if n not in before])
            log.warning("storing a graft failed; copying", path=op.repo_path, error=str(exc))
            result.fallback.append(op)
            return
        except (GraftError, OSError) as exc:
            self.delete_objects([n for n in sink.created if n not in before])
            result.errors += 1
            result.failed.append((op, Applied(ApplyOutcome.CHANGED, str(exc))))
            return
        finally:
            opened.close()
        if not unchanged:
            self.delete_objects([n for n in sink.created if n not in before])
            result.failed.append((op, Applied(ApplyOutcome.CHANGED, "changed while grafting")))
            return
        result.prepared[op.repo_path] = Prepared(
            op, graft.text(), graft.object_names(), mode, mtime_ns
        )
        result.bytes += graft.size
        log.debug("grafted", path=op.repo_path, size=graft.size, chunks=len(graft.chunks))

    # -- once the transaction is open ---------------------------------------------------------

    def missing(self, result: PrepareResult) -> list[str]:
        """Return the repository paths whose objects are gone since they were prepared.

        Only a gc can remove them (and gc needs the transaction, which is ours now): when
        ``last_gc`` did not move, nothing is checked, so an S3 repository pays no HEAD per
        object; when it moved, every prepared object is checked.
        """
        if gc_mark(self.layout) == result.gc_mark:
            return []
        store = self.store
        gone: list[str] = []
        for path, prepared in result.prepared.items():
            if not all(store.exists(name) for name in prepared.objects):
                gone.append(path)
        if gone:
            log.warning("objects vanished since they were prepared (gc ran)", files=len(gone))
        return gone

    def settings_changed(self, layout: RepositoryLayout) -> bool:
        """True if hash, compression or chunking in server.conf differ from preparation's."""
        try:
            return graft_options(layout) != self.options
        except GraftError:
            return True

    def delete_objects(self, names: Iterable[str]) -> None:
        """Delete data objects a batch created and no publish used."""
        names = list(names)
        for name in names:
            try:
                self.store.delete(name)
            except StorageError as exc:
                log.error("could not delete an abandoned object", name=name, error=str(exc))
        if names:
            log.info("deleted objects of an abandoned batch", count=len(names))


def _read_all(content: Content, limit: int) -> bytes:
    pieces: list[bytes] = []
    total = 0
    while total < limit:
        piece = content.read(limit - total)
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)
