"""What a maintenance run came to, and the book of one repository's runs.

Every run is recorded in the metrics, ``/status``, the log and the state database (so
that "last success" survives restarts and the command-line runs count); a run that
failed or could not run and asks for it is retried with back-off through the scheduler.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

import structlog

from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.config import Config, MaintenanceConfig, RepositoryConfig
from cvmfs_syncd.cvmfs.outcomes import CommandResult
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.errors import CvmfsCommandError, StateError
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.maintenance.policy import TASKS, retry_allowed
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.pipeline.transaction import describe
from cvmfs_syncd.state import State

log = structlog.get_logger(__name__)


class Verdict(Enum):
    """How a run ended. A failure that ``retry``-s is tried again soon with back-off; one
    that does not waits for the task's next scheduled run."""

    DONE = "done"  #: it did its job
    SKIPPED = "skipped"  #: nothing to do or not enabled; not a failure
    FAILED = "failed"  #: the command ran and failed
    FAILED_RETRY = "failed_retry"  #: the command ran and failed; worth trying again soon
    NOT_RUN = "not_run"  #: something stopped it first, and trying again will not help
    NOT_RUN_RETRY = "not_run_retry"  #: stopped first (a lock, a transaction); try again soon

    @property
    def ok(self) -> bool:
        """True for a run that did its job."""
        return self is Verdict.DONE

    @property
    def failed(self) -> bool:
        """True for a run that failed or could not run."""
        return self not in (Verdict.DONE, Verdict.SKIPPED)

    @property
    def retry(self) -> bool:
        """True for a failure worth trying again soon."""
        return self in (Verdict.FAILED_RETRY, Verdict.NOT_RUN_RETRY)

    @property
    def ran(self) -> bool:
        """True unless something stopped the run before its command (then its duration
        is not the task's)."""
        return self not in (Verdict.NOT_RUN, Verdict.NOT_RUN_RETRY)


