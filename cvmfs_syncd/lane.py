"""One lane (thread) per repository: every write to the repository, one at a time.

The lane owns the repository's pending changes, cuts batches, and for each batch: takes
the host-wide repository lock, journals the batch, opens a transaction, applies the ops,
publishes, updates the index of what is live, and tells the sources. Failures are handled
by the table in docs/failures.md. Maintenance jobs that write (gc) run through the lane
between batches, under the same lock.
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

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.batching import BatchPolicy, Pending, PendingChanges
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.procs import stop_tagged
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.errors import RepositoryConfigError
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Batch, Dirty, HoldReason, LaneStatus, Op, OpKind
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.pipeline import recovery
from cvmfs_syncd.pipeline.place import BatchWork
from cvmfs_syncd.pipeline.prepare import Preparer
from cvmfs_syncd.pipeline.recovery import RecoveryAction as Action
from cvmfs_syncd.pipeline.transaction import Transaction, describe
from cvmfs_syncd.planner import Input, Plan, cut_to_caps
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


class _Stopping(Exception):
    """The lane was asked to stop while waiting."""


class _DeadlineExpired(_Stopping):
    """A one-shot ``sync`` ran out of time (``--timeout``)."""


#: A command started near a deadline may run this much past it (a short command must not
#: be killed for being a moment late; a hanging one is killed and recovered like F9).
DEADLINE_GRACE_SECONDS = 5.0


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
            )
        )
        self.lock = RepositoryLock(config.daemon.state_dir, repo.name)
        self._instance = hashlib.sha1(
            os.fsencode(os.path.abspath(config.daemon.state_dir)), usedforsecurity=False
        ).hexdigest()[:12]
        self._inbox: queue.SimpleQueue[Dirty | _Job | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._wake_on_submit = True
        self._stop_requested = threading.Event()
        self._drain = threading.Event()
        self._status_lock = threading.Lock()
        self._status = LaneStatus(repo=repo.name, progress_at=clock())
        last = state.last_publish(repo.name)  # a restart (or a cron sync) published before
        if last is not None:
            self._status.last_publish_at, self._status.last_revision = last
        self._next_rescan = 0.0
        self._release_granted = False
        self._timings: dict[str, float] = {}
        self._apply_backoff = Backoff(repo.retry_initial_seconds, repo.retry_max_seconds)
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
        self._in_flight = 0
        #: True while a maintenance job (gc) runs: it may take hours under its own timeout.
        self.job_running = False
        self.on_whitelist_expired: Callable[[], None] | None = None
        # Maintenance start-up (re-sign an expired whitelist, repair mounts): runs before
        # recovery, whose transaction/publish/abort would all fail on an expired whitelist.
        self.on_start: Callable[[], None] | None = None

    # -- interface for other threads ----------------------------------------------------

    def submit(self, dirty: Dirty) -> None:
        """Queue a hint from a source (thread-safe, never blocks)."""
        self._inbox.put(dirty)
        # While changes are pending, a new hint can only push the quiet deadline later:
        # waking the lane for each of thousands of events would only re-scan the pending
        # set. It wakes at the deadline (or within a second) and drains the queue then.
        if self._wake_on_submit:
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

    def _check_deadline(self, wait: float = 0.0) -> None:
        if self.deadline is not None and time.monotonic() + wait > self.deadline:
            raise _DeadlineExpired

    def stop_now(self, why: str) -> None:
        """If the lane is asked to stop, record ``why`` and stop."""
        if self._stop_requested.is_set():
            self.exit_error = why
            raise _Stopping

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
            self.recover()
            self._schedule_rescan(now=0.0)
            while not self._stop_requested.is_set():
                self.step()
        except _Stopping:
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
        self._drain_inbox()
        if now >= self._next_rescan:
            self._reconcile(now)
        self._check_release()
        self._update_pending_metrics()
        if self._foreign_transaction_open():
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
        return self.publish_pending(reason, now)

    def _wait(self, timeout: float) -> None:
        self.heartbeat()
        if timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()

    def _drain_inbox(self) -> None:
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
            with self._locked():
                result = job.fn()
        except BaseException as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            self.job_running = False
            self.set_status(state="idle", busy_since=None)

    def _locked(self) -> _LockContext:
        return _LockContext(self)

    def _schedule_rescan(self, now: float) -> None:
        self._next_rescan = now

    def _reconcile(self, now: float) -> None:
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

    def _check_release(self) -> None:
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

    def _update_pending_metrics(self) -> None:
        count = len(self.pending) + len(self._guarded)
        self.metrics.pending_changes.labels(self.repo.name).set(count)
        self.set_status(pending=count)

    def _foreign_transaction_open(self) -> bool:
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

    # -- planning ------------------------------------------------------------------------

    def plan(self, now: float) -> tuple[list[Op], dict[str, Pending], Plan]:
        """Ask every source to plan its pending entries; return ops and where each came from."""
        entries = self.pending.take()
        by_source: dict[str, list[Pending]] = {}
        for entry in entries:
            by_source.setdefault(entry.source, []).append(entry)
        ops: list[Op] = []
        origin: dict[str, Pending] = {}
        merged = Plan()
        for source in self.inputs:
            mine = by_source.pop(source.name, [])
            if not mine:
                continue
            plan = source.plan(mine, now)
            for entry in plan.deferred:
                self.pending.put_back(entry)
            for entry in plan.waiting_for_marker:
                self.pending.put_back(replace(entry, held=True))
            for reason, path in plan.skipped:
                self.metrics.skipped.labels(self.repo.name, source.name, reason).inc()
                self.log.warning("input skipped", source=source.name, path=path, reason=reason)
            for aside in plan.set_aside:
                self.metrics.skipped.labels(self.repo.name, source.name, "refused").inc()
                self.state.set_aside(
                    self.repo.name, aside.source, aside.rel_path, aside.reason, None
                )
                self.log.warning(
                    "input set aside", source=source.name, path=aside.rel_path, reason=aside.reason
                )
            source_ops = list(plan.ops)
            if plan.guarded:
                if self._release_granted:
                    source_ops += plan.guarded
                else:
                    known = {held.key for held in self._guarded}
                    for o in plan.guarded:
                        guarded = plan.origin.get(o.repo_path)
                        if guarded is not None and guarded.key not in known:
                            self._guarded.append(guarded)
                            known.add(guarded.key)
                    self.set_hold(
                        f"{source.name}: {plan.guard_reason}",
                        plan.guard_kind or HoldReason.MASS_DELETE,
                    )
            ops += source_ops
            origin.update(plan.origin)
            merged.atomic_groups += plan.atomic_groups
        for leftover in by_source.values():  # a source removed by a reload
            self.log.info(
                "dropping changes of a source no longer configured", changes=len(leftover)
            )
        self._release_granted = False
        if not self._guarded and self._held_reason and "delete" in self._held_reason:
            self.set_hold("")
        return ops, origin, merged

    # -- publishing ----------------------------------------------------------------------

    def publish_pending(self, reason: str, now: float) -> bool:
        """Plan and publish one batch; return True if a revision was published."""
        planning_started = time.monotonic()
        ops, origin, plan = self.plan(now)
        self._timings = {"plan": time.monotonic() - planning_started}
        if not ops:
            return False
        taken, later = cut_to_caps(
            ops, plan.atomic_groups, self.repo.max_batch_files, self.repo.max_batch_bytes
        )
        for op in later:
            if op.repo_path in origin:
                self.pending.put_back(origin[op.repo_path])
        batch = Batch(
            repo=self.repo.name,
            ops=tuple(taken),
            reason=reason,
            first_change_at=min(
                (origin[o.repo_path].first_at for o in taken if o.repo_path in origin), default=now
            ),
            changes=len(taken),
            bytes=sum(o.fingerprint.size for o in taken if o.fingerprint),
        )
        self.metrics.batches.labels(self.repo.name, reason).inc()
        first_seen = {
            o.repo_path: origin[o.repo_path].first_at for o in taken if o.repo_path in origin
        }
        # Counted until the batch returns: a deadline that ends it reports them pending.
        self._in_flight = len(taken)
        try:
            published = self._publish_batch(batch, origin, first_seen)
        finally:
            self.set_status(busy_since=None)
        self._in_flight = 0
        return published

    def _requeue(self, ops: Sequence[Op], origin: dict[str, Pending]) -> None:
        for op in ops:
            entry = origin.get(op.repo_path)
            if entry is not None:
                self.pending.put_back(replace(entry, not_before=0.0))

    def source_of(self, op: Op) -> Input | None:
        """The input an op came from (None if a reload removed it)."""
        for source in self.inputs:
            if source.name == op.source:
                return source
        return None

    def _publish_batch(
        self, batch: Batch, origin: dict[str, Pending], first_seen: dict[str, float]
    ) -> bool:
        started = self.clock()
        self.set_status(state="waiting for repository lock", busy_since=started)
        with self._locked():
            if self.layout.in_transaction():
                # Someone opened a transaction since we looked: never touch it.
                self._requeue(batch.ops, origin)
                return False
            base_revision = self.revision()
            batch_id = self.state.create_batch(
                self.repo.name,
                batch.ops,
                reason=batch.reason,
                summary=batch.summary(),
                first_seen=first_seen,
            )
            self.log.info(
                "batch cut",
                batch=batch_id,
                reason=batch.reason,
                ops=len(batch.ops),
                bytes=batch.bytes,
            )
            work = BatchWork(self, lambda ops: self._requeue(ops, origin))
            ops, prepared = work.prepare(batch_id, list(batch.ops))
            self._timings.update(work.timings)
            if not ops:
                self.state.set_stage(batch_id, Stage.ABORTED, error="nothing left to publish")
                self.abandon(batch_id)
                self._back_off_after_errors(work.errors)
                return False
            if self.layout.in_transaction():
                # A transaction appeared while the objects were written: never touch it.
                self.state.set_stage(batch_id, Stage.ABORTED, error="a foreign transaction opened")
                self.abandon(batch_id)
                self._requeue(ops, origin)
                return False
            transaction = Transaction(self, batch_id)
            if not transaction.open(base_revision):
                self.abandon(batch_id)
                self._requeue(ops, origin)
                return False
            phase = time.monotonic()
            applied = work.place(batch_id, ops, prepared)
            self._timings["place"] = time.monotonic() - phase
            if not applied:
                transaction.abort("nothing could be applied")
                self._back_off_after_errors(work.errors)
                return False
            self._apply_backoff.reset()
            # One commit for the whole batch: a crash before it leaves the stage at "open",
            # and recovery aborts the half-applied transaction anyway.
            done = {op.repo_path for op in applied}
            self.state.mark_applied(
                batch_id, [i for i, op in enumerate(batch.ops) if op.repo_path in done]
            )
            phase = time.monotonic()
            revision = transaction.publish(
                batch.summary(), applied, lambda ops: self._requeue(ops, origin)
            )
            self._timings["publish"] = time.monotonic() - phase
            if revision is None:
                return False
            self._finish(batch_id, applied, revision, first_seen, started)
            return True

    def _back_off_after_errors(self, errors: int) -> None:
        """A persistent error (EIO on an input, ENOSPC in the union directory) must not spin
        batch after batch (or transaction/abort cycles): back off before the next try."""
        if errors:
            self.metrics.retries.labels(self.repo.name, "apply").inc()
            self.pause(self._apply_backoff.next_delay())

    def revision(self) -> int | None:
        try:
            return self.layout.manifest().revision
        except RepositoryConfigError as exc:
            self.log.warning("cannot read the manifest", error=str(exc))
            return None

    def abandon(self, batch_id: int) -> None:
        """Delete the objects an abandoned batch created (never ones it found stored)."""
        created = self.state.created_objects(batch_id)
        if not created:
            return
        if self.preparer is None:
            self.log.error("objects of an abandoned batch cannot be deleted", count=len(created))
            return
        self.preparer.delete_objects(created)
        self.state.forget_created_objects(batch_id)

    def pause(self, delay: float, abort_batch: int | None = None) -> None:
        """Wait for a retry; on stop, abort our open transaction (if any) and stop. A wait
        that would pass the deadline of a one-shot ``sync`` ends it at once."""
        self._check_deadline(delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            self.heartbeat()
            if self._stop_requested.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if abort_batch is not None:
                    Transaction(self, abort_batch).abort("daemon stopping while publish retries")
                raise _Stopping

    def _finish(
        self,
        batch_id: int,
        ops: Sequence[Op],
        revision: int,
        first_seen: dict[str, float],
        started: float,
    ) -> None:
        now = self.clock()
        self.open_batch = None
        self.metrics.transaction_open.labels(self.repo.name).set(0)
        self.state.apply_published(self.repo.name, ops, revision if revision >= 0 else None)
        self.state.forget_created_objects(batch_id)
        by_source: dict[str, list[Op]] = {}
        for op in ops:
            by_source.setdefault(op.source, []).append(op)
        for source in self.inputs:
            if source.name in by_source:
                try:
                    source.published(by_source[source.name])
                except Exception:
                    self.log.exception("post-publish step failed", source=source.name)
        self.state.set_stage(batch_id, Stage.DONE)
        m = self.metrics
        m.publishes.labels(self.repo.name).inc()
        m.publish_duration.labels(self.repo.name).observe(max(0.0, now - started))
        m.last_publish.labels(self.repo.name).set(now)
        if revision >= 0:
            m.revision.labels(self.repo.name).set(revision)
        nbytes = sum(o.fingerprint.size for o in ops if o.fingerprint)
        m.published_bytes.labels(self.repo.name).inc(nbytes)
        m.grafted_files.labels(self.repo.name).inc(sum(1 for o in ops if o.kind is OpKind.GRAFT))
        for op in ops:
            m.drop_latency.labels(self.repo.name).observe(
                max(0.0, now - first_seen.get(op.repo_path, now))
            )
        self.set_status(
            state="idle",
            last_publish_at=now,
            last_revision=revision if revision >= 0 else None,
            transaction_open=False,
            last_error="",
        )
        self.log.info(
            "published",
            batch=batch_id,
            revision=revision,
            ops=len(ops),
            bytes=nbytes,
            seconds=round(now - started, 3),
            **{f"{k}_seconds": round(v, 3) for k, v in self._timings.items()},
        )
        self._timings = {}

    # -- recovery ------------------------------------------------------------------------

    def command_tag(self, batch_id: int) -> str:
        """The tag in the environment of every process of a batch's commands: this state
        directory (two daemons on a host never touch each other's) and the batch."""
        return f"{self._instance}:{batch_id}"

    def _stop_orphans(self, batch_id: int) -> None:
        """Stop every process a killed daemon's command left (found by its tag, in any
        session or group, whatever its name: F7, F8). Never go on beside a live one: while
        one survives, publishing is held and the stop is tried again."""
        backoff = Backoff(self.repo.retry_initial_seconds, self.repo.retry_max_seconds)
        while survivors := stop_tagged(self.command_tag(batch_id)):
            self.set_hold(
                f"a command of batch {batch_id} left by the previous run survives SIGKILL "
                f"(pids {', '.join(map(str, survivors))}); recovery waits for it",
                HoldReason.ORPHANED_COMMAND,
            )
            self.pause(backoff.next_delay())
        if self._held_reason.startswith("a command of batch"):
            self.set_hold("")

    def recover(self) -> None:
        """Finish or roll back what a previous run left, using the journal and the spool."""
        with self._locked():
            self._recover_locked()

    def _recover_locked(self) -> None:
        # Journal and spool are read under the repository lock: a CLI command or another
        # daemon may have finished (or opened) a transaction a moment ago.
        batch = self.state.unfinished_batch(self.repo.name)
        if batch is None:
            return
        self._stop_orphans(batch.id)
        # Only now, with no command of ours left to change it, is the spool's word final.
        in_txn = self.layout.in_transaction()
        self.log.warning(
            "recovering an unfinished batch",
            batch=batch.id,
            stage=batch.stage,
            transaction_open=in_txn,
        )
        revision = self.revision()
        rule = recovery.rule_for(
            batch.stage, in_txn, recovery.revision_advanced(batch.base_revision, revision)
        )
        action = rule.action
        self.log.warning("recovery", batch=batch.id, action=action.value)
        ops = [op for op, _ in self.state.batch_ops(batch.id, applied_only=True)]
        first_seen = {op.repo_path: at for op, at in self.state.batch_ops(batch.id)}
        if action in (Action.MARK_ABORTED, Action.DELETE_PREPARED):
            self.state.set_stage(batch.id, Stage.ABORTED, error=rule.why)
            self.abandon(batch.id)
        elif action is Action.ABORT_OWN:
            self.open_batch = batch.id
            Transaction(self, batch.id).abort(rule.why)
        elif action is Action.MARK_FAILED:
            self.state.set_stage(batch.id, Stage.FAILED, error=rule.why)
            self.abandon(batch.id)
        elif action in (Action.FINISH, Action.ABORT_LEFTOVER_THEN_FINISH):
            self.state.set_stage(batch.id, Stage.PUBLISHED, revision=revision)
            if action is Action.ABORT_LEFTOVER_THEN_FINISH:
                # The publish went through but died before closing the transaction: what
                # is open is ours and holds nothing new; abort it, then finish.
                self.open_batch = batch.id
                Transaction(self, batch.id).abort_leftover()
            final = revision if revision is not None else -1
            self._finish(batch.id, ops, final, first_seen, batch.created_at)
        else:  # PUBLISH_THEN_FINISH: every op is in the open transaction
            self.open_batch = batch.id
            self.metrics.transaction_open.labels(self.repo.name).set(1)
            new_revision = Transaction(self, batch.id).publish(batch.summary, ops, lambda _: None)
            if new_revision is not None:
                self._finish(batch.id, ops, new_revision, first_seen, batch.created_at)

    # -- one-shot mode -----------------------------------------------------------------

    def sync_once(self, timeout: float) -> tuple[bool, str]:
        """Recover, reconcile, publish everything pending; return (in sync, why not).

        Runs in the caller's thread (for ``cvmfs-syncd sync``). ``timeout`` is a deadline
        for everything, retries and waits for locks included: each command gets at most the
        time left plus :data:`DEADLINE_GRACE_SECONDS`. When it expires, our own open
        transaction is aborted if its failure allows, ``deadline_report`` says what is left
        unfinished, and (False, that) is returned.
        """
        self.deadline = time.monotonic() + timeout
        self.deadline_report = ""
        try:
            return self._sync_until_deadline(timeout)
        except _DeadlineExpired:
            self.deadline_report = self._expire()
            return False, self.deadline_report
        finally:
            self.deadline = None

    def _sync_until_deadline(self, timeout: float) -> tuple[bool, str]:
        self.recover()
        self._reconcile(self.clock())
        while True:
            self._check_deadline()
            self._drain_inbox()
            self._check_release()
            if self._foreign_transaction_open():
                return False, "a transaction the daemon did not open is in progress"
            if not len(self.pending):
                leftover = []
                for source in self.inputs:
                    leftover += source.reconcile(self.clock())
                # Everything publishable is live; held deletions keep us out of sync.
                guarded = {entry.key for entry in self._guarded}
                fresh = [h for h in leftover if (h.source, h.rel_path) not in guarded]
                if not fresh:
                    return (False, self._held_reason) if self._guarded else (True, "")
                for hint in fresh:
                    self.pending.add(hint)
            now = self.clock()
            items = self.pending.items()
            if all(p.held for p in items):
                return False, f"{len(items)} inputs wait for their ready marker"
            if not any(p.not_before <= now for p in items if not p.held):
                wait = (self.pending.next_deadline(now) or now) - now
                left = (self.deadline or 0.0) - time.monotonic()
                if wait >= left:
                    return False, (
                        f"not in sync after {timeout:.0f}s ({len(self.pending)} changes pending)"
                    )
                time.sleep(max(wait, 0.01))
                continue
            self.publish_pending("sync", now)

    def _expire(self) -> str:
        """The deadline passed: abort our own transaction where that loses nothing, and
        say which batch is unfinished."""
        self.deadline = None
        batch = self.state.unfinished_batch(self.repo.name)
        if batch is None:
            return (
                f"deadline reached with {len(self.pending) + self._in_flight} changes pending "
                f"({self.status().last_error or 'waiting'}); nothing is left half-done"
            )
        where = f"batch {batch.id} ({batch.summary}) is unfinished at stage {batch.stage}"
        if self.open_batch is not None and self.layout.in_transaction():
            if batch.stage in (Stage.OPEN, Stage.OPENING, Stage.PUBLISHING):
                # Nothing of it is live (a live revision is recorded as published): an
                # abort loses nothing, and the changes are found again by the next run.
                result = self.server.abort(
                    self.repo.name, timeout=60.0, tag=self.command_tag(batch.id)
                )
                if result.outcome in (Outcome.OK, Outcome.NOT_IN_TRANSACTION):
                    self.state.set_stage(batch.id, Stage.ABORTED, error="deadline reached")
                    self.abandon(batch.id)
                    self.transaction_closed()
                    return f"deadline reached; {where}: its transaction was aborted"
                return (
                    f"deadline reached; {where}: its transaction is still open "
                    f"(abort failed: {describe(result)}); the next run finishes it"
                )
            return f"deadline reached; {where}: its transaction is left open for the next run"
        return f"deadline reached; {where}; the next run recovers it"


class _LockContext:
    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def __enter__(self) -> None:
        lane = self.lane
        while not lane.lock.acquire(timeout=5.0, stop=lane._stop_requested):
            if lane._stop_requested.is_set():
                raise _Stopping
            lane._check_deadline()
            lane.log.info("waiting for the repository lock", path=str(lane.lock.path))
            lane.heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.lane.lock.release()
