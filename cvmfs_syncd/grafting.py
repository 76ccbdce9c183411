"""Publishing large staged files as grafts: stream once, write the data objects, then place
the empty placeholder and its ``.cvmfsgraft-<name>`` file inside the open transaction.

``publish`` never checks a graft's objects (a missing object publishes fine and then gives
clients EIO), so every object is written and verified *before* the graft enters the
transaction, and the objects a batch created are journalled so that an abandoned batch
deletes exactly those.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

from cvmfs_syncd import fsops
from cvmfs_syncd.cvmfs.graft import GraftOptions, graft_stream
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.storage import ObjectStore, RecordingSink, open_storage
from cvmfs_syncd.errors import GraftError, StorageError
from cvmfs_syncd.model import Op
from cvmfs_syncd.paths import split_repo_path
from cvmfs_syncd.planner import Applied, ApplyOutcome
from cvmfs_syncd.state import State

log = structlog.get_logger(__name__)

#: Graft chunk size when the repository does not say (the swissknife default).
DEFAULT_GRAFT_CHUNK = 24 * 1024 * 1024
GRAFT_PREFIX = ".cvmfsgraft-"


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


def marker_path(repo_path: str) -> str:
    """Return the repository path of the ``.cvmfsgraft-`` file of ``repo_path``."""
    parts = split_repo_path(repo_path)
    return "/".join([*parts[:-1], GRAFT_PREFIX + parts[-1]])


class JournalingSink(RecordingSink):
    """A recording sink that also journals each object it creates, at once.

    The lane journals a batch's objects when an op returns; journalling them as they are
    written means a crash in the middle of a large graft still leaves the record the
    recovery needs to delete them.
    """

    def __init__(self, store: ObjectStore, state: State, batch_id: int) -> None:
        super().__init__(store)
        self._state = state
        self._batch_id = batch_id

    def record(self, name: str, created: bool) -> None:
        """Journal ``name`` if it was created, then verify and record it."""
        if created:
            self._state.record_created_objects(self._batch_id, [name])
        super().record(name, created)


class RepositoryGrafter:
    """Grafts staged files into one repository's storage (local directory or S3 bucket)."""

    def __init__(
        self, layout: RepositoryLayout, *, state: State | None = None, workers: int = 2
    ) -> None:
        self.layout = layout
        self.state = state
        self.options = graft_options(layout)
        self.workers = workers
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        """The repository's object store, opened on first use."""
        with self._lock:
            if self._store is None:
                self._store = open_storage(self.layout.upstream_storage, self.layout.name)
            return self._store

    def graft_staged(
        self,
        root: Path,
        op: Op,
        union_dir: Path,
        batch_id: int,
    ) -> Applied:
        """Stream one staged file into the storage, then place its graft in the transaction."""
        fp = op.fingerprint
        if fp is None:
            return Applied(ApplyOutcome.REFUSED, "no fingerprint")
        opened = fsops.open_staged(root, op.source_path, fp)
        if isinstance(opened, fsops.CopyOutcome):
            return _outcome(opened)
        sink = (
            RecordingSink(self.store)
            if self.state is None
            else JournalingSink(self.store, self.state, batch_id)
        )
        try:
            with os.fdopen(opened, "rb", closefd=True) as stream:
                result = graft_stream(stream, self.options, sink, workers=self.workers)
                unchanged = fsops.still_matches(stream.fileno(), fp)
        except (StorageError, GraftError, OSError) as exc:
            self.delete_objects(sink.created)
            log.warning("grafting failed; re-queued", path=op.source_path, error=str(exc))
            return Applied(ApplyOutcome.CHANGED, str(exc))
        if not unchanged or result.size != fp.size:
            self.delete_objects(sink.created)
            return Applied(ApplyOutcome.CHANGED, "changed while grafting")
        fsops.write_file(union_dir, marker_path(op.repo_path), result.text().encode(), mode=0o644)
        fsops.write_file(union_dir, op.repo_path, b"", mode=fp.mode & 0o777, mtime_ns=fp.mtime_ns)
        log.info(
            "grafted",
            path=op.repo_path,
            size=result.size,
            chunks=len(result.chunks),
            created=len(sink.created),
            reused=len(sink.reused),
        )
        return Applied(ApplyOutcome.APPLIED, created_objects=sink.created)

    def delete_objects(self, names: Sequence[str]) -> None:
        """Delete data objects a batch created and no publish used."""
        for name in names:
            try:
                self.store.delete(name)
            except StorageError as exc:
                log.error("could not delete an abandoned object", name=name, error=str(exc))
        if names:
            log.info("deleted objects of an abandoned batch", count=len(names))


def _outcome(outcome: fsops.CopyOutcome) -> Applied:
    if outcome is fsops.CopyOutcome.UNREADABLE:
        return Applied(ApplyOutcome.REFUSED, "unreadable")
    if outcome is fsops.CopyOutcome.VANISHED:
        return Applied(ApplyOutcome.VANISHED)
    return Applied(ApplyOutcome.CHANGED)