@dataclass(frozen=True)
class TaskResult:
    """What one run of a maintenance task came to. ``outcome`` is the cvmfs outcome name
    or the daemon's own reason (``master_key_missing``, ``foreign_transaction``, …)."""

    task: str
    verdict: Verdict
    message: str
    outcome: str = ""
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True for a run that did its job."""
        return self.verdict.ok


def command_failed(
    task: str, result: CommandResult, *, retry: bool, ran: bool = True
) -> TaskResult:
    """Return the result of a task whose cvmfs command failed."""
    verdict = {
        (True, True): Verdict.FAILED_RETRY,
        (True, False): Verdict.FAILED,
        (False, True): Verdict.NOT_RUN_RETRY,
        (False, False): Verdict.NOT_RUN,
    }[ran, retry]
    return TaskResult(task, verdict, describe(result), result.outcome.value)


@dataclass
class TaskStatus:
    """The last runs of one task, as /status shows them."""

    last_success: float = 0.0
    last_attempt: float = 0.0
    last_duration: float = 0.0
    last_outcome: str = ""
    last_message: str = ""
    failing: bool = False
    consecutive_failures: int = 0
    enabled_since: float = 0.0
    running: bool = False
    queued: bool = False


class Scheduling(Protocol):
    """What the maintenance of a repository needs from the scheduler."""

    def run_soon(self, repo: str, task: str, fn: Callable[[], object], delay: float) -> None:
        """Run ``fn`` once, ``delay`` seconds from now (one pending run per task)."""

    def next_run(self, repo: str, task: str) -> float | None:
        """Return when ``task`` runs next, or None."""

    def problems(self, repo: str) -> list[str]:
        """Return the schedules of ``repo`` that could not be used."""


class Runs:
    """The runs of one repository's tasks: their status, metrics, log lines and records.

    ``scheduling`` None: retries are not scheduled and :meth:`run_soon` runs in the
    caller's thread. ``on_demand`` (a command-line run) does not record whether tasks are
    enabled: only the daemon decides that.
    """

    def __init__(
        self,
        name: str,
        *,
        metrics: Metrics,
        state: State,
        clock: Callable[[], float],
        backoff: Callable[[], Backoff],
        scheduling: Scheduling | None = None,
        on_demand: bool = False,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.state = state
        self.clock = clock
        self.scheduling = scheduling
        self.on_demand = on_demand
        self._lock = threading.Lock()
        self._tasks = {task: TaskStatus() for task in TASKS}
        self._backoff = {task: backoff() for task in TASKS}
        self._warned: set[str] = set()
        for task in TASKS:
            # Every series exists from the start, so that rates and alerts see a zero.
            metrics.maintenance_failures.labels(name, task)
            metrics.maintenance_failing.labels(name, task)
        for task, record in state.maintenance_records(name).items():
            if task not in self._tasks:
                continue
            status = self._tasks[task]
            status.last_attempt = record.last_attempt
            status.last_outcome = record.last_outcome
            status.last_message = record.last_message
            status.enabled_since = record.enabled_since
            status.last_success = record.last_success
        for task in TASKS:
            labels = metrics.maintenance_last_success.labels(name, task)
            labels.set(self._tasks[task].last_success)

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        task: str,
        body: Callable[[], TaskResult | None],
        *,
        retry: Callable[[], object],
        started: float | None = None,
    ) -> TaskResult | None:
        """Run ``body`` as a run of ``task`` and record it; ``retry`` runs it again later.

        A body that returns None had nothing to do (or is one step of a run that goes
        on): nothing is recorded. ``started`` (``time.monotonic()``) is when a run made
        of several steps began; its duration counts from there.
        """
        started = time.monotonic() if started is None else started
        with self._lock:
            self._tasks[task].running = True
        try:
            result = body()
        except CvmfsCommandError as exc:
            result = TaskResult(task, Verdict.NOT_RUN, str(exc), "error")
        except Exception as exc:
            log.exception("maintenance task raised", repository=self.name, task=task)
            result = TaskResult(task, Verdict.FAILED_RETRY, f"{type(exc).__name__}: {exc}", "error")
        finally:
            with self._lock:
                self._tasks[task].running = False
        if result is None:
            return None
        result = replace(result, duration=time.monotonic() - started)
        self._record(result, retry)
        return result

    def run_soon(self, task: str, fn: Callable[[], object], delay: float) -> None:
        """Have the scheduler run ``fn`` once after ``delay``; without one, run it now."""
        if self.scheduling is not None:
            self.scheduling.run_soon(self.name, task, fn, delay)
        else:
            fn()

    def _record(self, result: TaskResult, retry: Callable[[], object]) -> None:
        task, verdict = result.task, result.verdict
        now = self.clock()
        labels = (self.name, task)
        with self._lock:
            status = self._tasks[task]
            status.last_attempt = now
            status.last_outcome = result.outcome
            status.last_message = result.message
            if verdict.ran:
                status.last_duration = result.duration
            if verdict.ok:
                status.last_success = now
            status.failing = verdict.failed
            status.consecutive_failures = status.consecutive_failures + 1 if verdict.failed else 0
            failures = status.consecutive_failures
        if verdict.ran:
            self.metrics.maintenance_duration.labels(*labels).set(result.duration)
        self.metrics.maintenance_failing.labels(*labels).set(1 if verdict.failed else 0)
        if verdict.ok:
            self.metrics.maintenance_last_success.labels(*labels).set(now)
            self._backoff[task].reset()
            log.info(
                "maintenance task done",
                repository=self.name,
                task=task,
                message=result.message,
                seconds=round(result.duration, 3),
            )
        elif verdict is Verdict.SKIPPED:
            self.warn_once(f"{task} skipped: {result.message}")
        else:
            self.metrics.maintenance_failures.labels(*labels).inc()
            log.error(
                "maintenance task failed",
                repository=self.name,
                task=task,
                outcome=result.outcome,
                message=result.message,
                seconds=round(result.duration, 3),
                consecutive_failures=failures,
            )
        self._store(
            lambda: self.state.record_maintenance_run(
                self.name,
                task,
                at=now,
                outcome=result.outcome,
                message=result.message,
                success=verdict.ok,
            )
        )
        if verdict.retry and self.scheduling is not None:
            if not retry_allowed(task, failures, result.outcome):
                log.error(
                    "maintenance task keeps failing; waiting for its next scheduled run",
                    repository=self.name,
                    task=task,
                    consecutive_failures=failures,
                )
                return
            delay = self._backoff[task].next_delay()
            self.metrics.retries.labels(self.name, task).inc()
            log.info(
                "maintenance task retry scheduled", repository=self.name, task=task, retry_in=delay
            )
            self.scheduling.run_soon(self.name, task, retry, delay)

    def keep_record(self, name: str, *, outcome: str, message: str, success: bool) -> None:
        """Keep a record beside the tasks' (e.g. where a sampled pass resumes), now."""
        now = self.clock()
        self._store(
            lambda: self.state.record_maintenance_run(
                self.name, name, at=now, outcome=outcome, message=message, success=success
            )
        )

    def _store(self, write: Callable[[], None]) -> None:
        try:
            write()
        except (sqlite3.Error, StateError) as exc:
            log.warning("cannot record a maintenance result", repository=self.name, error=str(exc))

    # -- what other parts learn -------------------------------------------------------------

    def seen_success(self, task: str, when: float) -> None:
        """A success seen elsewhere (the whitelist's signing time, the repository's last gc)."""
        with self._lock:
            status = self._tasks[task]
            if when <= status.last_success:
                return
            status.last_success = when
        self.metrics.maintenance_last_success.labels(self.name, task).set(when)

    def set_enabled(self, task: str, on: bool) -> None:
        """Note whether the daemon runs ``task``; keep since when it does."""
        with self._lock:
            status = self._tasks[task]
            before = status.enabled_since
            if on and not before:
                status.enabled_since = self.clock()
            elif not on:
                status.enabled_since = 0.0
            since = status.enabled_since
        self.metrics.maintenance_enabled_since.labels(self.name, task).set(since)
        if since != before and not self.on_demand:
            self._store(lambda: self.state.record_maintenance_enabled(self.name, task, since))

    def set_queued(self, task: str, queued: bool) -> None:
        """Note whether a run of ``task`` waits in the lane."""
        with self._lock:
            self._tasks[task].queued = queued

    def clear_failure(self, task: str) -> None:
        """The failure of ``task`` is over without a run (someone else did its job)."""
        with self._lock:
            self._tasks[task].failing = False
            self._tasks[task].consecutive_failures = 0
        self.metrics.maintenance_failing.labels(self.name, task).set(0)

    def warn_once(self, message: str) -> None:
        """Log a warning about the repository's maintenance the first time only."""
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        log.warning("maintenance", repository=self.name, note=message)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, object]]:
        """Return every task's last runs for /status (JSON-ready)."""
        with self._lock:
            tasks = {name: replace(status) for name, status in self._tasks.items()}
        scheduling = self.scheduling
        return {
            name: {
                "last_success": status.last_success or None,
                "last_attempt": status.last_attempt or None,
                "last_duration_seconds": round(status.last_duration, 3),
                "last_outcome": status.last_outcome,
                "last_message": status.last_message,
                "failing": status.failing,
                "running": status.running,
                "queued": status.queued,
                "enabled_since": status.enabled_since or None,
                "next_run": scheduling.next_run(self.name, name) if scheduling else None,
            }
            for name, status in tasks.items()
        }

    def problems(self) -> list[str]:
        """Return the failing tasks and the schedules that could not be used."""
        with self._lock:
            failing = {name: s.last_message for name, s in self._tasks.items() if s.failing}
        items = [f"{self.name}: {task} failing: {message}" for task, message in failing.items()]
        if self.scheduling is not None:
            items += self.scheduling.problems(self.name)
        return items


@dataclass(frozen=True)
class TaskContext:
    """What every task of one repository works with."""

    config: Config
    repo: RepositoryConfig
    layout: RepositoryLayout
    server: CvmfsServer
    runs: Runs

    @property
    def name(self) -> str:
        """The repository's name."""
        return self.repo.name

    @property
    def settings(self) -> MaintenanceConfig:
        """The repository's ``[maintenance]`` settings."""
        return self.repo.maintenance

    @property
    def timeout(self) -> float:
        """The timeout of a short cvmfs command."""
        return self.config.cvmfs.command_timeout_seconds

    def lock(self, name: str) -> RepositoryLock:
        """Return the repository's lock ``name`` (``resign``, ``check``)."""
        return RepositoryLock(self.config.daemon.state_dir, self.repo.name, name=name)
