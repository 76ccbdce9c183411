"""Carrying out recovery at start: the batch a previous run left unfinished is finished or
rolled back, as the pure table of :mod:`cvmfs_syncd.pipeline.recovery` says.

Every process a killed daemon's command left running is stopped first (found by the batch
tag in its environment), so that the spool is read only once nothing of ours can change it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.cvmfs.procs import stop_tagged
from cvmfs_syncd.model import HoldReason
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.pipeline import recovery
from cvmfs_syncd.pipeline.batch import BatchCycle
from cvmfs_syncd.pipeline.confirm import live_revision
from cvmfs_syncd.pipeline.leases import release_left_lease
from cvmfs_syncd.pipeline.recovery import RecoveryAction as Action
from cvmfs_syncd.pipeline.transaction import LaneControl, Transaction


class RecoveryControl(LaneControl, Protocol):
    """What recovery needs from its lane."""

    def locked(self) -> AbstractContextManager[None]:
        """Hold the host-wide repository lock (waiting for it, heartbeat and stop kept)."""


class Recovery:
    """Finish or roll back the unfinished batch of a previous run of ``lane``; ``batches``
    finishes a batch found published, and deletes the objects of one given up."""

    def __init__(self, lane: RecoveryControl, batches: BatchCycle) -> None:
        self.lane = lane
        self.batches = batches

    def recover(self) -> None:
        """Finish or roll back what a previous run left, using the journal and the spool."""
        with self.lane.locked():
            self._recover_locked()

    def _stop_orphans(self, batch_id: int) -> None:
        """Stop every process a killed daemon's command left (found by its tag, in any
        session or group, whatever its name: F7, F8). Never go on beside a live one: while
        one survives, publishing is held and the stop is tried again."""
        lane = self.lane
        backoff = Backoff(lane.repo.retry_initial_seconds, lane.repo.retry_max_seconds)
        while survivors := stop_tagged(lane.command_tag(batch_id)):
            lane.set_hold(
                f"a command of batch {batch_id} left by the previous run survives SIGKILL "
                f"(pids {', '.join(map(str, survivors))}); recovery waits for it",
                HoldReason.ORPHANED_COMMAND,
            )
            lane.pause(backoff.next_delay())
        if lane.held_reason.startswith("a command of batch"):
            lane.set_hold("")

    def _recover_locked(self) -> None:
        lane = self.lane
        # Journal and spool are read under the repository lock: a CLI command or another
        # daemon may have finished (or opened) a transaction a moment ago.
        batch = lane.state.unfinished_batch(lane.repo.name)
        if batch is None:
            return
        self._stop_orphans(batch.id)
        # Only now, with no command of ours left to change it, is the spool's word final.
        in_txn = lane.layout.in_transaction()
        if not in_txn:
            # Killed between the lease and the local transaction: drop what the gateway holds.
            release_left_lease(lane.layout, lane.config.cvmfs.config_dir)
        lane.log.warning(
            "recovering an unfinished batch",
            batch=batch.id,
            stage=batch.stage,
            transaction_open=in_txn,
        )
        revision = lane.revision()
        # Past the base and, behind a gateway, carrying this batch (pipeline/confirm.py).
        live = live_revision(lane, batch.id, batch.base_revision) is not None
        rule = recovery.rule_for(batch.stage, in_txn, live)
        action = rule.action
        lane.log.warning("recovery", batch=batch.id, action=action.value)
        ops = [op for op, _ in lane.state.batch_ops(batch.id, applied_only=True)]
        first_seen = {op.repo_path: at for op, at in lane.state.batch_ops(batch.id)}
        if action in (Action.MARK_ABORTED, Action.DELETE_PREPARED):
            lane.state.set_stage(batch.id, Stage.ABORTED, error=rule.why)
            self.batches.abandon(batch.id)
        elif action is Action.ABORT_OWN:
            lane.open_batch = batch.id
            Transaction(lane, batch.id).abort(rule.why)
        elif action is Action.MARK_FAILED:
            lane.state.set_stage(batch.id, Stage.FAILED, error=rule.why)
            self.batches.abandon(batch.id)
        elif action in (Action.FINISH, Action.ABORT_LEFTOVER_THEN_FINISH):
            lane.state.set_stage(batch.id, Stage.PUBLISHED, revision=revision)
            if action is Action.ABORT_LEFTOVER_THEN_FINISH:
                # The publish went through but died before closing the transaction: what
                # is open is ours and holds nothing new; abort it, then finish.
                lane.open_batch = batch.id
                Transaction(lane, batch.id).abort_leftover()
            final = revision if revision is not None else -1
            self.batches.finish(batch.id, ops, final, first_seen, batch.created_at)
        else:  # PUBLISH_THEN_FINISH: every op is in the open transaction
            lane.open_batch = batch.id
            lane.metrics.transaction_open.labels(lane.repo.name).set(1)
            new_revision = Transaction(lane, batch.id).publish(batch.summary, ops, lambda _: None)
            if new_revision is not None:
                self.batches.finish(batch.id, ops, new_revision, first_seen, batch.created_at)
