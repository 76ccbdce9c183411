"""When maintenance runs: crontab schedules and the scheduler that wakes the tasks up.

The scheduler (APScheduler 3.x ``BackgroundScheduler``, memory job store) only decides
*when*; what a task does, and whether a resign is due, is decided in ``maintenance/``.
Jobs submit work and return quickly: gc goes into the repository's lane (between
batches, under the publishing lock); resign and check run in the scheduler's worker
threads because they must not wait behind a publish.

Crontab fields mean what crontab(5) says, which is not what APScheduler's ``CronTrigger``
says for the day of the week: crontab counts Sunday = 0 (and 7), APScheduler Monday = 0,
and crontab fires when *either* a restricted day of month or a restricted day of week
matches, APScheduler only when both do. :func:`crontab_trigger` translates.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Protocol

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from cvmfs_syncd.config import MaintenanceConfig

log = structlog.get_logger(__name__)

#: How often "is a resign due?" is asked (and once at start).
RESIGN_CHECK_SECONDS = 3600.0
#: A scheduled run that could not start within this many seconds of its time is reported
#: as missed and run at once instead.
MISFIRE_GRACE_SECONDS = 15 * 60

_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_ITEM = re.compile(
    r"^(?:(?P<star>\*)|(?P<first>[0-7]|[a-z]{3})(?:-(?P<last>[0-7]|[a-z]{3}))?)"
    r"(?:/(?P<step>[1-9]\d*))?$"
)


def _cron_day(token: str, field: str) -> int:
    """Return crontab's day number 0-7 (7 kept: it is folded onto Sunday after expansion)."""
    if token.isdigit():
        return int(token)
    if token in _CRON_DAYS:
        return _CRON_DAYS.index(token)
    raise ValueError(f"day of week {field!r}: {token!r} is not a day (0-7 or sun..sat)")


