"""Crontab schedules mean what crontab(5) means, and the maintenance scheduler's bookkeeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent

from cvmfs_syncd.config import MaintenanceConfig
from cvmfs_syncd.scheduler import (
    MaintenanceScheduler,
    crontab_trigger,
    crontab_weekdays,
    next_fire_time,
)
from tests.support import wait_for

# A Wednesday, so that "next Sunday" and "next Monday" are both ahead.
WEDNESDAY = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)


def fires(expression: str, count: int, after: datetime = WEDNESDAY) -> list[datetime]:
    """The next ``count`` fire times of a crontab expression (UTC)."""
    trigger = crontab_trigger(expression, UTC)
    times: list[datetime] = []
    when = after
    for _ in range(count):
        fire = next_fire_time(trigger, when)
        assert fire is not None
        times.append(fire)
        when = fire + timedelta(seconds=1)
    return times


def test_sunday_is_day_zero_as_in_crontab() -> None:
    """ "0 3 * * 0" fires on Sundays at 03:00 (APScheduler alone would pick Mondays)."""
    [first, second] = fires("0 3 * * 0", 2)
    assert first == datetime(2026, 1, 11, 3, 0, tzinfo=UTC)
    assert first.strftime("%A") == "Sunday"
    assert second - first == timedelta(days=7)


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN", "Sun"])
def test_every_spelling_of_sunday_is_sunday(sunday: str) -> None:
    """0, 7 and the name sun all mean Sunday."""
    assert [t.strftime("%A") for t in fires(f"0 3 * * {sunday}", 3)] == ["Sunday"] * 3


@pytest.mark.parametrize(
    ("field", "days"),
    [
        ("*", "*"),
        ("1", "mon"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
        ("0-6", "mon,tue,wed,thu,fri,sat,sun"),
        ("5-7", "fri,sat,sun"),
        ("*/2", "tue,thu,sat,sun"),
        ("1-5/2", "mon,wed,fri"),
        ("6,0", "sat,sun"),
        ("sat,sun", "sat,sun"),
        ("3/2", "wed,fri,sun"),  # a start with a step runs to 7, which is Sunday
        ("7-7", "sun"),
        ("5/1", "fri,sat,sun"),
        ("7/2", "sun"),
    ],
)
def test_day_of_week_fields_are_translated_day_by_day(field: str, days: str) -> None:
    """Numbers (Sunday = 0), ranges, steps, lists and names become APScheduler day names."""
    assert crontab_weekdays(field) == days


def test_weekday_range_fires_monday_to_friday() -> None:
    """ "30 2 * * 1-5" fires on the five working days only."""
    names = [t.strftime("%a") for t in fires("30 2 * * 1-5", 10)]
    assert names == ["Thu", "Fri", "Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue", "Wed"]


def test_restricted_day_of_month_and_week_fire_on_either() -> None:
    """As in cron, "0 0 13 * 5" fires on every 13th and on every Friday (not only Friday 13th)."""
    days = [t.date().isoformat() for t in fires("0 0 13 * 5", 5)]
    assert days == ["2026-01-09", "2026-01-13", "2026-01-16", "2026-01-23", "2026-01-30"]
    # A day of month with "*" in the day of week restricts by the month day alone.
    assert [t.day for t in fires("0 0 13 * *", 2)] == [13, 13]


def test_other_fields_pass_through() -> None:
    """Minutes with steps, hours lists and month names keep their crontab meaning."""
    assert [t.minute for t in fires("*/15 * * * *", 4)] == [0, 15, 30, 45]
    assert [t.hour for t in fires("0 6,18 * * *", 3)] == [18, 6, 18]
    assert fires("0 0 1 jun *", 1) == [datetime(2026, 6, 1, tzinfo=UTC)]


@pytest.mark.parametrize(
    "expression",
    ["0 3 * * 8", "0 3 * * fri-mon", "0 3 * * funday", "61 * * * *", "0 3 * *", "0 25 * * *"],
)
def test_invalid_expressions_are_refused_with_the_expression(expression: str) -> None:
    """Anything crontab would not accept raises ValueError naming the expression."""
    with pytest.raises(ValueError, match=expression.split(maxsplit=1)[0]):
        crontab_trigger(expression, UTC)


class _Recorder:
    """Stands in for RepositoryMaintenance where only scheduling is tested."""

    def __init__(self, name: str, settings: MaintenanceConfig) -> None:
        self.name = name
        self.settings = settings
        self.ran: list[str] = []
        self.missed_tasks: list[str] = []
        self.event = threading.Event()

    def resign_check(self) -> None:
        self.ran.append("resign")
        self.event.set()

    def submit_gc(self) -> None:
        self.ran.append("gc")

    def check(self) -> None:
        self.ran.append("check")

    def missed(self, task: str) -> None:
        self.missed_tasks.append(task)


@pytest.fixture
def scheduler() -> Iterator[MaintenanceScheduler]:
    """A started scheduler in UTC, shut down afterwards."""
    sched = MaintenanceScheduler(timezone=UTC)
    sched.start()
    yield sched
    sched.shutdown()


def test_resign_check_runs_at_start_and_jobs_are_scheduled(scheduler: MaintenanceScheduler) -> None:
    """Adding a repository runs its resign check at once and schedules gc and check by cron."""
    settings = MaintenanceConfig(gc_schedule="0 3 * * 0", check_schedule="0 4 * * *")
    rec = _Recorder("r.example.org", settings)
    problems = scheduler.add(rec)
    assert problems == []
    assert rec.event.wait(10)
    assert rec.ran == ["resign"]
    gc_at = scheduler.next_run("r.example.org", "gc")
    assert gc_at is not None
    assert datetime.fromtimestamp(gc_at, UTC).strftime("%A %H:%M") == "Sunday 03:00"
    check_at = scheduler.next_run("r.example.org", "check")
    assert check_at is not None
    assert datetime.fromtimestamp(check_at, UTC).strftime("%H:%M") == "04:00"
    resign_at = scheduler.next_run("r.example.org", "resign")
    assert resign_at is not None
    assert resign_at == pytest.approx(time.time() + 3600, abs=60)
    scheduler.remove("r.example.org")
    assert scheduler.next_run("r.example.org", "gc") is None


def test_invalid_schedule_is_reported_and_resign_still_scheduled(
    scheduler: MaintenanceScheduler,
) -> None:
    """A bad gc_schedule is a reported problem; the resign check is scheduled regardless."""
    rec = _Recorder("r.example.org", MaintenanceConfig(gc_schedule="0 3 * * 9"))
    problems = scheduler.add(rec)
    assert len(problems) == 1
    assert "gc_schedule" in problems[0]
    assert scheduler.next_run("r.example.org", "gc") is None
    assert scheduler.next_run("r.example.org", "resign") is not None


def test_run_soon_runs_once_and_replaces_a_pending_request(scheduler: MaintenanceScheduler) -> None:
    """One pending one-off run per task: a second request replaces the first; it runs once."""
    ran: list[str] = []
    done = threading.Event()

    def second() -> None:
        ran.append("second")
        done.set()

    scheduler.run_soon("r.example.org", "gc", lambda: ran.append("first"), 30)
    scheduler.run_soon("r.example.org", "gc", second, 0)
    assert done.wait(10)
    assert ran == ["second"]
    assert scheduler.next_run("r.example.org", "gc") is None


def test_missed_run_is_reported_and_handed_back(scheduler: MaintenanceScheduler) -> None:
    """A run APScheduler skipped as too late is not dropped: the repository runs it now."""
    rec = _Recorder("r.example.org", MaintenanceConfig(gc_schedule="0 3 * * 0"))
    scheduler.add(rec)
    event = JobExecutionEvent(
        EVENT_JOB_MISSED, "r.example.org:gc", "default", datetime.now(UTC) - timedelta(hours=2)
    )
    scheduler._on_skipped(event)
    assert rec.missed_tasks == ["gc"]


def test_stop_waits_for_running_tasks(scheduler: MaintenanceScheduler) -> None:
    """pause + wait_idle: a running task is waited for, and no new one starts."""
    started = threading.Event()
    release = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)

    scheduler.run_soon("r.example.org", "check", slow, 0)
    assert started.wait(10)
    scheduler.pause()
    assert not scheduler.wait_idle(0.05)
    release.set()
    assert scheduler.wait_idle(10)


def test_local_time_is_the_default() -> None:
    """Without a timezone the scheduler uses the host's local time, as cron does."""
    sched = MaintenanceScheduler()
    try:
        sched.start()
        wait_for(lambda: sched.running, 5, "the scheduler")
    finally:
        sched.shutdown()
    assert crontab_trigger("0 3 * * 0").timezone is not None
