"""``cvmfs_server check`` of one repository, beside publishing.

check is safe during an open transaction (i_check 21): it runs in a scheduler worker,
outside the lane, and never holds publishing up. Only gc is kept apart from it
(``locks/<repo>.check.lock``): ``check -i`` reads every object file, and gc deletes some.
"""

from __future__ import annotations

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.maintenance.runs import TaskContext, TaskResult, Verdict, command_failed

#: ``check -i`` re-hashes every object file: hours on a large storage. The timeout only
#: guards against a hang.
CHECK_INTEGRITY_TIMEOUT = 24 * 3600.0


class Check:
    """The check of one repository."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        ctx.runs.set_enabled("check", bool(ctx.settings.check_schedule))

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
        if result.ok:
            what = " (with -i)" if integrity else ""
            return TaskResult("check", Verdict.DONE, f"no problems found{what}", "ok")
        retry = result.outcome not in (Outcome.CHECK_FAILED, Outcome.NO_SUCH_REPOSITORY)
        return command_failed("check", result, retry=retry)
