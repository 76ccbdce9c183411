"""The transaction of one batch: open, publish, abort — with the journal, the
open-transaction gauge and the lane's status kept in step, and the undo of each failure.

Every command goes through :mod:`cvmfs_syncd.cvmfs.server`; what each outcome means and what
is done about it is the table of ``docs/failures.md``. The journal stage is committed
*before* each command runs (``opening`` before ``transaction``, ``publishing`` before
``publish``), so after a crash an open transaction is ours exactly when the journal says so.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.cvmfs.outcomes import CommandResult, Outcome, parse_missing_scope
from cvmfs_syncd.cvmfs.procs import boot_id
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import HoldReason, JournalStage, Op
from cvmfs_syncd.pipeline.confirm import live_revision, publish_message
from cvmfs_syncd.pipeline.scope import parent_scope
from cvmfs_syncd.state import State


class Stopping(Exception):
    """The lane was asked to stop while waiting: raised by ``LaneControl.pause``,
    ``LaneControl.stop_now`` and the lane's wait for the repository lock."""


class LaneControl(Protocol):
    """What a transaction needs from its lane."""

    repo: RepositoryConfig
    config: Config
    server: CvmfsServer
    layout: RepositoryLayout
    state: State
    metrics: Metrics
    log: Any
    open_batch: int | None
    clock: Callable[[], float]

    @property
    def held_reason(self) -> str:
        """The reason publishing is held now ("" when it is not)."""

    def set_status(self, **changes: Any) -> None:
        """Update the lane's status."""

    def set_hold(self, reason: str, kind: HoldReason = HoldReason.MASS_DELETE) -> None:
        """Hold publishing (reason) or lift the hold ("")."""

    def release_delete_hold(self) -> None:
        """Lift a hold after a publish, unless deletions are still held for release."""

    def transaction_opened(self) -> None:
        """Our transaction is open: gauges and status."""

    def transaction_closed(self) -> None:
        """Our transaction is closed: gauges and status."""

    def pause(self, delay: float, abort_batch: int | None = None) -> None:
        """Wait for a retry; on stop, abort ``abort_batch``'s transaction and stop."""

    def stop_now(self, why: str) -> None:
        """If the lane is asked to stop, record ``why`` and stop (raises)."""

    def whitelist_expired(self) -> None:
        """Hold publishing and ask for a resign."""

    def abandon(self, batch_id: int) -> None:
        """Delete the objects an abandoned batch created."""

    def revision(self) -> int | None:
        """The repository's published revision (None if unreadable)."""

    def command_timeout(self, configured: float) -> float:
        """The timeout for a command: ``configured``, or less when a deadline is near."""

    def command_tag(self, batch_id: int) -> str:
        """The tag in the environment of every process of the batch's commands."""


