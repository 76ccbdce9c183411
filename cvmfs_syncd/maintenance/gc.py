"""Garbage collection of one repository, between the lane's batches.

gc runs inside the lane (``Lane.run_job``) between batches, under the same repository
lock as publishing. It reads ``server.conf`` first (:func:`~.policy.gc_settings`), never
touches a transaction it did not open (``cvmfs_server gc`` refuses during one,
o_gc_and_transactions 2) and removes old automatic tags first when asked to
(``auto_tag_keep``), because every tagged revision survives gc (g_gc 17-20). While it
runs it holds ``locks/<repo>.check.lock``, taken without waiting: ``check -i`` reads
every object file, and gc deletes some.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.errors import RepositoryConfigError
from cvmfs_syncd.maintenance.policy import (
    GcSettings,
    auto_tags_to_remove,
    gc_settings,
    parse_last_gc,
)
from cvmfs_syncd.maintenance.runs import TaskContext, TaskResult, Verdict, command_failed
from cvmfs_syncd.pipeline.transaction import describe

log = structlog.get_logger(__name__)

#: gc of a large repository takes hours; it runs as a lane job, which the stall check
#: exempts, so only this bound ends a gc that hangs.
GC_TIMEOUT = 24 * 3600.0


class Jobs(Protocol):
    """What gc needs of the repository's lane."""

    def is_alive(self) -> bool:
        """True while the lane runs."""

    def run_job(self, name: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the lane between batches, under the repository lock."""


class GarbageCollection:
    """gc of one repository. ``lane`` None: :meth:`run_locked` must be called with the
    repository lock held (the command line); ``on_demand``: an operator asked for it, no
    ``gc_schedule`` needed."""

    def __init__(self, ctx: TaskContext, *, lane: Jobs | None, on_demand: bool) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.runs = ctx.runs
        self.lane = lane
        self.on_demand = on_demand
        self._lock = threading.Lock()
        self._future: Future[Any] | None = None
        self._settings = GcSettings(False)
        self._set_settings(gc_settings(ctx.layout, ctx.settings, on_demand=on_demand))

    def read_last_gc(self) -> None:
        """Take the repository's own last gc (``.cvmfs_status.json``) as a success."""
        try:
            last_gc = parse_last_gc(self.ctx.layout.read_storage_file(".cvmfs_status.json"))
        except RepositoryConfigError:
            last_gc = None
        if last_gc is not None:
            self.runs.seen_success("gc", last_gc)

    def settings_status(self) -> dict[str, Any]:
        """Return what the repository's settings mean for gc, for /status."""
        with self._lock:
            current = self._settings
        return {"enabled": current.enabled, "reason": current.reason, "notes": list(current.notes)}

    def _set_settings(self, settings: GcSettings) -> None:
        with self._lock:
            self._settings = settings
        self.runs.set_enabled("gc", settings.enabled)

    # -- runs ------------------------------------------------------------------------------

    def submit(self) -> None:
        """Queue a gc in the lane (the scheduler's gc job); it runs between batches.

        A gc still queued or running absorbs this one. Without a running lane the run
        fails and is retried.
        """
        lane = self.lane
        if lane is None or not lane.is_alive():
            with self._lock:
                # A job queued in a lane that has stopped will never run.
                self._future = None
            self.runs.set_queued("gc", False)
            self.runs.run(
                "gc",
                lambda: TaskResult(
                    "gc",
                    Verdict.NOT_RUN_RETRY,
                    "the repository's lane is not running; gc waits for it",
                    "lane_not_running",
                ),
                retry=self.submit,
            )
            return
        with self._lock:
            pending = self._future
            if pending is not None and not pending.done():
                log.info("gc already queued; this run is coalesced", repository=self.name)
                return
            self.runs.set_queued("gc", True)
            future = self._future = lane.run_job("gc", self.run_locked)
        future.add_done_callback(self._finished)
        log.info("gc queued in the lane", repository=self.name)

    def run_locked(self) -> TaskResult | None:
        """Run gc now; the caller holds the repository lock (the lane, or the command line)."""
        self.runs.set_queued("gc", False)
        return self.runs.run("gc", self._body, retry=self.submit)

    def _finished(self, future: Future[Any]) -> None:
        self.runs.set_queued("gc", False)
        exc = future.exception() if not future.cancelled() else None
        if exc is not None:
            # The lane stopped before the job ran (it raises its stop signal then).
            log.warning("gc did not run: the lane stopped", repository=self.name, error=repr(exc))

    def _body(self) -> TaskResult:
        layout = self._fresh_layout()
        settings = gc_settings(layout, self.ctx.settings, on_demand=self.on_demand)
        self._set_settings(settings)
        for note in settings.notes:
            self.runs.warn_once(note)
        if not settings.enabled:
            return TaskResult("gc", Verdict.SKIPPED, settings.reason, "disabled")
        if layout.in_transaction():
            what = "gc's" if layout.is_collecting() else "an operator's or a script's"
            return TaskResult(
                "gc",
                Verdict.NOT_RUN_RETRY,
                f"a transaction the daemon did not open is in progress ({what}): "
                "cvmfs_server gc refuses to run during one, and it is never aborted",
                "foreign_transaction",
            )
        check_lock = self.ctx.lock("check")
        # A check -i reads every object file; never wait for it here, the lane is held.
        if not check_lock.acquire(timeout=0.0):
            return TaskResult(
                "gc",
                Verdict.NOT_RUN_RETRY,
                "a check of the repository is running; gc waits for it",
                "check_running",
            )
        try:
            removed: list[str] = []
            keep_tags = self.ctx.settings.auto_tag_keep_seconds
            if keep_tags is not None:
                failure = self._remove_old_auto_tags(keep_tags, removed)
                if failure is not None:
                    return failure
            keep = self.ctx.settings.gc_keep_seconds
            result = self.ctx.server.gc(
                self.name,
                keep_revisions=self.ctx.settings.gc_keep_revisions,
                keep_since=(
                    None if keep is None else datetime.fromtimestamp(self.runs.clock() - keep, UTC)
                ),
                timeout=GC_TIMEOUT,
            )
        finally:
            check_lock.release()
        tags = f"; removed {len(removed)} automatic tags" if removed else ""
        if result.ok:
            return TaskResult("gc", Verdict.DONE, f"garbage collected{tags}", "ok")
        if result.outcome is Outcome.GC_NOT_ENABLED:
            self._set_settings(
                GcSettings(False, result.reason or "garbage collection is not enabled")
            )
            return TaskResult("gc", Verdict.SKIPPED, describe(result) + tags, "disabled")
        return command_failed(
            "gc",
            result,
            retry=result.outcome is not Outcome.NO_SUCH_REPOSITORY,
            ran=result.outcome is not Outcome.GC_IN_TRANSACTION,
        )

    def _remove_old_auto_tags(self, keep: float, removed: list[str]) -> TaskResult | None:
        server, timeout = self.ctx.server, self.ctx.timeout
        listing = server.tag_list(self.name, timeout=timeout)
        if not listing.ok:
            failed = command_failed("gc", listing.result, retry=True)
            return replace(failed, message="cannot list tags: " + failed.message)
        old = auto_tags_to_remove(listing.tags, self.runs.clock(), keep)
        if not old:
            return None
        result = server.tag_remove(self.name, [tag.name for tag in old], timeout=timeout)
        if not result.ok:
            failed = command_failed("gc", result, retry=True)
            return replace(failed, message="cannot remove old automatic tags: " + failed.message)
        removed.extend(tag.name for tag in old)
        log.info("removed old automatic tags", repository=self.name, tags=removed)
        return None

    def _fresh_layout(self) -> RepositoryLayout:
        # server.conf may have been edited (e.g. gc enabled) since the daemon started.
        try:
            return load_layout(self.ctx.config.cvmfs.config_dir, self.name)
        except RepositoryConfigError as exc:
            log.warning("cannot re-read server.conf; using the one read at start", error=str(exc))
            return self.ctx.layout
