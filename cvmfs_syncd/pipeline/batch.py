"""The cycle of one batch, as the lane runs it: plan the pending changes, cut them to the
caps, journal the batch under the repository lock, prepare its objects, open the
transaction, place the ops, publish, and finish (index, sources, metrics).

What each step does is owned by its own module (:mod:`~cvmfs_syncd.pipeline.place`,
:mod:`~cvmfs_syncd.pipeline.transaction`); this one strings them together, sends back to
pending what cannot go in this batch, and backs off when inputs keep failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.batching import Pending, PendingChanges
from cvmfs_syncd.model import Batch, HoldReason, Op, OpKind
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.pipeline.budget import PublishCost, fits_lease, lease_length, too_big
from cvmfs_syncd.pipeline.ingest import Ingests
from cvmfs_syncd.pipeline.leases import read_lease_expiry
from cvmfs_syncd.pipeline.place import BatchWork, WorkControl
from cvmfs_syncd.pipeline.scope import cut_to_scope
from cvmfs_syncd.pipeline.transaction import LaneControl, Transaction
from cvmfs_syncd.planner import Input, Plan, cut_to_caps, op_weight


class BatchControl(LaneControl, WorkControl, Protocol):
    """What the batch cycle needs from its lane."""

    pending: PendingChanges
    inputs: list[Input]
    clock: Callable[[], float]

    @property
    def release_granted(self) -> bool:
        """True when an operator released the held deletions since the last plan."""

    def guard(self, entries: Sequence[Pending], reason: str, kind: HoldReason) -> None:
        """Hold ``entries`` (deletions the guard withheld) until an operator's release."""

    def after_plan(self) -> None:
        """A plan was made: a release is used up, a deletion hold with nothing left lifts."""

    def locked(self) -> AbstractContextManager[None]:
        """Hold the host-wide repository lock (waiting for it, heartbeat and stop kept)."""


