"""``cvmfs-syncd sync``: recover, reconcile and publish everything pending, in the caller's
thread, within the deadline of ``--timeout``.

The deadline bounds everything, retries and waits for the lock included: the lane gives
each command at most the time left plus :data:`DEADLINE_GRACE_SECONDS`, and a wait that
would pass it raises :class:`DeadlineExpired`. Then our own open transaction is aborted
where that loses nothing, and the answer says what is left unfinished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from cvmfs_syncd.batching import Pending, PendingChanges
from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.model import LaneStatus
from cvmfs_syncd.pipeline.batch import BatchCycle
from cvmfs_syncd.pipeline.restart import Recovery
from cvmfs_syncd.pipeline.transaction import LaneControl, Stopping, describe
from cvmfs_syncd.planner import Input

#: A command started near a deadline may run this much past it (a short command must not
#: be killed for being a moment late; a hanging one is killed and recovered like F9).
DEADLINE_GRACE_SECONDS = 5.0


class DeadlineExpired(Stopping):
    """A one-shot ``sync`` ran out of time (``--timeout``)."""


class SyncControl(LaneControl, Protocol):
    """What a one-shot sync needs from its lane."""

    pending: PendingChanges
    inputs: list[Input]
    clock: Callable[[], float]
    #: ``time.monotonic()`` by which the sync must end (None: no deadline).
    deadline: float | None
    #: Set when the deadline ended a sync: what was left unfinished.
    deadline_report: str

    @property
    def guarded(self) -> Sequence[Pending]:
        """The deletions held until an operator's release."""

    def status(self) -> LaneStatus:
        """A copy of what the lane is doing."""

    def reconcile(self, now: float) -> None:
        """Compare every input with what is live; add what differs to pending."""

    def drain_inbox(self) -> None:
        """Take the queued hints into pending and run the queued jobs."""

    def check_release(self) -> None:
        """Take an operator's release of the held deletions, if one was asked for."""

    def foreign_transaction_open(self) -> bool:
        """True while a transaction the daemon did not open is in progress."""

    def check_deadline(self, wait: float = 0.0) -> None:
        """Raise :class:`DeadlineExpired` if waiting ``wait`` seconds would pass the deadline."""


class OneShotSync:
    """The ``sync`` of one lane: ``recovery`` runs first, ``batches`` publishes."""

    def __init__(self, lane: SyncControl, recovery: Recovery, batches: BatchCycle) -> None:
        self.lane = lane
        self.recovery = recovery
        self.batches = batches

    def sync_once(self, timeout: float) -> tuple[bool, str]:
        """Recover, reconcile, publish everything pending; return (in sync, why not).

        Runs in the caller's thread (for ``cvmfs-syncd sync``). ``timeout`` is a deadline
        for everything, retries and waits for locks included: each command gets at most the
        time left plus :data:`DEADLINE_GRACE_SECONDS`. When it expires, our own open
        transaction is aborted if its failure allows, the lane's ``deadline_report`` says
        what is left unfinished, and (False, that) is returned.
        """
        lane = self.lane
        lane.deadline = time.monotonic() + timeout
        lane.deadline_report = ""
        try:
            return self._sync_until_deadline(timeout)
        except DeadlineExpired:
            lane.deadline_report = self._expire()
            return False, lane.deadline_report
        finally:
            lane.deadline = None

    def _sync_until_deadline(self, timeout: float) -> tuple[bool, str]:
        lane = self.lane
        self.recovery.recover()
        lane.reconcile(lane.clock())
        while True:
            lane.check_deadline()
            lane.drain_inbox()
            lane.check_release()
            if lane.foreign_transaction_open():
                return False, "a transaction the daemon did not open is in progress"
            if not len(lane.pending):
                leftover = []
                for source in lane.inputs:
                    leftover += source.reconcile(lane.clock())
                # Everything publishable is live; held deletions keep us out of sync.
                guarded = {entry.key for entry in lane.guarded}
                fresh = [h for h in leftover if (h.source, h.rel_path) not in guarded]
                if not fresh:
                    return (False, lane.held_reason) if lane.guarded else (True, "")
                for hint in fresh:
                    lane.pending.add(hint)
            now = lane.clock()
            items = lane.pending.items()
            if all(p.held for p in items):
                return False, f"{len(items)} inputs wait for their ready marker"
            if not any(p.not_before <= now for p in items if not p.held):
                wait = (lane.pending.next_deadline(now) or now) - now
                left = (lane.deadline or 0.0) - time.monotonic()
                if wait >= left:
                    return False, (
                        f"not in sync after {timeout:.0f}s ({len(lane.pending)} changes pending)"
                    )
                time.sleep(max(wait, 0.01))
                continue
            self.batches.publish_pending("sync", now)

    def _expire(self) -> str:
        """The deadline passed: abort our own transaction where that loses nothing, and
        say which batch is unfinished."""
        lane = self.lane
        lane.deadline = None
        batch = lane.state.unfinished_batch(lane.repo.name)
        if batch is None:
            return (
                f"deadline reached with {len(lane.pending) + self.batches.in_flight} changes "
                f"pending ({lane.status().last_error or 'waiting'}); nothing is left half-done"
            )
        where = f"batch {batch.id} ({batch.summary}) is unfinished at stage {batch.stage}"
        if lane.open_batch is not None and lane.layout.in_transaction():
            if batch.stage in (Stage.OPEN, Stage.OPENING, Stage.PUBLISHING):
                # Nothing of it is live (a live revision is recorded as published): an
                # abort loses nothing, and the changes are found again by the next run.
                result = lane.server.abort(
                    lane.repo.name, timeout=60.0, tag=lane.command_tag(batch.id)
                )
                if result.outcome in (Outcome.OK, Outcome.NOT_IN_TRANSACTION):
                    lane.state.set_stage(batch.id, Stage.ABORTED, error="deadline reached")
                    self.batches.abandon(batch.id)
                    lane.transaction_closed()
                    return f"deadline reached; {where}: its transaction was aborted"
                return (
                    f"deadline reached; {where}: its transaction is still open "
                    f"(abort failed: {describe(result)}); the next run finishes it"
                )
            return f"deadline reached; {where}: its transaction is left open for the next run"
        return f"deadline reached; {where}; the next run recovers it"
