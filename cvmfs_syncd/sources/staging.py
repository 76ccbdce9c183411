"""Staging directories: inotify hints plus a reconciliation scan, planned into ops.

Watch events are only hints: at batch time every pending path is read again from the
staging directory (never following a symlink) and compared with the index of what is
live. A periodic full scan (the healer) catches what the watcher missed: watchdog drops
kernel queue overflows silently.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.pipeline.plan import (
    COPY_ONLY,
    DEFAULT_MAX_BATCH_SECONDS,
    ContentPolicy,
    StagingPolicy,
    StagingView,
    plan_staged,
)
from cvmfs_syncd.pipeline.plan import same_staged as _same
from cvmfs_syncd.pipeline.prepare import Content
from cvmfs_syncd.planner import Applied, ApplyOutcome, Plan
from cvmfs_syncd.sources.drops import (
    Drops,
    arrives_whole,
    drop_path,
    forget_resolved,
    is_drop,
    sharing_base,
    staged_drops,
    top_level_tarball,
)
from cvmfs_syncd.sources.index_records import IndexRecords, read_ahead
from cvmfs_syncd.sources.staged import Lookup, StagedContent, applied_outcome
from cvmfs_syncd.sources.staging_merge import StagingMerge
from cvmfs_syncd.sources.staging_observe import observe
from cvmfs_syncd.state import State

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
        max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS,
    ) -> None:
        self.repo = repo
        self.config = config
        self.root = config.path
        self.name = config.name
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self.content = content
        self.max_batch_seconds = max_batch_seconds
        self.settler = Settler()
        self._submit: Callable[[Dirty], None] | None = None
        self._observer: InotifyObserver | None = None
        self._watch_error = ""
        #: Paths refused or skipped already, with the reason reported (a watch event clears one).
        self.reported: dict[str, str] = {}
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
            self.reported.pop(rel, None)
            closed = was_moved or arrives_whole(
                self.config, rel, event.event_type, event.is_directory
            )
            rescan = event.is_directory and event.event_type in ("moved", "created", "deleted")
            self._submit(Dirty(self.name, rel, now, closed=closed, rescan=rescan))
            for other in self._same_base(rel):
                self._submit(Dirty(self.name, other, now, closed=True))

    def _same_base(self, rel: str) -> list[str]:
        """The refused top-level tarballs whose base is ``rel``'s (a change to one entry
        may end another's refusal): forgotten as reported, to be planned again."""
        if self.config.tarballs != "ingest":
            return []
        return sharing_base(rel, self.reported)

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
        if self.config.tarballs == "ingest" and self.reported:
            # A refused tarball whose rival is gone is planned again (no event says so).
            config = self.config
            drops = staged_drops(self.root, config.ignore, config.allow_reserved_names)
            forget_resolved(self.reported, drops)
        target = self._target_repo_path()
        mirror = self.config.mode == "mirror"
        pages = read_ahead(self.state.scan_pages(self.repo, self.name, target))
        try:
            return StagingMerge(self, target, now).merge(IndexRecords(pages), mirror)
        finally:
            pages.close()  # stops the reader if the scan ended early

    def stat(self, rel: str) -> Fingerprint | fsops.Skipped | None:
        """The staged entry at ``rel`` (None if absent, or the staging root is gone)."""
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
                        result.setdefault(rel, entry.below(rel))
                except OSError as exc:
                    log.warning(
                        "rescanning failed", source=self.name, path=entry.rel_path, error=str(exc)
                    )
            if self.config.mode == "mirror":
                try:
                    below = repo_path(self.config.target, entry.rel_path)
                except UnsafeName:
                    continue
                for live in self.state.published_under(self.repo, below, self.name):
                    result.setdefault(live.source_path, entry.below(live.source_path))
        return list(result.values())

    def _view(self) -> StagingView:
        problem = ""
        if not self.root.is_dir():
            problem = f"staging path {self.root} is missing"
        elif os.path.ismount(self.root) and not any(os.scandir(self.root)):
            problem = f"staging path {self.root} is an empty mount point"
        return StagingView(problem, self.state.count_published(self.repo, self.name))

    def plan(self, entries: Sequence[Pending], now: float) -> Plan:
        """Observe every pending entry (:meth:`_observe`), let :func:`plan_staged` decide,
        and record what the decision implies for this source's own memory."""
        policy = self._policy()
        markers: dict[str, bool] = {}
        expanded = self._expand(entries)
        drops = self._drops(expanded)
        # One query per 500 paths and one for the set-aside inputs, not two per path.
        mapped = []
        for entry in expanded:
            with contextlib.suppress(UnsafeName):
                mapped.append(self.mapped(entry.rel_path, drops))
        lookup = Lookup(
            self.state.published_entries(self.repo, mapped),
            self.state.set_aside_entries(self.repo, self.name),
        )
        observations = [observe(self, e, policy, now, markers, lookup, drops) for e in expanded]
        deletes = self.config.mode == "mirror" and any(o.live_below for o in observations)
        view = self._view() if deletes else StagingView()
        result = plan_staged(observations, policy, now, view)
        for key in result.forget:
            self.settler.forget(key)
        for rel in result.clear_set_aside:
            self.state.clear_set_aside(self.repo, self.name, rel)
        self.reported.update(result.reported)
        for rel in result.replaced_alone:
            log.warning(
                "replacement not ready: old entry deleted first", source=self.name, path=rel
            )
        return result.plan

    def _drops(self, entries: Sequence[Pending]) -> Drops | None:
        """The top-level tarballs of an ingest source, read when an entry is one."""
        if self.config.tarballs != "ingest":
            return None
        if not any(top_level_tarball(e.rel_path) for e in entries):
            return Drops()
        return staged_drops(self.root, self.config.ignore, self.config.allow_reserved_names)

    def mapped(self, rel: str, drops: Drops | None) -> str:
        """The repository path of source path ``rel``: a drop's base, else ``rel`` below
        the target. Raise UnsafeName."""
        if drops is not None and drops.is_drop(rel):
            return drop_path(self.config.target, rel) or ""
        return repo_path(self.config.target, rel)

    def _policy(self) -> StagingPolicy:
        config = self.config
        return StagingPolicy(
            source=self.name,
            mirror=config.mode == "mirror",
            content=self.content,
            settle_seconds=config.settle_seconds,
            ready_marker=config.ready_marker,
            ignore=config.ignore,
            allow_reserved_names=config.allow_reserved_names,
            prepare=config.prepare,
            graft_at=config.graft_threshold,
            max_delete_share=config.max_delete_share,
            max_batch_seconds=self.max_batch_seconds,
        )

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
        return applied_outcome(outcome)

    def is_drop(self, rel_path: str) -> bool:
        """Return whether ``rel_path`` is a tarball drop (see :func:`drops.is_drop`)."""
        return is_drop(self.config, rel_path)

    def published(self, ops: Sequence[Op]) -> None:
        """After a publish: forget settled state; in inbox mode remove the published inputs."""
        tops: set[str] = set()
        for op in ops:
            self.settler.forget((self.name, op.source_path))
            self.reported.pop(op.source_path, None)
            if self.config.mode != "inbox" or op.fingerprint is None:
                continue
            removable = op.kind in (
                OpKind.COPY_FILE,
                OpKind.GRAFT,
                OpKind.MAKE_SYMLINK,
                OpKind.INGEST,
            )
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
            return applied_outcome(opened)
        return StagedContent(opened, fp)

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
            rp = self.mapped(rel, Drops() if self.config.tarballs == "ingest" else None)
        except UnsafeName as exc:
            return {"live": False, "reason": f"unsafe name: {exc}"}
        live = self.state.published_entry(self.repo, rp)
        found = self.stat(rel) if rel else None
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
