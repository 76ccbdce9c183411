"""One lane (thread) per repository: every write to the repository, one at a time.

The lane owns the repository's pending changes (fed by its sources through a queue), its
status and heartbeat, the holds on publishing, and the host-wide repository lock. Its loop
takes hints and jobs from the queue, reconciles, watches for foreign transactions, and
when a batch is due hands it to :class:`~cvmfs_syncd.pipeline.batch.BatchCycle` (plan,
journal, prepare, transaction, place, publish, finish). At start
:class:`~cvmfs_syncd.pipeline.restart.Recovery` finishes or rolls back what a previous run
left; ``cvmfs-syncd sync`` runs :class:`~cvmfs_syncd.pipeline.one_shot.OneShotSync` in the
caller's thread instead of the loop. Failures are handled by the table in
docs/failures.md. Maintenance jobs that write (gc) run through the lane between batches,
under the same lock.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import structlog

from cvmfs_syncd.batching import BatchPolicy, Pending, PendingChanges
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.errors import RepositoryConfigError
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, HoldReason, LaneStatus, Op
from cvmfs_syncd.pipeline.batch import BatchCycle
from cvmfs_syncd.pipeline.one_shot import DEADLINE_GRACE_SECONDS, DeadlineExpired, OneShotSync
from cvmfs_syncd.pipeline.prepare import Preparer
from cvmfs_syncd.pipeline.restart import Recovery
from cvmfs_syncd.pipeline.transaction import Stopping, Transaction
from cvmfs_syncd.planner import Input
from cvmfs_syncd.state import State

log = structlog.get_logger(__name__)

#: How often the lane wakes up when idle (to notice releases, foreign transactions, stop).
_IDLE_WAKE_SECONDS = 1.0


@dataclass(frozen=True)
class _Job:
    """A write job (e.g. gc) to run in the lane between batches, under the lock."""

    name: str
    fn: Callable[[], Any]
    future: Future[Any]


class Lane(threading.Thread):
    """The worker of one repository."""

    def __init__(
        self,
        config: Config,
        repo: RepositoryConfig,
        *,
        layout: RepositoryLayout,
        server: CvmfsServer,
        state: State,
        metrics: Metrics,
        inputs: Sequence[Input],
        preparer: Preparer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name=f"lane-{repo.name}", daemon=True)
        self.log = log.bind(repository=repo.name)
        self.preparer = preparer
        self.config = config
        self.repo = repo
        self.layout = layout
        self.server = server
        self.state = state
        self.metrics = metrics
        self.inputs = list(inputs)
        self.clock = clock
        self.pending = PendingChanges(
            BatchPolicy(
                quiet_seconds=repo.quiet_seconds,
                max_batch_seconds=repo.max_batch_seconds,
                max_batch_files=repo.max_batch_files,
                max_batch_bytes=repo.max_batch_bytes,
            ),
            is_drop=self._is_drop,
        )
        self.lock = RepositoryLock(config.daemon.state_dir, repo.name)
        self._instance = hashlib.sha1(
            os.fsencode(os.path.abspath(config.daemon.state_dir)), usedforsecurity=False
        ).hexdigest()[:12]
        self._inbox: queue.SimpleQueue[Dirty | _Job | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._wake_on_submit = True
        self._stop_requested = threading.Event()
        self._status_lock = threading.Lock()
        self._status = LaneStatus(repo=repo.name, progress_at=clock())
        last = state.last_publish(repo.name)  # a restart (or a cron sync) published before
        if last is not None:
            self._status.last_publish_at, self._status.last_revision = last
        self._next_rescan = 0.0
        self._release_granted = False
        self._held_reason = ""
        self._guarded: list[Pending] = []
        self.open_batch: int | None = None
        self._txn_seen_since: float | None = None
        self._foreign_seen = False
        self.exit_error = ""
        #: ``time.monotonic()`` by which a one-shot ``sync`` must end (None: no deadline).
        self.deadline: float | None = None
        #: Set when the deadline ended a ``sync``: what was left unfinished.
        self.deadline_report = ""
        #: True while a maintenance job (gc) runs: it may take hours under its own timeout.
        self.job_running = False
        self.on_whitelist_expired: Callable[[], None] | None = None
        # Maintenance start-up (re-sign an expired whitelist, repair mounts): runs before
        # recovery, whose transaction/publish/abort would all fail on an expired whitelist.
        self.on_start: Callable[[], None] | None = None
        # The lane's collaborators, each given the lane as what it needs of it.
        self.batches = BatchCycle(self)
        self.recovery = Recovery(self, self.batches)
        self.one_shot = OneShotSync(self, self.recovery, self.batches)

    def _is_drop(self, source: str, rel_path: str) -> bool:
        return any(i.name == source and i.is_drop(rel_path) for i in self.inputs)

    # -- interface for other threads ----------------------------------------------------

    def submit(self, dirty: Dirty) -> None:
        """Queue a hint from a source (thread-safe, never blocks)."""
        self._inbox.put(dirty)
        # While changes are pending, a new hint can only push the quiet deadline later:
        # waking the lane for each of thousands of events would only re-scan the pending
        # set. It wakes at the deadline (or within a second) and drains the queue then. A
        # tarball drop may be cut at once (PendingChanges.due): it wakes the lane.
        if self._wake_on_submit or self._is_drop(dirty.source, dirty.rel_path):
            self._wake.set()

    def run_job(self, name: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the lane between batches, under the repository lock."""
        future: Future[Any] = Future()
        self._inbox.put(_Job(name, fn, future))
        self._wake.set()
        return future

    def request_stop(self) -> None:
        """Ask the lane to stop: no new batches; an in-flight publish may finish."""
        self._stop_requested.set()
        self._wake.set()

    def status(self) -> LaneStatus:
        """Return a copy of what the lane is doing."""
        with self._status_lock:
            return replace(self._status, details=dict(self._status.details))

    def set_status(self, **changes: Any) -> None:
        with self._status_lock:
            for key, value in changes.items():
                setattr(self._status, key, value)
            self._status.progress_at = self.clock()

    def heartbeat(self) -> None:
        """Record progress (the service's watchdog checks it)."""
        with self._status_lock:
            self._status.progress_at = self.clock()

    # -- what a transaction needs from its lane (pipeline.transaction.LaneControl) --------

    @property
    def held_reason(self) -> str:
        """The reason publishing is held now ("" when it is not)."""
        return self._held_reason

    def release_delete_hold(self) -> None:
        """After a publish: lift a hold, unless deletions wait for ``release``."""
        if not self._guarded:
            self.set_hold("")

    def transaction_opened(self) -> None:
        """Our transaction is open: gauges and status."""
        self.metrics.transaction_open.labels(self.repo.name).set(1)
        # Stuck publishes retry inside the lane, where step() does not run: the "open too
        # long" alert needs this gauge set by the opener too.
        self._txn_seen_since = self._txn_seen_since or self.clock()
        self.metrics.transaction_open_since.labels(self.repo.name).set(self._txn_seen_since)
        self.set_status(transaction_open=True)

    def transaction_closed(self) -> None:
        """Our transaction is closed (published, aborted or gone): gauges and status."""
        self.open_batch = None
        self.metrics.transaction_open.labels(self.repo.name).set(0)
        self.set_status(transaction_open=False)

    def command_timeout(self, configured: float) -> float:
        """The timeout for a command: ``configured``, or the time left before the deadline
        of a one-shot ``sync`` plus a grace period."""
        if self.deadline is None:
            return configured
        left = self.deadline - time.monotonic()
        return max(1.0, min(configured, left + DEADLINE_GRACE_SECONDS))

    def check_deadline(self, wait: float = 0.0) -> None:
        """Raise :class:`DeadlineExpired` if waiting ``wait`` seconds would pass the deadline
        of a one-shot ``sync``."""
        if self.deadline is not None and time.monotonic() + wait > self.deadline:
            raise DeadlineExpired

    def stop_now(self, why: str) -> None:
        """If the lane is asked to stop, record ``why`` and stop."""
        if self._stop_requested.is_set():
            self.exit_error = why
            raise Stopping

    def whitelist_expired(self) -> None:
        """Hold publishing and ask for a resign."""
        self.set_hold(
            "whitelist expired: publishing resumes after resign", HoldReason.WHITELIST_EXPIRED
        )
        if self.on_whitelist_expired is not None:
            self.on_whitelist_expired()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Recover, reconcile, then cut and publish batches until asked to stop."""
        self.log.info("lane starting")
        try:
            for source in self.inputs:
                source.start(self.submit)
            if self.on_start is not None:
                self.on_start()
            self.recovery.recover()
            self._schedule_rescan(now=0.0)
            while not self._stop_requested.is_set():
                self.step()
        except Stopping:
            pass
        except Exception as exc:
            self.log.exception("lane crashed")
            self.exit_error = f"lane crashed: {exc}"
            self.set_status(state="crashed", last_error=str(exc))
        finally:
            for source in self.inputs:
                try:
                    source.stop()
                except Exception:
                    self.log.exception("stopping a source failed", source=source.name)
            self.lock.release()
            if self.preparer is not None:
                self.preparer.close()
            self.set_status(state="stopped" if not self.exit_error else "crashed")
            self.log.info("lane stopped", error=self.exit_error or None)

    def step(self, *, force_cut: bool = False) -> bool:
        """Do one unit of work (or wait for one); return True if a batch was published."""
        now = self.clock()
        self.drain_inbox()
        if now >= self._next_rescan:
            self.reconcile(now)
        self.check_release()
        self._update_pending_metrics()
        if self.foreign_transaction_open():
            self.set_status(state="waiting: foreign transaction", foreign_transaction=True)
            self._wait(2.0)
            return False
        self.set_status(foreign_transaction=False)
        reason = "sync" if force_cut and len(self.pending) else self.pending.due(now)
        if reason is None:
            deadline = self.pending.next_deadline(now)
            timeout = _IDLE_WAKE_SECONDS if deadline is None else max(0.0, deadline - now)
            self.set_status(state="idle" if not len(self.pending) else "batching")
            self._wake_on_submit = not len(self.pending)
            self._wait(min(timeout, _IDLE_WAKE_SECONDS, max(0.0, self._next_rescan - now)))
            self._wake_on_submit = True
            return False
        return self.batches.publish_pending(reason, now)

    def _wait(self, timeout: float) -> None:
        self.heartbeat()
        if timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()

    def drain_inbox(self) -> None:
        """Take the queued hints into pending and run the queued jobs."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                continue
            if isinstance(item, _Job):
                self._run_job(item)
                continue
            self.pending.add(item)
            self.metrics.changes_detected.labels(self.repo.name, item.source).inc()

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.set_status(state=f"running {job.name}", busy_since=self.clock())
        self.job_running = True
        try:
            with self.locked():
                result = job.fn()
        except BaseException as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            self.job_running = False
            self.set_status(state="idle", busy_since=None)

    def locked(self) -> _LockContext:
        """Hold the host-wide repository lock (waiting for it, heartbeat and stop kept)."""
        return _LockContext(self)

    def _schedule_rescan(self, now: float) -> None:
        self._next_rescan = now

    def reconcile(self, now: float) -> None:
        """Full comparison of every input with what is live (the healer)."""
        for source in self.inputs:
            try:
                hints = source.reconcile(now)
            except Exception as exc:
                self.log.warning("reconciliation failed", source=source.name, error=str(exc))
                continue
            missed = 0
            for hint in hints:
                if (hint.source, hint.rel_path) not in self.pending:
                    missed += 1
                self.pending.add(hint)
            if missed and self._next_rescan > 0:
                self.metrics.reconciled_changes.labels(self.repo.name, source.name).inc(missed)
                self.log.info("reconciliation found changes", source=source.name, changes=missed)
        self._next_rescan = now + self.config.daemon.rescan_seconds

    def _update_pending_metrics(self) -> None:
        count = len(self.pending) + len(self._guarded)
        self.metrics.pending_changes.labels(self.repo.name).set(count)
        self.set_status(pending=count)

    def foreign_transaction_open(self) -> bool:
        """True while a transaction the daemon did not open is in progress (gauges, log)."""
        open_now = self.layout.in_transaction()
        if open_now and self._txn_seen_since is None:
            self._txn_seen_since = self.clock()
        elif not open_now:
            self._txn_seen_since = None
        self.metrics.transaction_open_since.labels(self.repo.name).set(self._txn_seen_since or 0)
        foreign = open_now and self.open_batch is None
        self.metrics.foreign_transaction.labels(self.repo.name).set(1 if foreign else 0)
        if foreign and not self._foreign_seen:
            self.log.warning(
                "a transaction the daemon did not open is in progress; waiting",
                collecting=self.layout.is_collecting(),
            )
        elif self._foreign_seen and not foreign:
            self.log.info("the foreign transaction is closed; publishing resumes")
        self._foreign_seen = foreign
        return foreign

    # -- holds ---------------------------------------------------------------------------

    def check_release(self) -> None:
        """Take an operator's release of the held deletions, if one was asked for."""
        if self._guarded and self.state.take_release(self.repo.name):
            self.log.warning("operator released held deletions")
            for entry in self._guarded:
                self.pending.put_back(replace(entry, held=False, not_before=0.0))
            self._guarded = []
            self._release_granted = True
            self.set_hold("")

    def set_hold(self, reason: str, kind: HoldReason = HoldReason.MASS_DELETE) -> None:
        if reason == self._held_reason:
            return
        if reason:
            self.log.error("publishing held", reason=reason)
            self.metrics.held.labels(self.repo.name, kind.value).set(1)
        else:
            for k in HoldReason:
                self.metrics.held.labels(self.repo.name, k.value).set(0)
        self._held_reason = reason
        self.set_status(held=reason)

    @property
    def guarded(self) -> list[Pending]:
        """The deletions held until an operator's release."""
        return self._guarded

    @property
    def release_granted(self) -> bool:
        """True when an operator released the held deletions since the last plan."""
        return self._release_granted

    def guard(self, entries: Sequence[Pending], reason: str, kind: HoldReason) -> None:
        """Hold ``entries`` (deletions the guard withheld) until an operator's release."""
        known = {held.key for held in self._guarded}
        for entry in entries:
            if entry.key not in known:
                self._guarded.append(entry)
                known.add(entry.key)
        self.set_hold(reason, kind)

    def after_plan(self) -> None:
        """A plan was made: a release is used up, a deletion hold with nothing left lifts."""
        self._release_granted = False
        if not self._guarded and self._held_reason and "delete" in self._held_reason:
            self.set_hold("")

    # -- what the batch cycle, recovery and a one-shot sync need from their lane ----------

    def source_of(self, op: Op) -> Input | None:
        """The input an op came from (None if a reload removed it)."""
        for source in self.inputs:
            if source.name == op.source:
                return source
        return None

    def revision(self) -> int | None:
        try:
            return self.layout.manifest().revision
        except RepositoryConfigError as exc:
            self.log.warning("cannot read the manifest", error=str(exc))
            return None

    def abandon(self, batch_id: int) -> None:
        """Delete the objects an abandoned batch created (never ones it found stored)."""
        self.batches.abandon(batch_id)

    def pause(self, delay: float, abort_batch: int | None = None) -> None:
        """Wait for a retry; on stop, abort our open transaction (if any) and stop. A wait
        that would pass the deadline of a one-shot ``sync`` ends it at once."""
        self.check_deadline(delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            self.heartbeat()
            if self._stop_requested.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if abort_batch is not None:
                    Transaction(self, abort_batch).abort("daemon stopping while publish retries")
                raise Stopping

    def command_tag(self, batch_id: int) -> str:
        """The tag in the environment of every process of a batch's commands: this state
        directory (two daemons on a host never touch each other's) and the batch."""
        return f"{self._instance}:{batch_id}"

    # -- one-shot mode -----------------------------------------------------------------

    def sync_once(self, timeout: float) -> tuple[bool, str]:
        """Recover, reconcile, publish everything pending within ``timeout`` seconds; return
        (in sync, why not). See :meth:`~cvmfs_syncd.pipeline.one_shot.OneShotSync.sync_once`."""
        return self.one_shot.sync_once(timeout)


class _LockContext:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def __enter__(self) -> None:
        lane = self.lane
        while not lane.lock.acquire(timeout=5.0, stop=lane._stop_requested):
            if lane._stop_requested.is_set():
                raise Stopping
            lane.check_deadline()
            lane.log.info("waiting for the repository lock", path=str(lane.lock.path))
            lane.heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.lane.lock.release()
