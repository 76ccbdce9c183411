"""``cvmfs_server check`` of one repository, beside publishing.

check is safe during an open transaction (i_check 21): it runs in a scheduler worker,
outside the lane, and never holds publishing up. Only gc is kept apart from it
(``locks/<repo>.check.lock``): ``check -i`` reads every object file, and gc deletes some.
With ``check_integrity`` the result says whether object contents were verified
(:mod:`.integrity`): ``check -i`` skips that on S3 storage and still says "no problems
found" (faults.md F3).
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.s3storage import S3ObjectStore
from cvmfs_syncd.cvmfs.storage import open_storage
from cvmfs_syncd.errors import StorageError
from cvmfs_syncd.maintenance import integrity
from cvmfs_syncd.maintenance.integrity import RESULTS, Result, integrity_skipped
from cvmfs_syncd.maintenance.runs import TaskContext, TaskResult, Verdict, command_failed

log = structlog.get_logger(__name__)

#: ``check -i`` re-hashes every object file: hours on a large storage. The timeout only
#: guards against a hang.
CHECK_INTEGRITY_TIMEOUT = 24 * 3600.0


class Check:
    """The check of one repository."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        ctx.runs.set_enabled("check", bool(ctx.settings.check_schedule))
        self._lock = threading.Lock()
        self._integrity: dict[str, Any] = {}

    def run(self) -> TaskResult | None:
        """Run ``cvmfs_server check`` (``-i`` with ``check_integrity``); record the result.

        Runs in the caller's thread. A check that found problems is a failure that waits
        for the next schedule; one that could not run is retried.
        """
        return self.ctx.runs.run("check", self._body, retry=self.run)

    def _body(self) -> TaskResult:
        integrity = self.ctx.settings.check_integrity
        timeout = self.ctx.config.cvmfs.publish_timeout_seconds
        lock = self.ctx.lock("check")
        # gc holds this lock while it deletes objects; it is bounded by gc's own timeout.
        if not lock.acquire(timeout=timeout):
            return TaskResult(
                "check",
                Verdict.NOT_RUN_RETRY,
                "gc or another check held the repository too long",
                "locked",
            )
        try:
            result = self.ctx.server.check(
                self.ctx.name,
                integrity=integrity,
                timeout=CHECK_INTEGRITY_TIMEOUT if integrity else timeout,
            )
        finally:
            lock.release()
        if not result.ok:
            retry = result.outcome not in (Outcome.CHECK_FAILED, Outcome.NO_SUCH_REPOSITORY)
            return command_failed("check", result, retry=retry)
        if not integrity:
            return TaskResult("check", Verdict.DONE, "no problems found", "ok")
        skipped = integrity_skipped(result.stdout, result.stderr)
        if not skipped and self.ctx.layout.storage_type != "S3":
            self._integrity_was("verified", "check -i re-hashed every object")
            return TaskResult("check", Verdict.DONE, "no problems found (with -i)", "ok")
        return self._sampled()

    def _sampled(self) -> TaskResult:
        """check -i skipped the object contents: verify a sample of S3 storage, or say so."""
        why = "check -i skips object contents on this storage (only local storage is re-hashed)"
        upstream = self.ctx.layout.upstream_storage
        if self.ctx.layout.storage_type != "S3":
            return self._not_checked(why)
        record = self.ctx.runs.state.maintenance_records(self.ctx.name).get(integrity.CURSOR_TASK)
        cursor = record.last_message if record is not None else ""
        try:
            store = open_storage(upstream, self.ctx.name)
            try:
                if not isinstance(store, S3ObjectStore):
                    return self._not_checked(why)
                report = integrity.sample_s3(
                    store, cursor, count=integrity.SAMPLE_OBJECTS, rate=integrity.SAMPLE_RATE
                )
            finally:
                store.close()
        except StorageError as exc:
            return self._not_checked(f"{why}; the sampled pass over S3 failed: {exc}")
        result: Result = "problems" if report.bad else "verified"
        self.ctx.runs.keep_record(
            integrity.CURSOR_TASK, outcome=result, message=report.cursor, success=not report.bad
        )
        where = f"resumes after {report.cursor}" if report.cursor else "starts over next time"
        detail = f"{report.checked} S3 objects downloaded and hashed (sampled; {where})"
        self._integrity_was(
            result, detail, objects_verified=report.checked, bad_objects=list(report.bad[:20])
        )
        if report.bad:
            names = ", ".join(report.bad[:5])
            return TaskResult(
                "check",
                Verdict.FAILED,
                f"{len(report.bad)} of {report.checked} sampled S3 objects are unreadable "
                f"or do not hash to their name: {names}",
                "integrity_problems",
            )
        return TaskResult("check", Verdict.DONE, f"no problems found; integrity: {detail}", "ok")

    def _not_checked(self, why: str) -> TaskResult:
        self._integrity_was("not_checked", why)
        self.ctx.runs.warn_once(f"integrity not checked: {why}")
        return TaskResult(
            "check", Verdict.DONE, f"no problems found; integrity NOT checked: {why}", "ok"
        )

    def _integrity_was(self, result: Result, detail: str, **extra: Any) -> None:
        for name in RESULTS:
            self.ctx.runs.metrics.integrity.labels(self.ctx.name, name).set(
                1 if name == result else 0
            )
        with self._lock:
            self._integrity = {
                "result": result,
                "detail": detail,
                "at": self.ctx.runs.clock(),
                **extra,
            }

    def status(self) -> dict[str, Any] | None:
        """What the last check with check_integrity verified, for /status (None: none ran)."""
        with self._lock:
            return dict(self._integrity) or None
