"""The maintenance of one repository: its tasks built together, start-up, status.

:class:`RepositoryMaintenance` is built with everything it works with: the repository's
lane (for gc), the scheduler (for retries and one-off runs), the state database (for the
records). :func:`run_once` is the command line's one run of a task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.config import Config, MaintenanceConfig, RepositoryConfig
from cvmfs_syncd.cvmfs.gateway import served_by_gateway_here
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.maintenance.check import Check
from cvmfs_syncd.maintenance.gc import GarbageCollection, Jobs, Locked
from cvmfs_syncd.maintenance.repair import read_mount_table, repair
from cvmfs_syncd.maintenance.resign import Resign
from cvmfs_syncd.maintenance.runs import Runs, Scheduling, TaskContext, TaskResult, Verdict
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.state import State

log = structlog.get_logger(__name__)

#: How long a command-line run waits for a lock the daemon holds.
CLI_LOCK_WAIT = 3600.0

#: Why the gateway host leaves gc (with its tag cleanup) alone.
GATEWAY_HOST_OFF = (
    "this host runs the repository gateway: gc and tag edits would race the commits its "
    "receiver makes for the publishers, and how they interact is not recorded; resign and "
    "check run as configured"
)

#: Why a gateway publisher leaves resign and gc (with its tag cleanup) alone.
GATEWAY_PUBLISHER_OFF = (
    "this host publishes through a repository gateway: resign, gc and tag edits fail on a "
    "publisher (they need a gateway session, gateway.md 19) and belong to the gateway host"
)


class RepositoryMaintenance:
    """Resign, gc, check and repair for one repository.

    ``lane`` is the repository's lane (None for a command-line run: then gc must be
    called with the repository lock held, see :func:`run_once`). ``scheduling`` runs
    retries and requested resigns (None: no retries, a requested resign runs in the
    caller's thread). ``clock`` gives "now" for every decision and timestamp;
    ``mount_table`` returns the mount table (None if unknown); ``on_demand`` is an
    operator's run from the command line.
    """

    def __init__(
        self,
        config: Config,
        repo: RepositoryConfig,
        *,
        layout: RepositoryLayout,
        server: CvmfsServer,
        metrics: Metrics,
        state: State,
        lane: Jobs | None = None,
        scheduling: Scheduling | None = None,
        clock: Callable[[], float] = time.time,
        mount_table: Callable[[], Mapping[str, str] | None] = read_mount_table,
        on_demand: bool = False,
    ) -> None:
        self.name = repo.name
        self.settings: MaintenanceConfig = repo.maintenance
        self.server = server
        self.metrics = metrics
        self.state_dir = config.daemon.state_dir
        self.scheduling = scheduling
        self.runs = Runs(
            repo.name,
            metrics=metrics,
            state=state,
            clock=clock,
            backoff=lambda: Backoff(repo.retry_initial_seconds, repo.retry_max_seconds),
            scheduling=scheduling,
            on_demand=on_demand,
        )
        ctx = TaskContext(config, repo, layout, server, self.runs)
        self._ctx = ctx
        self._mount_table = mount_table
        self._resign = Resign(ctx)
        self._gc = GarbageCollection(ctx, lane=lane, on_demand=on_demand)
        self._check = Check(ctx)
        self._repair_findings: list[str] = []
        self.gateway_url = layout.gateway_url
        self.gateway_host = served_by_gateway_here(config.cvmfs.config_dir, repo.name)
        for task in self._off_tasks():
            self.runs.set_enabled(task, False)

    def refresh(self) -> None:
        """Re-read the whitelist, the master key and the repository's last gc; set metrics."""
        self._resign.read()
        if self.gateway_url is not None:
            self.runs.set_enabled("resign", False)
            return
        self._gc.read_last_gc()

    def _off_tasks(self) -> tuple[str, ...]:
        if self.gateway_url is not None:
            return ("resign", "gc")
        return ("gc",) if self.gateway_host else ()

    def _off(self, task: str) -> TaskResult | None:
        """The result of ``task`` where it does not run: on a gateway publisher (resign,
        gc) or the gateway host (gc); None where it runs."""
        if task not in self._off_tasks():
            return None
        why = GATEWAY_PUBLISHER_OFF if self.gateway_url is not None else GATEWAY_HOST_OFF
        return TaskResult(task, Verdict.SKIPPED, why)

    # -- the tasks ---------------------------------------------------------------------------

    def resign_check(self) -> TaskResult | None:
        """The hourly (and start-up) check: re-sign when due; return the run, or None."""
        self.refresh()
        return self._off("resign") or self._resign.check()

    def resign(self, reason: str = "requested") -> TaskResult:
        """Re-sign the whitelist now, whatever its expiry (the command line's ``resign``)."""
        return (
            self._off("resign")
            or self._resign.force(reason)
            or TaskResult("resign", Verdict.NOT_RUN, "resign did not run")
        )

    def request_resign(self) -> None:
        """Re-sign at once because a command met an expired whitelist (the lane's hook)."""
        if self.gateway_url is None:
            self._resign.request()

    def submit_gc(self) -> None:
        """Queue a gc in the lane (the scheduler's gc job); it runs between batches."""
        if "gc" not in self._off_tasks():
            self._gc.submit()

    def gc_locked(self) -> TaskResult | None:
        """Run gc now; the caller holds the repository lock (the lane, or :func:`run_once`)."""
        return self._off("gc") or self._gc.run_locked()

    def gc_stepwise(self, locked: Locked) -> TaskResult | None:
        """Run gc now, each of its steps under the repository lock ``locked`` takes."""
        return self._off("gc") or self._gc.run_stepwise(locked)

    def check(self) -> TaskResult | None:
        """Run ``cvmfs_server check`` now, beside publishing; record the result."""
        return self._check.run()

    def startup(self) -> None:
        """Before the lane recovers: re-sign an expired (or due) whitelist, then repair.

        An expired whitelist makes transaction, publish and abort fail (h_resign 33), so
        the lane's recovery would only meet that; resigning first lets it go through.
        Never raises: problems are recorded and logged (the lane's ``on_start`` hook).
        """
        try:
            self.refresh()
            if self._resign.expired():
                log.error(
                    "the whitelist has expired: re-signing before anything else",
                    repository=self.name,
                )
            self.resign_check()
            self.repair()
        except Exception:
            log.exception("maintenance start-up failed", repository=self.name)

    def repair(self) -> list[str]:
        """Compare mounts and transaction with what they should be; repair what is safe.

        Return the findings (also logged and shown in /status).
        """
        findings = repair(
            self._ctx.layout, self.server, self._mount_table(), timeout=self._ctx.timeout
        )
        self._repair_findings = findings
        return findings

    def missed(self, task: str) -> None:
        """A scheduled run was skipped because it was late: count it and run it now."""
        self.metrics.retries.labels(self.name, task).inc()
        runner: Callable[[], object] | None = {
            "resign": self.resign_check,
            "gc": self.submit_gc,
            "check": self.check,
        }.get(task)
        if runner is not None and self.scheduling is not None:
            self.scheduling.run_soon(self.name, task, runner, 0.0)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return the maintenance state for /status (JSON-ready)."""
        body = self._resign.status()
        body["gc_settings"] = self._gc.settings_status()
        body["repair"] = list(self._repair_findings)
        if self.settings.check_integrity:
            body["integrity"] = self._check.status()
        body.update(self.runs.status())
        body["schedules"] = {"gc": self.settings.gc_schedule, "check": self.settings.check_schedule}
        body["problems"] = self.problems()
        if self.gateway_host:
            body["gateway_host"] = {"off": ["gc", "tag cleanup"], "why": GATEWAY_HOST_OFF}
        if self.gateway_url is not None:
            body["gateway_publisher"] = {
                "gateway": self.gateway_url,
                "off": ["resign", "gc", "tag cleanup"],
                "why": GATEWAY_PUBLISHER_OFF,
            }
        return body

    def problems(self) -> list[str]:
        """Return what needs an operator (for /status and the systemd STATUS line)."""
        whitelist = self._resign.problems()
        if self.gateway_url is not None:
            # Only an expired or unreadable whitelist concerns a publisher; re-signing is
            # the gateway host's (a publisher has no master key, by design).
            whitelist = [p for p in whitelist if "master key" not in p]
        return whitelist + self.runs.problems()


def run_once(
    config: Config,
    repo: RepositoryConfig,
    task: str,
    *,
    server: CvmfsServer,
    metrics: Metrics | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> TaskResult:
    """Run one maintenance task now, through the same locks the daemon uses.

    ``resign`` signs whatever the expiry; ``gc`` takes the repository lock first (it
    waits for a publish of the daemon to finish, and the daemon waits for it);
    ``check`` runs beside publishing. ``on_wait`` is told when a lock must be waited
    for. Raise RepositoryConfigError if the repository is not on this host.
    """
    if task not in ("resign", "gc", "check"):
        raise ValueError(f"unknown maintenance task {task!r}")
    layout = load_layout(config.cvmfs.config_dir, repo.name)
    state = State(config.daemon.state_dir)
    try:
        maint = RepositoryMaintenance(
            config,
            repo,
            layout=layout,
            server=server,
            metrics=metrics or Metrics(),
            state=state,
            on_demand=True,
        )
        maint.refresh()
        if task == "resign":
            return maint.resign(reason="requested on the command line")
        if task == "check":
            return maint.check() or TaskResult("check", Verdict.NOT_RUN, "check did not run")
        return _gc_once(maint, config, repo, on_wait)
    finally:
        state.close()


def _gc_once(
    maint: RepositoryMaintenance,
    config: Config,
    repo: RepositoryConfig,
    on_wait: Callable[[str], None] | None,
) -> TaskResult:
    lock = RepositoryLock(config.daemon.state_dir, repo.name)
    waited = False

    def locked(step: Callable[[], bool]) -> bool | None:
        nonlocal waited
        if not lock.acquire(timeout=1.0):
            if on_wait is not None and not waited:
                on_wait(f"waiting for the repository lock {lock.path} (a publish is in progress)")
            waited = True
            if not lock.acquire(timeout=CLI_LOCK_WAIT):
                return None
        try:
            return step()
        finally:
            lock.release()

    # Each step (one tag call, then gc) takes the lock and releases it: the daemon may
    # publish between two of them.
    result = maint.gc_stepwise(locked)
    if result is None:
        return TaskResult(
            "gc",
            Verdict.NOT_RUN,
            f"the repository lock {lock.path} stayed held for {CLI_LOCK_WAIT:.0f}s",
            "locked",
        )
    return result
