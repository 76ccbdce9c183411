"""Staging directories: inotify hints plus a reconciliation scan, planned into ops.

Watch events are only hints: at batch time every pending path is read again from the
staging directory (never following a symlink) and compared with the index of what is
live. A periodic full scan (the healer) catches what the watcher missed: watchdog drops
kernel queue overflows silently.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import cast

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

from cvmfs_syncd import fsops
from cvmfs_syncd.batching import Pending, Settler
from cvmfs_syncd.config import StagingConfig
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint, Op, OpKind, SetAside
from cvmfs_syncd.paths import is_ignored, repo_path, reserved_name
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy, count_deleted, file_op_kind
from cvmfs_syncd.pipeline.prepare import Content
from cvmfs_syncd.planner import Applied, ApplyOutcome, Plan, deletion_guard
from cvmfs_syncd.state import PublishedEntry, State

log = structlog.get_logger(__name__)

#: Permission bits that are never published: setuid and setgid.
_STRIPPED_BITS = stat.S_ISUID | stat.S_ISGID

#: Event types that say nothing changed (our own reads of a file cause them too).
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})

#: The events the kernel is asked for. Leaving out open/close-without-write keeps the
#: daemon's own reads of staged files (thousands per batch) off the inotify queue.
_WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into hints; never raises (a raising handler kills the thread)."""

    def __init__(self, source: StagingInput) -> None:
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.source.on_event(event)
        except Exception:
            log.exception("handling a watch event failed", source=self.source.name)