def crontab_weekdays(field: str) -> str:
    """Given a crontab day-of-week field, return the same days for APScheduler's CronTrigger.

    ``*`` stays ``*``; anything else becomes a comma-separated list of day names
    (``"0"`` and ``"7"`` → ``"sun"``, ``"1-5"`` → ``"mon,tue,wed,thu,fri"``,
    ``"*/2"`` → ``"sun,tue,thu,sat"``), because APScheduler numbers the days from
    Monday and rejects ranges that pass Sunday. Raise ValueError for an invalid field.
    Pure.
    """
    text = field.strip().lower()
    if text == "*":
        return "*"
    days: set[int] = set()
    for item in text.split(","):
        match = _DOW_ITEM.match(item)
        if match is None:
            raise ValueError(f"day of week {field!r}: cannot read {item!r}")
        step = int(match["step"] or 1)
        if match["star"]:
            first, last = 0, 6
        else:
            first = _cron_day(match["first"], field)
            # A range may end on 7 (Sunday) as crontab allows: 5-7 = fri,sat,sun; and a
            # start with a step runs to the end of the week, 7 included (5/1 = fri,sat,sun).
            end = match["last"]
            open_end = first if match["step"] is None else 7
            last = open_end if end is None else _cron_day(end, field)
            if last < first:
                raise ValueError(f"day of week {field!r}: range {item!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    # APScheduler's names; it orders them itself, but a stable text helps logs and tests.
    order = (1, 2, 3, 4, 5, 6, 0)
    return ",".join(_CRON_DAYS[day] for day in order if day in days)


def crontab_trigger(expression: str, timezone: tzinfo | None = None) -> Any:
    """Given a 5-field crontab expression, return an APScheduler trigger that fires like cron.

    Fields: minute, hour, day of month, month, day of week (0 and 7 = Sunday, names
    ``sun``..``sat``). When both the day of month and the day of week are restricted
    (neither starts with ``*``), cron fires on either, so the result is an ``OrTrigger``
    of two cron triggers. ``timezone`` defaults to the host's local time, as cron's.
    Raise ValueError for an expression that is not valid.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r}: expected 5 crontab fields, got {len(fields)}")
    minute, hour, day, month, weekday = fields
    try:
        weekdays = crontab_weekdays(weekday)

        def cron(day_field: str, weekday_field: str) -> CronTrigger:
            return CronTrigger(
                minute=minute,
                hour=hour,
                day=day_field,
                month=month.lower(),
                day_of_week=weekday_field,
                timezone=timezone,
            )

        if not day.startswith("*") and not weekday.startswith("*"):
            return OrTrigger([cron(day, "*"), cron("*", weekdays)])
        return cron(day, weekdays)
    except ValueError as exc:
        raise ValueError(f"{expression!r}: {exc}") from None


def next_fire_time(trigger: Any, after: datetime) -> datetime | None:
    """Return when ``trigger`` fires next after ``after`` (for tests and status)."""
    fire: datetime | None = trigger.get_next_fire_time(None, after)
    return fire


class Tasks(Protocol):
    """The maintenance tasks of one repository, as the scheduler wakes them."""

    @property
    def name(self) -> str:
        """The repository's name."""

    @property
    def settings(self) -> MaintenanceConfig:
        """The repository's maintenance settings (``gc_schedule``, ``check_schedule``)."""

    def resign_check(self) -> object:
        """Re-sign the whitelist if due (hourly, and at once)."""

    def submit_gc(self) -> object:
        """Queue a gc in the repository's lane."""

    def check(self) -> object:
        """Check the repository."""

    def missed(self, task: str) -> None:
        """A scheduled run of ``task`` was skipped because it was late."""


class MaintenanceScheduler:
    """Wakes every repository's maintenance tasks: resign check hourly, gc and check by cron.

    ``start`` starts the scheduler thread; ``pause`` stops new runs, ``wait_idle`` waits
    for running ones and ``shutdown`` ends the threads. Jobs are coalesced and never run
    twice at once (``max_instances=1``); a run that APScheduler skipped because it was
    late is reported and run at once instead (never dropped silently).
    """

    def __init__(
        self,
        *,
        timezone: tzinfo | None = None,
        workers: int = 4,
        resign_check_seconds: float = RESIGN_CHECK_SECONDS,
    ) -> None:
        self.timezone = timezone
        self.resign_check_seconds = resign_check_seconds
        options: dict[str, Any] = {
            "jobstores": {"default": MemoryJobStore()},
            "executors": {"default": ThreadPoolExecutor(max_workers=max(2, workers))},
            "job_defaults": {
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": MISFIRE_GRACE_SECONDS,
            },
        }
        if timezone is not None:
            options["timezone"] = timezone
        self._scheduler = BackgroundScheduler(**options)
        self._scheduler.add_listener(self._on_skipped, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self._tasks: dict[str, Tasks] = {}
        self._problems: dict[str, list[str]] = {}
        self._running = 0
        self._idle = threading.Condition()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread (jobs added before run from now on)."""
        self._scheduler.start()

    @property
    def running(self) -> bool:
        """True while the scheduler thread runs."""
        return bool(self._scheduler.running)

    def pause(self) -> None:
        """Start no further runs (running ones go on)."""
        if self._scheduler.running:
            self._scheduler.pause()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for running tasks to end; return True if none runs."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout=max(0.0, timeout))

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the scheduler thread; with ``wait``, also wait for running tasks to end."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    # -- repositories --------------------------------------------------------------------

    def add(self, maint: Tasks) -> list[str]:
        """Schedule the tasks of one repository (replacing what was scheduled for it).

        The resign check is always scheduled. A gc or check schedule that is not a valid
        crontab expression is not scheduled; return those problems (also logged, and
        kept for :meth:`problems`).
        """
        name = maint.name
        settings = maint.settings
        self.remove(name)
        self._tasks[name] = maint
        self._scheduler.add_job(
            self._guard(name, "resign", maint.resign_check),
            IntervalTrigger(seconds=self.resign_check_seconds, timezone=self.timezone),
            id=f"{name}:resign",
            name=f"resign check of {name}",
            next_run_time=datetime.now(UTC),
            replace_existing=True,
        )
        problems: list[str] = []
        scheduled: list[tuple[str, str, Callable[[], object]]] = [
            ("gc", settings.gc_schedule, maint.submit_gc),
            ("check", settings.check_schedule, maint.check),
        ]
        for task, expression, fn in scheduled:
            if not expression:
                continue
            try:
                trigger = crontab_trigger(expression, self.timezone)
            except ValueError as exc:
                problems.append(f"{name}: {task}_schedule {exc}; {task} is not scheduled")
                log.error(
                    "invalid maintenance schedule", repository=name, task=task, error=str(exc)
                )
                continue
            self._scheduler.add_job(
                self._guard(name, task, fn),
                trigger,
                id=f"{name}:{task}",
                name=f"{task} of {name}",
                replace_existing=True,
            )
        self._problems[name] = problems
        return problems

    def problems(self, repo: str) -> list[str]:
        """Return the schedules of ``repo`` that could not be used."""
        return list(self._problems.get(repo, ()))

    def remove(self, repo: str) -> None:
        """Unschedule every task of ``repo``."""
        self._tasks.pop(repo, None)
        self._problems.pop(repo, None)
        for job in self._scheduler.get_jobs():
            if job.id.startswith(f"{repo}:"):
                with contextlib.suppress(JobLookupError):
                    self._scheduler.remove_job(job.id)

    def run_soon(self, repo: str, task: str, fn: Callable[[], object], delay: float) -> None:
        """Run ``fn`` once, ``delay`` seconds from now (a retry, or a resign asked for now).

        One pending one-off run per repository and task: a later request replaces it.
        """
        when = datetime.now(UTC) + timedelta(seconds=max(0.0, delay))
        self._scheduler.add_job(
            self._guard(repo, task, fn),
            DateTrigger(run_date=when, timezone=self.timezone),
            id=f"{repo}:{task}:once",
            name=f"{task} of {repo} (once)",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def next_run(self, repo: str, task: str) -> float | None:
        """Return when ``task`` of ``repo`` runs next (UNIX seconds), or None."""
        times = []
        for job_id in (f"{repo}:{task}", f"{repo}:{task}:once"):
            job = self._scheduler.get_job(job_id)
            if job is not None and getattr(job, "next_run_time", None) is not None:
                times.append(job.next_run_time.timestamp())
        return min(times) if times else None

    # -- internals -----------------------------------------------------------------------

    def _guard(self, repo: str, task: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with self._idle:
                self._running += 1
            try:
                fn()
            except Exception:
                # The task records its own failures; this is a bug, logged with its stack.
                log.exception("maintenance task crashed", repository=repo, task=task)
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

        run.__name__ = f"{task}_{repo}"
        return run

    def _on_skipped(self, event: JobExecutionEvent) -> None:
        repo, _, rest = str(event.job_id).partition(":")
        task = rest.split(":", 1)[0]
        maint = self._tasks.get(repo)
        if event.code == EVENT_JOB_MAX_INSTANCES:
            # The run still in progress does the same work: coalesced, not lost.
            log.info(
                "maintenance run coalesced with the one in progress", repository=repo, task=task
            )
            return
        log.warning("maintenance run missed its time; running it now", repository=repo, task=task)
        if maint is not None:
            maint.missed(task)