class BatchCycle:
    """Plan and publish the lane's batches, one at a time, in the lane's thread."""

    def __init__(self, lane: BatchControl) -> None:
        self.lane = lane
        #: Changes of the batch being published (a deadline that ends it reports them).
        self.in_flight = 0
        self._timings: dict[str, float] = {}
        #: Expected place + publish time, learned from this host's batches.
        self.cost = PublishCost()
        #: The gateway's lease length, once read from a granted lease.
        self.lease_seconds: float | None = None
        repo = lane.repo
        self._apply_backoff = Backoff(repo.retry_initial_seconds, repo.retry_max_seconds)
        #: Tarball drops: each one an ingest (a revision) of its own.
        self.ingests = Ingests(lane)

    # -- planning ------------------------------------------------------------------------

    def plan(self, now: float) -> tuple[list[Op], dict[str, Pending], Plan]:
        """Ask every source to plan its pending entries; return ops and where each came from."""
        lane = self.lane
        entries = lane.pending.take()
        by_source: dict[str, list[Pending]] = {}
        for entry in entries:
            by_source.setdefault(entry.source, []).append(entry)
        ops: list[Op] = []
        origin: dict[str, Pending] = {}
        merged = Plan()
        for source in lane.inputs:
            mine = by_source.pop(source.name, [])
            if not mine:
                continue
            plan = source.plan(mine, now)
            for entry in plan.deferred:
                lane.pending.put_back(entry)
            for entry in plan.waiting_for_marker:
                lane.pending.put_back(replace(entry, held=True))
            for reason, path in plan.skipped:
                lane.metrics.skipped.labels(lane.repo.name, source.name, reason).inc()
                lane.log.warning("input skipped", source=source.name, path=path, reason=reason)
            for aside in plan.set_aside:
                lane.metrics.skipped.labels(lane.repo.name, source.name, "refused").inc()
                if aside.refusal:
                    lane.metrics.ingest_refused.labels(lane.repo.name, aside.refusal).inc()
                lane.state.set_aside(
                    lane.repo.name, aside.source, aside.rel_path, aside.reason, None
                )
                lane.log.warning(
                    "input set aside", source=source.name, path=aside.rel_path, reason=aside.reason
                )
            source_ops = list(plan.ops)
            if plan.guarded:
                if lane.release_granted:
                    source_ops += plan.guarded
                else:
                    lane.guard(
                        [
                            plan.origin[o.repo_path]
                            for o in plan.guarded
                            if o.repo_path in plan.origin
                        ],
                        f"{source.name}: {plan.guard_reason}",
                        plan.guard_kind or HoldReason.MASS_DELETE,
                    )
            ops += source_ops
            origin.update(plan.origin)
            merged.atomic_groups += plan.atomic_groups
        for leftover in by_source.values():  # a source removed by a reload
            lane.log.info(
                "dropping changes of a source no longer configured", changes=len(leftover)
            )
        lane.after_plan()
        return ops, origin, merged

    # -- publishing ----------------------------------------------------------------------

    def publish_pending(self, reason: str, now: float) -> bool:
        """Plan and publish one batch; return True if a revision was published."""
        lane = self.lane
        planning_started = time.monotonic()
        ops, origin, plan = self.plan(now)
        self._timings = {"plan": time.monotonic() - planning_started}
        ingests = [op for op in ops if op.kind is OpKind.INGEST]
        if ingests:
            ops = [op for op in ops if op.kind is not OpKind.INGEST]
            # One ingest per cycle, after the other changes: the rest wait in pending.
            self._requeue(ingests if ops else ingests[1:], origin)
            if not ops:
                return self._ingest(ingests[0], origin, reason)
        if not ops:
            return False
        fits = None
        if lane.layout.gateway_url is not None:
            lease = self.lease_seconds or lane.config.cvmfs.lease_seconds
            ops = self._refuse_too_big(ops, lease)
            fits = fits_lease(self.cost, lease)
            if not ops:
                return False
        taken, later = cut_to_caps(
            ops, plan.atomic_groups, lane.repo.max_batch_files, lane.repo.max_batch_bytes, fits
        )
        scope: str | None = None
        if lane.layout.gateway_url is not None:
            # One lease per batch: nothing outside the leased path may be placed.
            scope, taken, outside = cut_to_scope(taken, self._targets())
            later = [*later, *outside]
        for op in later:
            if op.repo_path in origin:
                lane.pending.put_back(origin[op.repo_path])
        batch = Batch(
            repo=lane.repo.name,
            ops=tuple(taken),
            reason=reason,
            first_change_at=min(
                (origin[o.repo_path].first_at for o in taken if o.repo_path in origin), default=now
            ),
            changes=len(taken),
            bytes=sum(o.fingerprint.size for o in taken if o.fingerprint),
        )
        lane.metrics.batches.labels(lane.repo.name, reason).inc()
        first_seen = {
            o.repo_path: origin[o.repo_path].first_at for o in taken if o.repo_path in origin
        }
        # Counted until the batch returns: a deadline that ends it reports them pending.
        self.in_flight = len(taken)
        try:
            published = self._publish_batch(batch, origin, first_seen, scope)
        finally:
            lane.set_status(busy_since=None)
        self.in_flight = 0
        return published

    def _ingest(self, op: Op, origin: dict[str, Pending], reason: str) -> bool:
        """Publish one tarball drop (its own revision, never inside our transaction)."""
        entry = origin.get(op.repo_path)
        if entry is None:
            return False
        self.lane.metrics.batches.labels(self.lane.repo.name, reason).inc()
        self.in_flight = 1
        try:
            return self.ingests.publish(op, entry, reason)
        finally:
            self.in_flight = 0

    def _requeue(self, ops: Sequence[Op], origin: dict[str, Pending]) -> None:
        for op in ops:
            entry = origin.get(op.repo_path)
            if entry is not None:
                self.lane.pending.put_back(replace(entry, not_before=0.0))

    def _refuse_too_big(self, ops: list[Op], lease: float) -> list[Op]:
        """Set aside the files whose place + publish alone would outlast half a lease."""
        lane = self.lane
        refused = too_big(ops, self.cost, lease)
        for op in refused:
            expected = self.cost.estimate(1, op_weight(op))
            lane.state.set_aside(
                lane.repo.name,
                op.source,
                op.source_path,
                f"cannot fit a gateway lease: publishing it is expected to take {expected:.0f} s,"
                f" more than half of a {lease:.0f} s lease (raise the gateway's max_lease_time)",
                op.fingerprint,
            )
            lane.metrics.skipped.labels(lane.repo.name, op.source, "lease").inc()
            lane.log.error("input cannot fit a gateway lease; set aside", path=op.source_path)
        return [op for op in ops if op not in refused]

    def _learn_lease(self, scope: str | None, granted_at: float) -> None:
        """Read our new lease's expiry; remember the lease length, show the lease."""
        lane = self.lane
        expires = read_lease_expiry(lane.layout, scope or "")
        self.lease_seconds = lease_length(granted_at, expires, lane.config.cvmfs.lease_seconds)
        lane.set_status(lease={"path": scope or "/", "expires_at": expires})

    def _targets(self) -> dict[str, str]:
        """Each source's target as a repository path."""
        repo = self.lane.repo
        targets = {source.name: repo_path(source.target, "") for source in repo.staging}
        targets.update({source.name: repo_path(source.target, "") for source in repo.s3})
        return targets

    def _publish_batch(
        self,
        batch: Batch,
        origin: dict[str, Pending],
        first_seen: dict[str, float],
        scope: str | None = None,
    ) -> bool:
        lane = self.lane
        started = lane.clock()
        lane.set_status(state="waiting for repository lock", busy_since=started)
        with lane.locked():
            if lane.layout.in_transaction():
                # Someone opened a transaction since we looked: never touch it.
                self._requeue(batch.ops, origin)
                return False
            base_revision = lane.revision()
            batch_id = lane.state.create_batch(
                lane.repo.name,
                batch.ops,
                reason=batch.reason,
                summary=batch.summary(),
                first_seen=first_seen,
            )
            lane.log.info(
                "batch cut",
                batch=batch_id,
                reason=batch.reason,
                ops=len(batch.ops),
                bytes=batch.bytes,
            )
            work = BatchWork(lane, lambda ops: self._requeue(ops, origin))
            ops, prepared = work.prepare(batch_id, list(batch.ops))
            self._timings.update(work.timings)
            if not ops:
                lane.state.set_stage(batch_id, Stage.ABORTED, error="nothing left to publish")
                self.abandon(batch_id)
                self._back_off_after_errors(work.errors)
                return False
            if lane.layout.in_transaction():
                # A transaction appeared while the objects were written: never touch it.
                lane.state.set_stage(batch_id, Stage.ABORTED, error="a foreign transaction opened")
                self.abandon(batch_id)
                self._requeue(ops, origin)
                return False
            transaction = Transaction(lane, batch_id, scope=scope)
            if not transaction.open(base_revision):
                self.abandon(batch_id)
                self._requeue(ops, origin)
                return False
            if lane.layout.gateway_url is not None:
                self._learn_lease(transaction.scope, transaction.requested_at)
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
            lane.state.mark_applied(
                batch_id, [i for i, op in enumerate(batch.ops) if op.repo_path in done]
            )
            phase = time.monotonic()
            revision = transaction.publish(
                batch.summary(), applied, lambda ops: self._requeue(ops, origin)
            )
            self._timings["publish"] = time.monotonic() - phase
            lane.set_status(lease=None)
            if transaction.lease_expired:
                self.cost.outlasted()  # the batch is planned again: smaller
            if revision is None:
                return False
            # Only a publish that went through measures what a batch costs (a failed one
            # may have waited out a dead endpoint or an expired lease).
            self.cost.observe(
                len(applied),
                sum(op_weight(op) for op in applied),
                self._timings["place"] + self._timings["publish"],
            )
            self.finish(batch_id, applied, revision, first_seen, started)
            return True

    def _back_off_after_errors(self, errors: int) -> None:
        """A persistent error (EIO on an input, ENOSPC in the union directory) must not spin
        batch after batch (or transaction/abort cycles): back off before the next try."""
        if errors:
            self.lane.metrics.retries.labels(self.lane.repo.name, "apply").inc()
            self.lane.pause(self._apply_backoff.next_delay())

    def abandon(self, batch_id: int) -> None:
        """Delete the objects an abandoned batch created (never ones it found stored)."""
        lane = self.lane
        created = lane.state.created_objects(batch_id)
        if not created:
            return
        if lane.preparer is None:
            lane.log.error("objects of an abandoned batch cannot be deleted", count=len(created))
            return
        lane.preparer.delete_objects(created)
        lane.state.forget_created_objects(batch_id)

    def finish(
        self,
        batch_id: int,
        ops: Sequence[Op],
        revision: int,
        first_seen: dict[str, float],
        started: float,
    ) -> None:
        """A batch is published (``revision``, -1 if unreadable): record what is live, tell
        the sources, mark the journal done, count it and log the one summary line.

        A tarball drop is recorded only by a run that holds its Manifest: one found here
        (a restart finishing an unpacked drop's publish) stays pending, and its next run
        finds it live and records it without a new revision."""
        lane = self.lane
        now = lane.clock()
        lane.open_batch = None
        lane.metrics.transaction_open.labels(lane.repo.name).set(0)
        ops = [op for op in ops if op.kind is not OpKind.INGEST]
        lane.state.apply_published(lane.repo.name, ops, revision if revision >= 0 else None)
        lane.state.forget_created_objects(batch_id)
        by_source: dict[str, list[Op]] = {}
        for op in ops:
            by_source.setdefault(op.source, []).append(op)
        for source in lane.inputs:
            if source.name in by_source:
                try:
                    source.published(by_source[source.name])
                except Exception:
                    lane.log.exception("post-publish step failed", source=source.name)
        lane.state.set_stage(batch_id, Stage.DONE)
        m = lane.metrics
        m.publishes.labels(lane.repo.name).inc()
        m.publish_duration.labels(lane.repo.name).observe(max(0.0, now - started))
        m.last_publish.labels(lane.repo.name).set(now)
        if revision >= 0:
            m.revision.labels(lane.repo.name).set(revision)
        nbytes = sum(o.fingerprint.size for o in ops if o.fingerprint)
        m.published_bytes.labels(lane.repo.name).inc(nbytes)
        m.grafted_files.labels(lane.repo.name).inc(sum(1 for o in ops if o.kind is OpKind.GRAFT))
        for op in ops:
            m.drop_latency.labels(lane.repo.name).observe(
                max(0.0, now - first_seen.get(op.repo_path, now))
            )
        lane.set_status(
            state="idle",
            last_publish_at=now,
            last_revision=revision if revision >= 0 else None,
            transaction_open=False,
            last_error="",
        )
        lane.log.info(
            "published",
            batch=batch_id,
            revision=revision,
            ops=len(ops),
            bytes=nbytes,
            seconds=round(now - started, 3),
            **{f"{k}_seconds": round(v, 3) for k, v in self._timings.items()},
        )
        self._timings = {}