class StagingInput:
    """One ``[[repository.staging]]`` source of a repository."""

    def __init__(
        self,
        repo: str,
        config: StagingConfig,
        state: State,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        content: ContentPolicy = COPY_ONLY,
    ) -> None:
        self.repo = repo
        self.config = config
        self.root = config.path
        self.name = config.name
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self.content = content
        self.settler = Settler()
        self._submit: Callable[[Dirty], None] | None = None
        self._observer: InotifyObserver | None = None
        self._watch_error = ""
        self._reported: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- watching ------------------------------------------------------------------------

    def start(self, submit: Callable[[Dirty], None]) -> None:
        """Start the inotify observer (if the staging path exists)."""
        self._submit = submit
        self._start_observer()

    def _start_observer(self) -> None:
        with self._lock:
            if self._observer is not None:
                return
            if not self.root.is_dir():
                self._set_up(False, f"staging path {self.root} does not exist")
                return
            observer = InotifyObserver()
            try:
                observer.schedule(
                    _Handler(self),
                    os.fspath(self.root),
                    recursive=True,
                    event_filter=_WATCHED_EVENTS,
                )
                observer.start()
            except OSError as exc:
                # ENOSPC here means the inotify watch limit (fs.inotify.max_user_watches).
                self._set_up(False, f"cannot watch {self.root}: {exc}; relying on rescans")
                log.error("watching failed", source=self.name, error=str(exc))
                return
            self._observer = observer
            self._set_up(True, "")

    def _set_up(self, up: bool, why: str) -> None:
        self._watch_error = why
        self.metrics.source_up.labels(self.repo, self.name).set(1 if up else 0)

    def stop(self) -> None:
        """Stop the observer."""
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=10)

    def alive(self) -> bool:
        """Return False if the inotify observer thread died (a watched path that is missing
        is down, not dead: rescans go on)."""
        observer = self._observer
        return observer is None or observer.is_alive()

    def health(self) -> tuple[bool, str]:
        """Return (up, detail): down when the path is missing or the watcher died."""
        observer = self._observer
        if observer is not None and not observer.is_alive():
            return False, f"watcher of {self.root} died"
        return (not self._watch_error, self._watch_error)

    def on_event(self, event: FileSystemEvent) -> None:
        """Map a watchdog event onto hints for the lane."""
        if event.event_type in _QUIET_EVENTS or self._submit is None:
            return
        now = self.clock()
        moved = event.event_type == "moved"
        paths = [(os.fsdecode(event.src_path), moved)]
        if moved and event.dest_path:
            paths.append((os.fsdecode(event.dest_path), True))
        for path, was_moved in paths:
            rel = self._relative(path)
            if rel is None:
                continue
            self._reported.pop(rel, None)
            closed = was_moved or event.event_type in ("closed", "deleted")
            rescan = event.is_directory and event.event_type in ("moved", "created", "deleted")
            self._submit(Dirty(self.name, rel, now, closed=closed, rescan=rescan))

    def _relative(self, path: str) -> str | None:
        root = os.fspath(self.root)
        if path == root:
            return ""
        if not path.startswith(root.rstrip("/") + "/"):
            return None
        return path[len(root.rstrip("/")) + 1 :]

    # -- reconciliation --------------------------------------------------------------------

    def reconcile(self, now: float) -> list[Dirty]:
        """Compare the staging tree with the index; return a hint for each difference.

        A merge of two streams in bytewise path order, the tree
        (:func:`fsops.scan_staging_runs`) and this source's rows of the index
        (:meth:`State.scan_pages`), so that memory does not grow with the number of live
        entries. Both come as compact records (path and key): a run of entries that are
        live already is settled by comparing its records with the next bytes of the
        index, at a cost of one lstat and a little formatting per entry. Where they differ,
        the run is merged an entry at a time. The hints are those of comparing every
        staged entry with its index row (new, changed or not yet reported entries), then,
        in mirror mode, one for each live path no longer staged. A scan that fails part
        way returns no hints at all: a partial tree must never look like deletions.
        """
        if self._submit is not None:
            self._start_observer()  # the path may have appeared since start()
        target = self._target_repo_path()
        mirror = self.config.mode == "mirror"
        pages = _read_ahead(self.state.scan_pages(self.repo, self.name, target))
        try:
            return self._merge(_IndexRecords(pages), mirror, target, now)
        finally:
            pages.close()  # stops the reader if the scan ended early

    def _merge(self, index: _IndexRecords, mirror: bool, target: str, now: float) -> list[Dirty]:
        if not self.root.is_dir():
            if not mirror:
                return []
            return [
                Dirty(self.name, os.fsdecode(p), now, from_scan=True) for p in index.rest() if p
            ]
        hints: list[Dirty] = []
        gone: list[Dirty] | None = [] if mirror else None
        try:
            for records, found in fsops.scan_staging_runs(self.root):
                if not index.settles(records):
                    self._merge_run(records, found, index, hints, gone, target, now)
            for path in index.rest():
                if gone is not None and path:
                    gone.append(Dirty(self.name, os.fsdecode(path), now, from_scan=True))
        except OSError as exc:
            log.warning("reconciliation scan failed", source=self.name, error=str(exc))
            return []
        return hints + (gone or [])

    def _merge_run(
        self,
        records: bytes,
        found: dict[bytes, fsops.ScanFound],
        index: _IndexRecords,
        hints: list[Dirty],
        gone: list[Dirty] | None,
        target: str,
        now: float,
    ) -> None:
        """Merge a run of the tree with the index an entry at a time (it differs somewhere)."""
        fields = records.split(b"\0")
        for i in range(0, len(fields) - 1, 2):
            rel_b, key = fields[i], fields[i + 1]
            head = index.head()
            while head is not None and head < rel_b:
                if gone is not None and head:
                    gone.append(Dirty(self.name, os.fsdecode(head), now, from_scan=True))
                index.pop(head)
                head = index.head()
            live_key = index.pop(rel_b) if head == rel_b else None
            if key and key == live_key:
                continue  # no other rule can add a hint for what is live
            live = None
            if live_key is not None:
                live = self.state.scan_entry(self.repo, self.name, rel_b, target)
            entry = found.get(rel_b)
            if entry is None:
                fingerprint: Fingerprint | fsops.Skipped = fsops.file_fingerprint(key)
            elif isinstance(entry, os.stat_result):
                fingerprint = fsops.fingerprint_of(entry)
            else:
                fingerprint = entry
            rel = os.fsdecode(rel_b)
            if self._differs(rel, fingerprint, live):
                hints.append(Dirty(self.name, rel, now, from_scan=True))

    def _differs(
        self, rel: str, found: Fingerprint | fsops.Skipped, live: PublishedEntry | None
    ) -> bool:
        """Return True if a scanned entry needs planning (new, changed, not yet reported)."""
        if is_ignored(rel.rsplit("/", 1)[-1], self.config.ignore):
            return False
        marker = self.config.ready_marker
        if marker and rel.count("/") == 1 and rel.endswith("/" + marker):
            return False  # the marker itself is never published
        if rel in self._reported:
            return False  # refused or skipped already; a watch event brings it back
        if not isinstance(found, Fingerprint):
            return True
        if live is not None and _same(found, live.fingerprint):
            return False
        aside = self.state.set_aside_entry(self.repo, self.name, rel)
        return not (aside is not None and aside[1] is not None and _same(found, aside[1]))

    def _stat(self, rel: str) -> Fingerprint | fsops.Skipped | None:
        try:
            return fsops.stat_entry(self.root, rel)
        except (FileNotFoundError, NotADirectoryError):
            return None  # the staging root itself is gone

    def _target_repo_path(self) -> str:
        return repo_path(self.config.target, "")

    # -- planning --------------------------------------------------------------------------

    def _expand(self, entries: Sequence[Pending]) -> list[Pending]:
        """Replace subtree rescans by one entry per path found below (and live below)."""
        result: dict[str, Pending] = {}
        for entry in entries:
            result.setdefault(entry.rel_path, entry)
            if not entry.rescan:
                continue
            base = self.root / entry.rel_path if entry.rel_path else self.root
            if base.is_dir() and not base.is_symlink():
                try:
                    for rel, _ in fsops.walk_staging(self.root, subdir=entry.rel_path):
                        result.setdefault(rel, _child(entry, rel))
                except OSError as exc:
                    log.warning(
                        "rescanning failed", source=self.name, path=entry.rel_path, error=str(exc)
                    )
            if self.config.mode == "mirror":
                try:
                    below = repo_path(self.config.target, entry.rel_path)
                except ValueError:
                    continue
                for live in self.state.published_under(self.repo, below, self.name):
                    result.setdefault(live.source_path, _child(entry, live.source_path))
        return list(result.values())

    def _root_problem(self) -> str:
        if not self.root.is_dir():
            return f"staging path {self.root} is missing"
        if os.path.ismount(self.root) and not any(os.scandir(self.root)):
            return f"staging path {self.root} is an empty mount point"
        return ""

    def plan(self, entries: Sequence[Pending], now: float) -> Plan:
        """Turn pending paths into ops; defer unsettled files, hold marker-less directories."""
        plan = Plan()
        marker = self.config.ready_marker
        groups: dict[str, list[str]] = {}
        deleted: list[list[str]] = []
        for entry in self._expand(entries):
            rel = entry.rel_path
            if rel == "":
                continue  # the target directory itself exists in the repository already
            name = rel.rsplit("/", 1)[-1]
            if is_ignored(name, self.config.ignore):
                continue
            try:
                rp = repo_path(self.config.target, rel)
            except ValueError as exc:
                self._refuse(plan, entry, f"unsafe name: {exc}")
                continue
            refused = None if self.config.allow_reserved_names else _reserved_in(rel)
            if refused:
                self._refuse(plan, entry, refused)
                continue
            top, _, inner = rel.partition("/")
            if marker and (inner or (self.root / top).is_dir()):
                if name == marker and inner == marker:
                    continue  # the marker itself is never published
                if not (self.root / top / marker).exists():
                    plan.waiting_for_marker.append(entry)
                    continue
            found = self._stat(rel)
            live = self.state.published_entry(self.repo, rp)
            if found is None:
                if self.config.mode == "mirror" and live is not None and live.source == self.name:
                    below = self.state.published_under(self.repo, rp, self.name)
                    deleted.append([e.path for e in below])
                    self._add(plan, entry, Op(OpKind.DELETE, rp, self.name, rel))
                self.settler.forget(entry.key)
                continue
            if isinstance(found, fsops.Skipped):
                self._skip(plan, rel, found.reason)
                continue
            aside = self.state.set_aside_entry(self.repo, self.name, rel)
            if aside is not None:
                if aside[1] is not None and _same(found, aside[1]):
                    continue
                self.state.clear_set_aside(self.repo, self.name, rel)
            if live is not None and live.source == self.name and _same(found, live.fingerprint):
                self.settler.forget(entry.key)
                continue
            if found.type is EntryType.FILE:
                ready_at = self.settler.observe(entry.key, found, now, self.config.settle_seconds)
                if ready_at:
                    plan.deferred.append(entry.deferred_until(ready_at))
                    continue
                if not self._writer_gone(entry, found, now):
                    plan.deferred.append(entry.deferred_until(now + self.config.settle_seconds))
                    continue
                kind = file_op_kind(
                    name,
                    found.size,
                    self.content,
                    prepare=self.config.prepare,
                    graft_at=self.config.graft_threshold,
                )
            elif found.type is EntryType.DIRECTORY:
                kind = OpKind.MAKE_DIR
            else:
                kind = OpKind.MAKE_SYMLINK
            self._add(plan, entry, Op(kind, rp, self.name, rel, found))
            if marker and inner:
                groups.setdefault(top, []).append(rp)
        if marker:
            # A ready-marker directory goes live whole: if any of its files must wait
            # (settling, still written), the whole directory waits with it.
            waiting = {e.rel_path.partition("/")[0] for e in plan.deferred if "/" in e.rel_path}
            for top in waiting & set(groups):
                held = set(groups.pop(top))
                plan.deferred += [
                    plan.origin.pop(o.repo_path).deferred_until(now + self.config.settle_seconds)
                    for o in plan.ops
                    if o.repo_path in held
                ]
                plan.ops = [o for o in plan.ops if o.repo_path not in held]
        plan.atomic_groups = [paths for paths in groups.values() if paths]
        deletes = count_deleted(deleted)
        if self.config.mode == "mirror" and deletes:
            why = self._root_problem() or deletion_guard(
                deletes,
                self.state.count_published(self.repo, self.name),
                self.config.max_delete_share,
            )
            if why:
                plan.guarded = [o for o in plan.ops if o.kind is OpKind.DELETE]
                plan.ops = [o for o in plan.ops if o.kind is not OpKind.DELETE]
                plan.guard_reason = why
        return plan

    def _writer_gone(self, entry: Pending, found: Fingerprint, now: float) -> bool:
        """Return True if no process has the settled file open for writing.

        Asked of the kernel for every file, whatever the hint said: a writer that pauses
        longer than settle_seconds must not get a half-written file published, and a scan
        (after a restart, or when a watch event was lost) cannot tell. Where the kernel
        cannot say (no lease support), a file seen modified without a close waits for a
        long quiet time; one with no such sign is taken once settled."""
        writers = fsops.has_writers(self.root, entry.rel_path, found)
        if writers is not None:
            return not writers
        if not entry.writing:
            return True
        return now - entry.last_at >= max(60.0, 10 * self.config.settle_seconds)

    def _add(self, plan: Plan, entry: Pending, op: Op) -> None:
        plan.ops.append(op)
        plan.origin[op.repo_path] = entry

    def _refuse(self, plan: Plan, entry: Pending, reason: str) -> None:
        if self._reported.get(entry.rel_path) == reason:
            return
        self._reported[entry.rel_path] = reason
        plan.set_aside.append(SetAside(self.name, entry.rel_path, reason))

    def _skip(self, plan: Plan, rel: str, reason: str) -> None:
        if self._reported.get(rel) == reason:
            return
        self._reported[rel] = reason
        plan.skipped.append((reason, rel))

    # -- applying --------------------------------------------------------------------------

    def apply(self, op: Op, union_dir: Path) -> Applied:
        """Carry out one op under the union directory of the open transaction."""
        fp = op.fingerprint
        if op.kind is OpKind.DELETE:
            fsops.delete(union_dir, op.repo_path)
            return Applied(ApplyOutcome.APPLIED)
        if fp is None:
            return Applied(ApplyOutcome.REFUSED, "no fingerprint")
        if op.kind is OpKind.MAKE_DIR:
            fsops.make_dir(
                union_dir, op.repo_path, fp.mode & 0o7777 & ~_STRIPPED_BITS, replace=True
            )
            return Applied(ApplyOutcome.APPLIED)
        if op.kind is OpKind.MAKE_SYMLINK:
            fsops.make_symlink(union_dir, op.repo_path, fp.target, replace=True)
            return Applied(ApplyOutcome.APPLIED)
        # A GRAFT op reaches here only when its objects could not be prepared: copy it.
        outcome = fsops.copy_file(
            union_dir, op.repo_path, self.root, op.source_path, fp, replace=True
        )
        return _applied(outcome)

    def published(self, ops: Sequence[Op]) -> None:
        """After a publish: forget settled state; in inbox mode remove the published inputs."""
        tops: set[str] = set()
        for op in ops:
            self.settler.forget((self.name, op.source_path))
            self._reported.pop(op.source_path, None)
            if self.config.mode != "inbox" or op.fingerprint is None:
                continue
            removable = op.kind in (OpKind.COPY_FILE, OpKind.GRAFT, OpKind.MAKE_SYMLINK)
            if removable and fsops.remove_staged(self.root, op.source_path, op.fingerprint):
                tops.add(op.source_path.partition("/")[0])
        if self.config.mode == "inbox" and self.config.ready_marker:
            for top in tops:
                fsops.remove_marker_if_alone(self.root, top, self.config.ready_marker)

    def open_content(self, op: Op) -> Content | Applied:
        """Open the staged file of ``op`` if it is still the planned version."""
        fp = op.fingerprint
        if fp is None or fp.type is not EntryType.FILE:
            return Applied(ApplyOutcome.REFUSED, "not a regular file")
        opened = fsops.open_staged(self.root, op.source_path, fp)
        if isinstance(opened, fsops.CopyOutcome):
            return _applied(opened)
        return _StagedContent(opened, fp)

    def still_current(self, op: Op) -> bool:
        """Return True if the staged entry of ``op`` is still the planned version.

        A plain ``lstat`` (no descriptor walk): it only compares, never reads, and a path
        redirected through a swapped parent cannot match the planned inode, size and mtime.
        """
        fp = op.fingerprint
        if fp is None or op.kind is not OpKind.GRAFT:
            return True
        try:
            st = os.lstat(os.path.join(self.root, op.source_path))
        except OSError:
            return False
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_ino == fp.inode
            and st.st_size == fp.size
            and st.st_mtime_ns == fp.mtime_ns
            and stat.S_IMODE(st.st_mode) == fp.mode
        )

    # -- queries ---------------------------------------------------------------------------

    def path_status(self, abs_path: Path) -> dict[str, object] | None:
        """Return whether a staged path is live with its current content, or None if the
        path is not inside this source."""
        rel = self._relative(os.path.normpath(os.fspath(abs_path)))
        if rel is None:
            return None
        try:
            rp = repo_path(self.config.target, rel)
        except ValueError as exc:
            return {"live": False, "reason": f"unsafe name: {exc}"}
        live = self.state.published_entry(self.repo, rp)
        found = self._stat(rel) if rel else None
        result: dict[str, object] = {"repository": self.repo, "path": "/" + rp, "source": self.name}
        aside = self.state.set_aside_entry(self.repo, self.name, rel)
        if aside is not None:
            result.update(live=False, reason=f"set aside: {aside[0]}")
            return result
        if isinstance(found, Fingerprint):
            ok = live is not None and _same(found, live.fingerprint)
            result["live"] = ok
            if not ok:
                result["reason"] = "pending" if live is None else "an older version is live"
        elif found is None:
            gone_ok = self.config.mode == "inbox" and live is not None
            result["live"] = gone_ok
            if not gone_ok:
                result["reason"] = "no such staged file"
        else:
            result.update(live=False, reason=f"not publishable ({found.reason})")
        if live is not None:
            result["revision"] = live.revision
            result["published_at"] = live.published_at
        return result