class Transaction:
    """The commands of one batch's transaction."""

    def __init__(self, lane: LaneControl, batch_id: int, *, scope: str | None = None) -> None:
        self.lane = lane
        self.batch_id = batch_id
        #: The lease path of a gateway publisher's transaction (None: the whole repository,
        #: unscoped); it widens to an existing parent when the target does not exist yet.
        self.scope = scope
        #: When the last ``transaction`` command started: a lease granted by it lasts from
        #: no earlier than this.
        self.requested_at = 0.0
        #: Set when publish found the gateway lease expired (the batch is planned again).
        self.lease_expired = False

    def _backoff(self) -> Backoff:
        repo = self.lane.repo
        return Backoff(repo.retry_initial_seconds, repo.retry_max_seconds)

    def _journal_command(self) -> Callable[[int], None]:
        """Return a hook that journals the process group of the batch's running command."""
        boot = boot_id()
        state, batch_id = self.lane.state, self.batch_id

        def record(pgid: int) -> None:
            state.record_command(batch_id, pgid, boot)

        return record

    def _stage(self, stage: JournalStage, **fields: Any) -> None:
        self.lane.state.set_stage(self.batch_id, stage, **fields)

    # -- open ----------------------------------------------------------------------------

    def open(self, base_revision: int | None) -> bool:
        """Open the transaction, retrying with back-off; False if it did not open (then
        the batch is journalled aborted, or was aborted by us)."""
        lane = self.lane
        backoff = self._backoff()
        waiting_since: float | None = None  # waiting for a busy gateway lease since then
        while True:
            # Journal first: after a crash, an open transaction is ours exactly when this says so.
            self._stage(JournalStage.OPENING, base_revision=base_revision, attempt=True)
            lane.open_batch = self.batch_id
            lane.set_status(state="opening transaction")
            self.requested_at = lane.clock()
            result = lane.server.transaction(
                lane.repo.name,
                path=self.scope or None,
                timeout=lane.command_timeout(lane.config.cvmfs.transaction_timeout_seconds),
                on_spawn=self._journal_command(),
                tag=lane.command_tag(self.batch_id),
            )
            if result.outcome is not Outcome.LEASE_BUSY:
                lane.metrics.lease_wait_since.labels(lane.repo.name).set(0)
            if result.outcome is Outcome.OK:
                self._stage(JournalStage.OPEN)
                lane.transaction_opened()
                return True
            if result.outcome is Outcome.TIMEOUT and lane.layout.in_transaction():
                # The killed command may have opened it after all; the journal says it is ours.
                self._stage(JournalStage.OPEN)
                self.abort("transaction command timed out")
                return False
            lane.open_batch = None
            self._stage(JournalStage.ABORTED, error=describe(result))
            if result.outcome is Outcome.ALREADY_IN_TRANSACTION:
                lane.log.warning(
                    "repository already in a transaction the daemon did not open; waiting"
                )
                return False
            missing = parse_missing_scope(result.stdout + result.stderr)
            if result.outcome is Outcome.PATH_SCOPE_MISSING and self.scope and missing:
                # Leased, then refused: the target does not exist yet (gateway.md 1). Lease
                # its nearest existing parent instead; placing creates the target.
                lane.log.info(
                    "lease target does not exist yet; leasing its parent",
                    target=self.scope,
                    parent=parent_scope(missing) or "/",
                )
                self.scope = parent_scope(missing)
                continue
            if result.outcome is Outcome.LEASE_BUSY:
                # Another publisher holds an overlapping lease: contention, not a failure.
                if waiting_since is None:
                    waiting_since = lane.clock()
                    lane.metrics.lease_wait_since.labels(lane.repo.name).set(waiting_since)
                delay = lease_wait(result.lease_time_remaining_s, backoff.next_delay())
                lane.log.info("gateway lease path busy; waiting", retry_in=round(delay, 1))
                lane.set_status(state="waiting for a gateway lease")
                lane.pause(delay)
                if lane.layout.in_transaction():
                    return False
                continue
            if result.outcome is Outcome.WHITELIST_EXPIRED:
                lane.whitelist_expired()
            if result.outcome is Outcome.NOT_MOUNTED:
                # Auto-repair is off and a mount is missing: `mount` repairs (l_stale_mount 40).
                repair_mounts(lane)
            lane.metrics.retries.labels(lane.repo.name, "transaction").inc()
            delay = backoff.next_delay()
            lane.log.warning(
                "opening a transaction failed; retrying",
                outcome=result.outcome.name,
                retry_in=delay,
                message=describe(result),
            )
            lane.set_status(last_error=describe(result))
            lane.pause(delay)
            if lane.layout.in_transaction():
                return False
            # The next attempt goes on in the same journal row (back to "opening").

    # -- publish -------------------------------------------------------------------------

    def publish(
        self, summary: str, applied: list[Op], requeue: Callable[[Sequence[Op]], None]
    ) -> int | None:
        """Publish until it succeeds or the batch must be given up; return the revision
        (-1 if unreadable), or None when the batch was not published (its ops re-queued
        or set aside)."""
        lane = self.lane
        backoff = self._backoff()
        force = False
        while True:
            self._stage(JournalStage.PUBLISHING, attempt=True)
            lane.set_status(state="publishing")
            result = lane.server.publish(
                lane.repo.name,
                message=publish_message(summary, lane.command_tag(self.batch_id)),
                force=force,
                timeout=lane.command_timeout(lane.config.cvmfs.publish_timeout_seconds),
                on_spawn=self._journal_command(),
                tag=lane.command_tag(self.batch_id),
            )
            if result.outcome is Outcome.OK:
                revision = lane.revision()
                self._stage(JournalStage.PUBLISHED, revision=revision)
                lane.release_delete_hold()
                return revision if revision is not None else -1
            base = lane.state.batch(self.batch_id).base_revision
            revision = live_revision(lane, self.batch_id, base)
            if revision is not None:
                # It went live, then failed late (killed at its timeout, a late step died):
                # the batch is published; a leftover transaction holds nothing new.
                lane.log.warning(
                    "publish reported failure after the new revision was live",
                    batch=self.batch_id,
                    revision=revision,
                    message=describe(result),
                )
                self._stage(JournalStage.PUBLISHED, revision=revision)
                if lane.layout.in_transaction():
                    self.abort_leftover()
                return revision
            lane.metrics.publish_failures.labels(lane.repo.name, result.outcome.name.lower()).inc()
            lane.set_status(last_error=describe(result))
            lane.log.warning(
                "publish failed",
                batch=self.batch_id,
                outcome=result.outcome.name,
                message=describe(result),
            )
            if result.outcome is Outcome.OPEN_READERS and not force:
                lane.log.warning(
                    "open read-only descriptors under the repository; publishing with -f",
                    holders=list(result.open_file_holders),
                )
                force = True
                continue
            if result.outcome is Outcome.INVALID_GRAFT:
                self._reject_inputs(result, applied, requeue)
                return None
            if result.outcome is Outcome.LEASE_INVALID:
                # The gateway lease expired (gateway.md 13-15): this transaction can never be
                # published; `abort -f` ends it, and the batch is planned again.
                self.lease_expired = True
                if self.abort("gateway lease expired: " + describe(result)):
                    requeue(applied)
                return None
            if result.outcome in (Outcome.NOT_MOUNTED, Outcome.CANNOT_REPAIR):
                # Recorded: only abort helps a transaction whose union mount vanished (the
                # written files are lost); then `mount` repairs when auto-repair is off.
                self.abort(describe(result))
                repair_mounts(lane)
                requeue(applied)
                return None
            if not lane.layout.in_transaction() or result.outcome is Outcome.NOT_IN_TRANSACTION:
                # Our transaction is gone (aborted by someone): the changes were not published.
                lane.transaction_closed()
                self._stage(JournalStage.FAILED, error="transaction vanished: " + describe(result))
                lane.abandon(self.batch_id)
                requeue(applied)
                return None
            if result.outcome is Outcome.WHITELIST_EXPIRED:
                lane.whitelist_expired()
            # Storage unreachable, open writers, timeouts, unknown failures: the transaction
            # stays open and a later plain publish completes it (recorded); no abort.
            lane.metrics.retries.labels(lane.repo.name, "publish").inc()
            lane.pause(backoff.next_delay(), abort_batch=self.batch_id)

    def _reject_inputs(
        self, result: CommandResult, applied: list[Op], requeue: Callable[[Sequence[Op]], None]
    ) -> None:
        """publish refused an input: abort, set the offender aside, retry the rest."""
        lane = self.lane
        bad = result.invalid_graft_path
        offenders = [op for op in applied if bad and op.repo_path == bad.strip("/")]
        if not self.abort("publish rejected an input: " + describe(result)):
            return
        for op in offenders:
            lane.state.set_aside(
                lane.repo.name,
                op.source,
                op.source_path,
                "rejected by publish: " + describe(result),
                op.fingerprint,
            )
            lane.metrics.skipped.labels(lane.repo.name, op.source, "rejected").inc()
            lane.log.error("input rejected by publish; set aside", path=op.source_path)
        if not offenders:
            lane.log.error(
                "publish rejected the batch and named no input; the batch is held for retry"
            )
        requeue([op for op in applied if op not in offenders])

    # -- abort ---------------------------------------------------------------------------

    def abort(self, why: str) -> bool:
        """Abort the transaction this batch opened; hold the lane while abort fails."""
        lane = self.lane
        backoff = self._backoff()
        while True:
            lane.set_status(state="aborting own transaction")
            result = lane.server.abort(
                lane.repo.name, timeout=_command_timeout(lane), tag=lane.command_tag(self.batch_id)
            )
            if result.outcome in (Outcome.OK, Outcome.NOT_IN_TRANSACTION):
                self._stage(JournalStage.ABORTED, error=why)
                lane.abandon(self.batch_id)
                lane.transaction_closed()
                if lane.held_reason.startswith("abort failed"):
                    lane.set_hold("")
                lane.log.warning("aborted own transaction", batch=self.batch_id, why=why)
                return True
            lane.set_hold(f"abort failed: {describe(result)}", HoldReason.ABORT_FAILED)
            if result.outcome is Outcome.WHITELIST_EXPIRED:
                lane.whitelist_expired()
            lane.metrics.retries.labels(lane.repo.name, "abort").inc()
            lane.stop_now(f"could not abort own transaction: {describe(result)}")
            lane.pause(backoff.next_delay())

    def abort_leftover(self) -> None:
        """Abort a leftover transaction of an already published batch (journal unchanged)."""
        lane = self.lane
        backoff = self._backoff()
        while True:
            result = lane.server.abort(
                lane.repo.name, timeout=_command_timeout(lane), tag=lane.command_tag(self.batch_id)
            )
            if result.outcome in (Outcome.OK, Outcome.NOT_IN_TRANSACTION):
                lane.log.warning(
                    "closed the leftover transaction of a published batch", batch=self.batch_id
                )
                return
            lane.set_hold(f"abort failed: {describe(result)}", HoldReason.ABORT_FAILED)
            lane.metrics.retries.labels(lane.repo.name, "abort").inc()
            lane.pause(backoff.next_delay())


def lease_wait(remaining: float | None, backoff_delay: float) -> float:
    """How long to wait for a busy lease: until the other lease's time is up (it is often
    published or dropped sooner, so at most the back-off delay), with jitter so that
    publishers waiting for one path do not all ask again at once."""
    base = backoff_delay if remaining is None else min(max(remaining, 0.5), backoff_delay)
    return base * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not cryptography)


def _command_timeout(lane: LaneControl) -> float:
    return lane.command_timeout(lane.config.cvmfs.command_timeout_seconds)


def repair_mounts(lane: LaneControl) -> None:
    """Run ``cvmfs_server mount`` (the repair when auto-repair is off)."""
    result = lane.server.mount(
        lane.repo.name, timeout=lane.command_timeout(lane.config.cvmfs.command_timeout_seconds)
    )
    lane.log.warning("repaired repository mounts", outcome=result.outcome.name)


def describe(result: CommandResult) -> str:
    """One line for logs, the journal and /status: outcome, exit code, the reason."""
    reason = result.reason
    if not reason:
        text = (result.stderr.strip() or result.stdout.strip()).splitlines()
        reason = next((line for line in text if line.strip()), "")
    return f"{result.outcome.name.lower()} (exit {result.exit_code}): {reason[:300]}"
