"""Garbage collection of one repository, between the lane's batches.

gc runs inside the lane (``Lane.run_job``) between batches, under the same repository
lock as publishing. It reads ``server.conf`` first (:func:`~.policy.gc_settings`), never
touches a transaction it did not open (``cvmfs_server gc`` refuses during one,
o_gc_and_transactions 2) and removes old automatic tags first when asked to
(``auto_tag_keep``), because every tagged revision survives gc (g_gc 17-20).

A run is made of steps, each its own lane job: one ``tag -r`` call of at most
MAX_TAGS_PER_CALL names per step (faults.md F1: one call of thousands of names fails as
a whole), then ``cvmfs_server gc``. The next step is queued through the scheduler
STEP_PAUSE seconds after the previous one ended, so the lane finishes draining its
inbox and publishes a batch that is due before the next tag call. Tag removal stops after
``tag_cleanup_seconds``, or when calls keep failing, and gc runs anyway: the tags left
are reported (``cvmfs_syncd_automatic_tags``), never a reason to skip gc. While
``cvmfs_server gc`` runs it holds ``locks/<repo>.check.lock``, taken without waiting:
``check -i`` reads every object file, and gc deletes some.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.errors import RepositoryConfigError
from cvmfs_syncd.maintenance.policy import (
    GcSettings,
    TagCleanup,
    auto_tags_to_remove,
    gc_settings,
    missing_tags,
    next_tag_call,
    parse_last_gc,
    tag_call_done,
)
from cvmfs_syncd.maintenance.runs import TaskContext, TaskResult, Verdict, command_failed
from cvmfs_syncd.pipeline.transaction import describe

log = structlog.get_logger(__name__)

#: gc of a large repository takes hours; it runs as a lane job, which the stall check
#: exempts, so only this bound ends a gc that hangs.
GC_TIMEOUT = 24 * 3600.0
#: Seconds between one step of a gc run ending and the next being queued in the lane.
STEP_PAUSE = 0.5


class Jobs(Protocol):
    """What gc needs of the repository's lane."""

    def is_alive(self) -> bool:
        """True while the lane runs."""

    def run_job(self, name: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the lane between batches, under the repository lock."""


#: Runs one step with the repository lock held; None when the lock could not be had.
Locked = Callable[[Callable[[], bool]], bool | None]


@dataclass
class _GcRun:
    """A gc run between its steps. Times are ``runs.clock`` seconds, except ``started``
    (``time.monotonic``, for the run's duration)."""

    started: float
    deadline: float
    cleaning: bool
    cleanup: TagCleanup
    left: int | None = None
    note: str = ""


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
        self._run: _GcRun | None = None
        self._last: TaskResult | None = None
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
                self._run = None
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
            if self._run is not None or (pending is not None and not pending.done()):
                log.info("gc already queued; this run is coalesced", repository=self.name)
                return
        self._queue(lane)
        log.info("gc queued in the lane", repository=self.name)

    def _queue(self, lane: Jobs) -> None:
        with self._lock:
            self.runs.set_queued("gc", True)
            future = self._future = lane.run_job("gc", self._lane_step)
        future.add_done_callback(self._finished)

    def _lane_step(self) -> bool:
        self.runs.set_queued("gc", False)
        return self._step()

    def _finished(self, future: Future[Any]) -> None:
        self.runs.set_queued("gc", False)
        exc = future.exception() if not future.cancelled() else None
        if exc is not None or future.cancelled():
            # The lane stopped before the job ran (it raises its stop signal then).
            with self._lock:
                self._run = None
            log.warning("gc did not run: the lane stopped", repository=self.name, error=repr(exc))
            return
        if future.result():
            self.runs.set_queued("gc", True)
            self.runs.run_soon("gc", self._next_step, STEP_PAUSE)

    def _next_step(self) -> None:
        lane = self.lane
        if lane is not None and lane.is_alive():
            self._queue(lane)
        else:
            self.submit()  # records that the lane is not running, and retries

    def run_locked(self) -> TaskResult | None:
        """Run a whole gc now; the caller holds the repository lock (the lane, or tests)."""
        self.runs.set_queued("gc", False)
        while self._step():
            pass
        return self._last

    def run_stepwise(self, locked: Locked) -> TaskResult | None:
        """Run a whole gc now, each step under the lock ``locked`` takes and releases (the
        command line: the daemon's lane may publish between two tag calls)."""
        while True:
            more = locked(self._step)
            if more is None:
                with self._lock:
                    self._run = None
                return None
            if not more:
                return self._last

    def _step(self) -> bool:
        """Do one step of the gc run (starting one); return True if another step follows."""
        with self._lock:
            run = self._run
        started = time.monotonic() if run is None else run.started
        more = False

        def body() -> TaskResult | None:
            nonlocal more
            # Checked before every step: a transaction may have been opened in between.
            refused = self._refused()
            if refused is not None:
                return refused
            current = run or self._begin(started)
            if current.cleaning and self._tag_step(current):
                more = True
                return None
            return self._collect(current)

        result = self.runs.run("gc", body, retry=self.submit, started=started)
        with self._lock:
            if not more:
                self._run = None
                self._last = result
        return more

    def _begin(self, started: float) -> _GcRun:
        keep = self.ctx.settings.auto_tag_keep_seconds
        run = _GcRun(
            started=started,
            deadline=self.runs.clock() + self.ctx.settings.tag_cleanup_seconds,
            cleaning=keep is not None,
            cleanup=TagCleanup(),
        )
        with self._lock:
            self._run = run
        return run

    def _refused(self) -> TaskResult | None:
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
        return None

    def _tag_step(self, run: _GcRun) -> bool:
        """List the tags and remove the next call's worth; False when removal is over."""
        keep = self.ctx.settings.auto_tag_keep_seconds or 0.0  # set: cleaning is on
        server, timeout = self.ctx.server, self.ctx.timeout
        listing = server.tag_list(self.name, timeout=timeout)
        if not listing.ok:
            return self._stop_cleaning(run, "cannot list tags: " + describe(listing.result))
        old = [tag.name for tag in auto_tags_to_remove(listing.tags, self.runs.clock(), keep)]
        left = run.left = len(old)
        if run.cleanup.stopped:
            return self._stop_cleaning(run, run.cleanup.stopped)
        if self.runs.clock() >= run.deadline:
            limit = self.ctx.settings.tag_cleanup_seconds
            return self._stop_cleaning(run, f"tag cleanup stopped after {limit:.0f}s")
        call = next_tag_call(run.cleanup, old)
        if not call:
            return self._stop_cleaning(run, "")
        result = server.tag_remove(self.name, call, timeout=timeout)
        missing = () if result.ok else missing_tags(result.stdout + "\n" + result.stderr)
        run.cleanup = tag_call_done(run.cleanup, call, ok=result.ok, missing=missing)
        if result.ok:
            run.left = left - len(call)
            log.info("removed old automatic tags", repository=self.name, tags=len(call))
        else:
            log.warning(
                "removing old automatic tags failed",
                repository=self.name,
                tags=len(call),
                missing=sorted(missing),
                error=describe(result),
            )
        return True

    def _stop_cleaning(self, run: _GcRun, note: str) -> bool:
        run.cleaning = False
        run.note = note
        if run.left is not None:
            self.ctx.runs.metrics.automatic_tags.labels(self.name).set(run.left)
        return False

    def _collect(self, run: _GcRun) -> TaskResult:
        """Run ``cvmfs_server gc`` (whatever the tag removal came to) and say how it went."""
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
        tags = self._tags_summary(run)
        if result.ok:
            return TaskResult("gc", Verdict.DONE, f"garbage collected{tags}", "ok")
        if result.outcome is Outcome.GC_NOT_ENABLED:
            self._set_settings(
                GcSettings(False, result.reason or "garbage collection is not enabled")
            )
            return TaskResult("gc", Verdict.SKIPPED, describe(result) + tags, "disabled")
        failed = command_failed(
            "gc",
            result,
            retry=result.outcome is not Outcome.NO_SUCH_REPOSITORY,
            ran=result.outcome is not Outcome.GC_IN_TRANSACTION,
        )
        return TaskResult(failed.task, failed.verdict, failed.message + tags, failed.outcome)

    def _tags_summary(self, run: _GcRun) -> str:
        removed = run.cleanup.removed
        text = f"; removed {removed} automatic tags" if removed else ""
        if run.left:
            why = f" ({run.note})" if run.note else ""
            text += f"; {run.left} old automatic tags left{why}"
            log.warning(
                "old automatic tags left after gc's tag cleanup",
                repository=self.name,
                left=run.left,
                reason=run.note or None,
            )
        elif run.note:
            text += f"; {run.note}"
        return text

    def _fresh_layout(self) -> RepositoryLayout:
        # server.conf may have been edited (e.g. gc enabled) since the daemon started.
        try:
            return load_layout(self.ctx.config.cvmfs.config_dir, self.name)
        except RepositoryConfigError as exc:
            log.warning("cannot re-read server.conf; using the one read at start", error=str(exc))
            return self.ctx.layout