class _StagedContent:
    """A staged file opened for preparing: its bytes and whether it changed meanwhile."""

    def __init__(self, fd: int, expected: Fingerprint) -> None:
        self._file = os.fdopen(fd, "rb", closefd=True)
        self._expected = expected
        self.mode = expected.mode & 0o777
        self.mtime_ns = expected.mtime_ns

    def read(self, size: int = -1, /) -> bytes:
        return self._file.read(size)

    def unchanged(self, size: int) -> bool:
        return size == self._expected.size and fsops.still_matches(
            self._file.fileno(), self._expected
        )

    def close(self) -> None:
        self._file.close()


_DONE = object()


def _read_ahead(pages: Iterator[bytes], depth: int = 2) -> Generator[bytes, None, None]:
    """Yield ``pages``, read by a helper thread up to ``depth`` pages ahead.

    SQLite builds a page in one step with the GIL released, so the index is read while
    the tree is walked. An error reading comes out here; when the consumer stops early
    (an error walking the tree), the helper stops after the page it is reading.
    """
    pipe: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in pages:
                if stop.is_set():
                    break
                pipe.put(page)
        except BaseException as exc:  # handed to the consumer
            pipe.put(exc)
        finally:
            pipe.put(_DONE)

    helper = threading.Thread(target=read, name="scan-index", daemon=True)
    helper.start()
    done = False
    try:
        while (item := pipe.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield cast(bytes, item)
        done = True
    finally:
        if not done:
            stop.set()
            while pipe.get() is not _DONE:
                pass
        helper.join()


class _IndexRecords:
    """The index side of :meth:`StagingInput.reconcile`: the records of
    :meth:`State.scan_pages`, consumed a run or a row at a time."""

    def __init__(self, pages: Iterator[bytes]) -> None:
        self._pages = pages
        self._buffer = b""
        self._pos = 0

    def settles(self, records: bytes) -> bool:
        """Consume the next records and return True if they are exactly ``records``."""
        if self._buffer.startswith(records, self._pos):
            self._pos += len(records)
            return True
        if len(self._buffer) - self._pos >= len(records) or not self._read(len(records)):
            return False
        if self._buffer.startswith(records, self._pos):
            self._pos += len(records)
            return True
        return False

    def head(self) -> bytes | None:
        """Return the source path of the next row (None at the end)."""
        if self._pos == len(self._buffer) and not self._read(1):
            return None
        return self._buffer[self._pos : self._buffer.index(b"\0", self._pos)]

    def pop(self, path: bytes) -> bytes:
        """Consume the rows of the next source path, ``path`` (from :meth:`head`); return
        the key of the last one (the row :meth:`State.scan_published` keeps)."""
        while True:
            key_start = self._pos + len(path) + 1
            end = self._buffer.index(b"\0", key_start)
            key = self._buffer[key_start:end]
            self._pos = end + 1
            if self.head() != path:
                return key

    def rest(self) -> Iterator[bytes]:
        """Consume and yield the source paths of every row left."""
        while (path := self.head()) is not None:
            self.pop(path)
            yield path

    def _read(self, size: int) -> bool:
        """Read pages until ``size`` bytes are buffered; return False if none was left."""
        parts = [self._buffer[self._pos :]]
        have = len(parts[0])
        while have < size:
            page = next(self._pages, None)
            if page is None:
                break
            parts.append(page)
            have += len(page)
        if len(parts) == 1:
            return False
        self._buffer, self._pos = b"".join(parts), 0
        return True


def _same(found: Fingerprint, live: Fingerprint) -> bool:
    """Return True if a staged entry equals what is live.

    Directories compare by type and mode only: their mtime moves with every child.
    """
    if found.type is EntryType.DIRECTORY:
        return live.type is EntryType.DIRECTORY and found.mode == live.mode
    if found.type is EntryType.FILE and found.inode != live.inode:
        # A file renamed over the old one (tar, rsync -t, a build with a fixed mtime) may
        # keep size, mode and mtime: a new inode means new content until proven otherwise.
        return False
    return found.same_content(live)


def _reserved_in(rel: str) -> str | None:
    for part in rel.split("/"):
        why = reserved_name(part)
        if why:
            return why
    return None


def _child(entry: Pending, rel: str) -> Pending:
    return Pending(
        source=entry.source,
        rel_path=rel,
        first_at=entry.first_at,
        last_at=entry.last_at,
        writing=False,
        from_scan=entry.from_scan,
    )


def _applied(outcome: fsops.CopyOutcome) -> Applied:
    mapping = {
        fsops.CopyOutcome.COPIED: Applied(ApplyOutcome.APPLIED),
        fsops.CopyOutcome.CHANGED: Applied(ApplyOutcome.CHANGED),
        fsops.CopyOutcome.VANISHED: Applied(ApplyOutcome.VANISHED),
        fsops.CopyOutcome.UNREADABLE: Applied(ApplyOutcome.REFUSED, "unreadable"),
    }
    return mapping[outcome]
