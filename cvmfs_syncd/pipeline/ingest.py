"""One tarball drop published in the lane: checked, compared with what is live, ingested
(or unpacked into a transaction), recorded.

The archive is read twice, never staged on local disk: first by
:func:`~cvmfs_syncd.ingest.check_archive` (a refusal sets it aside, counted and shown in
``/status``), then by :func:`~cvmfs_syncd.ingest.emit_plain_tar` writing the only tar
``cvmfs_server ingest`` ever reads straight into its standard input. Before the command,
what is live under the base is read from the repository's union directory: equal to the
archive, the drop is recorded without a revision (this is what makes a run after a crash
publish nothing twice); otherwise the replacement is planned
(:func:`~cvmfs_syncd.ingest.plan_replacement`). One ``ingest`` call makes it when it can;
otherwise (a path changes type, an argument the tool's shell would garble, deletions on a
gateway repository) a transaction is opened and the archive unpacked into it
(:mod:`cvmfs_syncd.pipeline.unpack`).

Journal: ``planned``, then ``ingesting`` before the command runs (its process group
journalled and its processes tagged like a batch's, so a restart stops what a killed
daemon left and aborts the transaction it held), ``published``, ``done``; the
transaction path moves through a batch's stages. Every ingest is a revision of its own,
never run while a transaction is open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.batching import Pending, PendingChanges
from cvmfs_syncd.config import S3Config, StagingConfig
from cvmfs_syncd.cvmfs.feed import Feed
from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.procs import boot_id
from cvmfs_syncd.errors import CvmfsCommandError, UnsafeName
from cvmfs_syncd.ingest import (
    ArchiveChanged,
    Compression,
    IngestError,
    Manifest,
    ReplacePlan,
    already_live,
    check_archive,
    emit_plain_tar,
    live_types,
    plan_replacement,
    tarball_compression,
)
from cvmfs_syncd.model import Batch, Op
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.pipeline.place import WorkControl
from cvmfs_syncd.pipeline.prepare import Content
from cvmfs_syncd.pipeline.transaction import LaneControl, Transaction, describe
from cvmfs_syncd.pipeline.unpack import live_tree, unpack
from cvmfs_syncd.planner import Applied, ApplyOutcome, Input
from cvmfs_syncd.sources.drops import ingest_limits

#: How often the bytes fed to ``ingest`` are copied into the lane's status.
_PROGRESS_SECONDS = 0.5
#: The refusal code (``cvmfs_syncd_ingest_refused_total{reason}``) of what ``ingest``
#: itself refused although the check had passed the archive.
_TOOL_REFUSALS = {
    Outcome.ARCHIVE_UNREADABLE: "unreadable",
    Outcome.ARCHIVE_HARDLINK_OUTSIDE: "hardlink-target",
}


class IngestControl(LaneControl, WorkControl, Protocol):
    """What publishing a tarball drop needs from its lane."""

    pending: PendingChanges
    clock: Callable[[], float]

    def locked(self) -> AbstractContextManager[None]:
        """Hold the host-wide repository lock (waiting for it, heartbeat and stop kept)."""


GATEWAY_INGEST_REFUSED = (
    "tarball ingest through a repository gateway is not recorded, so it is not done: "
    'use tarballs = "files" on a gateway publisher'
)


class _Reopened(IngestError):
    """The second read could not open the archive (it changed, vanished or was refused)."""

    def __init__(self, applied: Applied) -> None:
        self.applied = applied
        super().__init__(f"the archive cannot be read again ({applied.outcome.value})")


class _Beating:
    """An archive being read in the lane's thread: the lane's heartbeat goes on."""

    def __init__(self, content: Content, heartbeat: Callable[[], None]) -> None:
        self._content = content
        self._heartbeat = heartbeat

    def read(self, size: int = -1, /) -> bytes:
        self._heartbeat()
        return self._content.read(size)


class _Counted:
    """The command's stdin, counting what is written into the lane's status."""

    def __init__(self, out: Feed, report: Callable[[int], None]) -> None:
        self._out = out
        self._report = report
        self._reported_at = time.monotonic()

    def write(self, data: bytes) -> int:
        written = self._out.write(data)
        if time.monotonic() - self._reported_at >= _PROGRESS_SECONDS:
            self._reported_at = time.monotonic()
            self._report(self._out.fed)
        return written


class Ingests:
    """Publish the lane's tarball drops, one at a time, each in a revision of its own."""

    def __init__(self, lane: IngestControl) -> None:
        self.lane = lane
        repo = lane.repo
        self._backoff = Backoff(repo.retry_initial_seconds, repo.retry_max_seconds)

    # -- the run -------------------------------------------------------------------------

    def publish(self, op: Op, entry: Pending, reason: str) -> bool:
        """Publish the tarball drop ``op`` (planned from the pending ``entry``); return True
        if its content is live now (published, or found live already)."""
        lane = self.lane
        source = lane.source_of(op)
        settings = self._settings(op)
        if source is None or settings is None or op.fingerprint is None:
            return False
        if lane.layout.gateway_url is not None:
            # check-config refuses this too; a server.conf changed under a running daemon.
            self._refuse(op, "gateway", GATEWAY_INGEST_REFUSED)
            return False
        started = lane.clock()
        lane.set_status(state="waiting for repository lock", busy_since=started)
        try:
            with lane.locked():
                if lane.layout.in_transaction():
                    # Someone opened a transaction since we looked: never touch it.
                    self._requeue(entry)
                    return False
                return self._run(op, entry, source, settings, reason, started)
        finally:
            lane.set_status(
                busy_since=None,
                ingesting="",
                ingest_members=0,
                ingest_content_bytes=0,
                ingest_fed_bytes=0,
            )

    def _settings(self, op: Op) -> StagingConfig | S3Config | None:
        configs: list[StagingConfig | S3Config] = [*self.lane.repo.staging, *self.lane.repo.s3]
        return next((config for config in configs if config.name == op.source), None)

    def _run(
        self,
        op: Op,
        entry: Pending,
        source: Input,
        settings: StagingConfig | S3Config,
        reason: str,
        started: float,
    ) -> bool:
        lane = self.lane
        lane.set_status(state="checking a tarball", ingesting=op.source_path)
        manifest = self._check(op, entry, source, settings)
        if manifest is None:
            return False
        lane.set_status(
            state="comparing a tarball with what is live",
            ingest_members=manifest.member_count,
            ingest_content_bytes=manifest.total_bytes,
        )
        try:
            live = live_tree(self.lane.layout.union_dir, op.repo_path, self.lane.heartbeat)
        except OSError as exc:
            lane.log.warning("reading what is live failed", base=op.repo_path, error=str(exc))
            self._retry_later(entry)
            return False
        if already_live(manifest, live):
            self._record(op, manifest, lane.revision())
            lane.log.info(
                "tarball already live; recorded without a new revision",
                source=op.source,
                tarball=op.source_path,
                base=op.repo_path,
            )
            return True
        plan = plan_replacement(op.repo_path, manifest.entries(), live_types(manifest, live))
        batch = Batch(lane.repo.name, (op,), reason, entry.first_at, 1, manifest.total_bytes)
        batch_id = lane.state.create_batch(
            lane.repo.name,
            batch.ops,
            reason=reason,
            summary=batch.summary(),
            first_seen={op.repo_path: entry.first_at},
        )
        lane.log.info(
            "ingest cut",
            batch=batch_id,
            tarball=op.source_path,
            base=op.repo_path,
            members=manifest.member_count,
            bytes=manifest.total_bytes,
            deletes=len(plan.deletes),
            transaction=not plan.fits_one_ingest(gateway=self._gateway()),
        )
        if plan.fits_one_ingest(gateway=self._gateway()):
            revision = self._ingest(batch_id, op, entry, source, settings, manifest, plan)
        else:
            revision = self._unpack(batch_id, op, entry, source, settings, manifest, plan)
        if revision is None:
            return False
        self._backoff.reset()
        self._finish(batch_id, op, entry, manifest, revision, started)
        return True

    def _gateway(self) -> bool:
        return self.lane.layout.storage_type == "gw"

    # -- the first read ------------------------------------------------------------------

    def _open(self, op: Op, entry: Pending, source: Input) -> Content | None:
        """Open the archive (pinned to its planned version), or handle why it cannot be."""
        try:
            opened = source.open_content(op)
        except OSError as exc:
            self.lane.log.warning(
                "opening a tarball failed", tarball=op.source_path, error=str(exc)
            )
            self._retry_later(entry)
            return None
        if isinstance(opened, Applied):
            self._not_read(op, entry, opened)
            return None
        return opened

    def _check(
        self, op: Op, entry: Pending, source: Input, settings: StagingConfig | S3Config
    ) -> Manifest | None:
        """Read the archive once and return its Manifest, or None when it was refused (set
        aside), changed (re-queued) or could not be read (re-queued with back-off)."""
        fp = op.fingerprint
        assert fp is not None  # noqa: S101 (checked by the caller)
        opened = self._open(op, entry, source)
        if opened is None:
            return None
        try:
            checked = check_archive(
                _Beating(opened, self.lane.heartbeat),
                ingest_limits(settings),
                compression=_compression(op),
            )
            size = checked.archive_bytes if isinstance(checked, Manifest) else fp.size
            unchanged = opened.unchanged(size)
        except IngestError as exc:
            self.lane.log.warning(
                "reading a tarball failed", tarball=op.source_path, error=str(exc)
            )
            self._retry_later(entry)
            return None
        finally:
            opened.close()
        if not unchanged:
            self._changed(op, entry, "it changed while it was checked")
            return None
        if not isinstance(checked, Manifest):
            self._refuse(op, checked.reason.value, str(checked))
            return None
        return checked

    # -- one ingest call -----------------------------------------------------------------

    def _ingest(
        self,
        batch_id: int,
        op: Op,
        entry: Pending,
        source: Input,
        settings: StagingConfig | S3Config,
        manifest: Manifest,
        plan: ReplacePlan,
    ) -> int | None:
        """Run ``cvmfs_server ingest`` fed by the second read; return the revision, or
        None when the drop was not published (re-queued or set aside)."""
        lane = self.lane
        base_revision = lane.revision()
        lane.state.set_stage(batch_id, Stage.INGESTING, base_revision=base_revision, attempt=True)
        lane.set_status(state="ingesting a tarball", ingest_fed_bytes=0)
        boot = boot_id()

        def record(pgid: int) -> None:
            lane.state.record_command(batch_id, pgid, boot)

        def feed(stream: Feed) -> None:
            again = source.open_content(op)
            if isinstance(again, Applied):
                raise _Reopened(again)
            try:
                out = _Counted(stream, lambda fed: lane.set_status(ingest_fed_bytes=fed))
                emit_plain_tar(again, manifest, out, compression=_compression(op))
            finally:
                again.close()
            lane.set_status(ingest_fed_bytes=stream.fed)

        lane.open_batch = batch_id
        lane.transaction_opened()  # ingest's own, from its start to its end
        try:
            fed = lane.server.ingest(
                lane.repo.name,
                base=op.repo_path,
                feed=feed,
                catalog=settings.ingest_catalog,
                deletes=plan.deletes,
                inactivity=lane.config.cvmfs.ingest_inactivity_seconds,
                on_spawn=record,
                tag=lane.command_tag(batch_id),
            )
        except CvmfsCommandError as exc:
            lane.transaction_closed()
            lane.state.set_stage(batch_id, Stage.ABORTED, error=str(exc))
            lane.log.error("ingest could not run", tarball=op.source_path, error=str(exc))
            self._retry_later(entry)
            return None
        lane.transaction_closed()
        result = fed.result
        if result.outcome is Outcome.OK and fed.feed_error is None:
            revision = lane.revision()
            lane.state.set_stage(batch_id, Stage.PUBLISHED, revision=revision)
            return revision if revision is not None else -1
        why = describe(result)
        if fed.feed_error is not None:
            why = f"{why}; feeding it failed: {fed.feed_error}"
        lane.set_status(last_error=why)
        lane.log.warning(
            "ingest failed", batch=batch_id, tarball=op.source_path, outcome=result.outcome.name
        )
        revision = self._went_live(batch_id, op, manifest, base_revision)
        if revision is not None:
            return revision
        self._close(batch_id, why)
        self._after_failure(op, entry, result.outcome, fed.feed_error, why)
        return None

    def _went_live(
        self, batch_id: int, op: Op, manifest: Manifest, base_revision: int | None
    ) -> int | None:
        """After a failed ingest: the new revision if the archive went live all the same
        (the command failed late), after closing a transaction it left; else None."""
        lane = self.lane
        revision = lane.revision()
        if revision is None or base_revision is None or revision <= base_revision:
            return None
        try:
            live = live_tree(self.lane.layout.union_dir, op.repo_path, self.lane.heartbeat)
        except OSError:
            return None
        if not already_live(manifest, live):
            return None
        lane.log.warning("ingest reported failure after the tarball was live", batch=batch_id)
        lane.state.set_stage(batch_id, Stage.PUBLISHED, revision=revision)
        if lane.layout.in_transaction():
            lane.open_batch = batch_id
            Transaction(lane, batch_id).abort_leftover()
            lane.transaction_closed()
        return revision

    def _close(self, batch_id: int, why: str) -> None:
        """Journal a failed ingest aborted, aborting the transaction it left open (ours:
        no other could open while the command ran under our lock)."""
        lane = self.lane
        if lane.layout.in_transaction():
            lane.open_batch = batch_id
            Transaction(lane, batch_id).abort(why)
        else:
            lane.state.set_stage(batch_id, Stage.ABORTED, error=why)

    def _after_failure(
        self,
        op: Op,
        entry: Pending,
        outcome: Outcome,
        feed_error: BaseException | None,
        why: str,
    ) -> None:
        """Set aside, re-queue or back off after an ingest that published nothing."""
        lane = self.lane
        if isinstance(feed_error, _Reopened):
            self._not_read(op, entry, feed_error.applied)
        elif isinstance(feed_error, ArchiveChanged):
            self._changed(op, entry, str(feed_error))
        elif feed_error is not None:
            self._retry_later(entry)  # the archive could not be read again (S3, I/O)
        elif outcome in _TOOL_REFUSALS:
            self._refuse(op, _TOOL_REFUSALS[outcome], f"ingest refused the archive: {why}")
        elif outcome is Outcome.ALREADY_IN_TRANSACTION:
            self._requeue(entry)  # a foreign transaction: the lane waits for it
        else:
            if outcome is Outcome.WHITELIST_EXPIRED:
                lane.whitelist_expired()
            lane.metrics.publish_failures.labels(lane.repo.name, outcome.name.lower()).inc()
            self._retry_later(entry)

    # -- a transaction instead -----------------------------------------------------------

    def _unpack(
        self,
        batch_id: int,
        op: Op,
        entry: Pending,
        source: Input,
        settings: StagingConfig | S3Config,
        manifest: Manifest,
        plan: ReplacePlan,
    ) -> int | None:
        """Open a transaction, unpack the archive into it, publish; return the revision,
        or None when the drop was not published."""
        lane = self.lane
        transaction = Transaction(lane, batch_id)
        if not transaction.open(lane.revision()):
            self._requeue(entry)
            return None
        lane.set_status(state="unpacking a tarball")
        opened = self._open(op, entry, source)
        if opened is None:
            transaction.abort("the tarball cannot be read again")
            return None
        try:
            unpack(
                _Beating(opened, lane.heartbeat),
                manifest,
                lane.layout.union_dir,
                op.repo_path,
                compression=_compression(op),
                deletes=plan.deletes,
                catalog=settings.ingest_catalog,
                heartbeat=lane.heartbeat,
            )
        except (IngestError, OSError, UnsafeName) as exc:
            why = f"unpacking {op.source_path} failed: {exc}"
            transaction.abort(why)
            if isinstance(exc, ArchiveChanged):
                self._changed(op, entry, str(exc))
            else:
                lane.log.warning(
                    "unpacking a tarball failed", tarball=op.source_path, error=str(exc)
                )
                self._retry_later(entry)
            return None
        finally:
            opened.close()
        lane.state.mark_applied(batch_id, [0])
        summary = lane.state.batch(batch_id).summary
        return transaction.publish(summary, [op], lambda _: self._retry_later(entry))

    # -- outcomes ------------------------------------------------------------------------

    def _requeue(self, entry: Pending) -> None:
        self.lane.pending.put_back(replace(entry, not_before=0.0))

    def _retry_later(self, entry: Pending) -> None:
        """A persistent error must not spin: re-queue the drop after a back-off."""
        lane = self.lane
        delay = self._backoff.next_delay()
        lane.metrics.retries.labels(lane.repo.name, "ingest").inc()
        lane.pending.put_back(entry.deferred_until(lane.clock() + delay))

    def _changed(self, op: Op, entry: Pending, why: str) -> None:
        self.lane.log.info(
            "tarball changed while being read; re-queued", tarball=op.source_path, why=why
        )
        self._requeue(entry)

    def _not_read(self, op: Op, entry: Pending, applied: Applied) -> None:
        if applied.outcome is ApplyOutcome.REFUSED:
            self._refuse(op, "unreadable", f"the tarball cannot be read: {applied.reason}")
        else:
            self._changed(op, entry, applied.outcome.value)

    def _refuse(self, op: Op, code: str, why: str) -> None:
        """Set the tarball aside (kept where it is) with ``why``; count and log it."""
        lane = self.lane
        lane.state.set_aside(lane.repo.name, op.source, op.source_path, why, op.fingerprint)
        lane.metrics.ingest_refused.labels(lane.repo.name, code).inc()
        lane.metrics.skipped.labels(lane.repo.name, op.source, "refused").inc()
        lane.log.warning("tarball set aside", source=op.source, tarball=op.source_path, reason=why)

    # -- done ----------------------------------------------------------------------------

    def _record(self, op: Op, manifest: Manifest, revision: int | None) -> None:
        """The archive is live: record its paths in the index and tell its source."""
        lane = self.lane
        lane.state.apply_ingested(lane.repo.name, op, manifest.entries(), revision)
        lane.state.clear_set_aside(lane.repo.name, op.source, op.source_path)
        source = lane.source_of(op)
        if source is None:
            return
        try:
            source.published([op])
        except Exception:
            lane.log.exception("post-publish step failed", source=op.source)

    def _finish(
        self,
        batch_id: int,
        op: Op,
        entry: Pending,
        manifest: Manifest,
        revision: int,
        started: float,
    ) -> None:
        """The drop is published (``revision``, -1 if unreadable): index, source, journal,
        metrics, status, and the one summary line."""
        lane = self.lane
        now = lane.clock()
        lane.transaction_closed()
        self._record(op, manifest, revision if revision >= 0 else None)
        lane.state.set_stage(batch_id, Stage.DONE)
        m, repo = lane.metrics, lane.repo.name
        m.publishes.labels(repo).inc()
        m.ingest_duration.labels(repo).observe(max(0.0, now - started))
        m.last_publish.labels(repo).set(now)
        if revision >= 0:
            m.revision.labels(repo).set(revision)
        m.published_bytes.labels(repo).inc(manifest.total_bytes)
        m.drop_latency.labels(repo).observe(max(0.0, now - entry.first_at))
        lane.set_status(
            state="idle",
            last_publish_at=now,
            last_revision=revision if revision >= 0 else None,
            last_error="",
        )
        lane.log.info(
            "published",
            batch=batch_id,
            revision=revision,
            tarball=op.source_path,
            base=op.repo_path,
            members=manifest.member_count,
            bytes=manifest.total_bytes,
            seconds=round(now - started, 3),
        )


def _compression(op: Op) -> Compression | None:
    """How the tarball of ``op`` is compressed, as its name says."""
    return tarball_compression(op.source_path.rsplit("/", 1)[-1])
