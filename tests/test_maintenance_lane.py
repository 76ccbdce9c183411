"""Maintenance in the running daemon (Service in process) against the fake cvmfs_server.

gc and publish never overlap, even when each is slowed down by fault injection; check
never waits for a publish; an expired whitelist is re-signed before anything else; the
command-line gc waits for the daemon's repository lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.service import Service, build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import wait_for
from tests.test_maintenance import (
    REPO,
    Call,
    CallLog,
    load_config,
    maintenance_toml,
)

COMMANDS = ("transaction", "publish", "abort", "gc", "check", "resign", "mount", "tag_list")
SCHEDULED = maintenance_toml(gc_schedule='"0 3 * * 0"', check_schedule='"0 4 * * *"')


# The stratum0 fixture's repository is garbage-collectable (mkfs -z).
pytestmark = pytest.mark.stratum0(REPO, gc=True)


class Daemon:
    """A Service started in this process, with a log of every cvmfs command it ran."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.calls = CallLog(service.server, COMMANDS)

    def start(self) -> None:
        """Start the HTTP endpoint, the scheduler and the lanes."""
        self.service.start()

    def stop(self) -> None:
        """Stop lanes and scheduler, close the state and the HTTP endpoint."""
        if self.service.http is not None:
            self.service.http.stop()
            self.service.http = None
        self.service.stop()

    def sample(self, name: str, **labels: str) -> float:
        """A metric's value (0 when the series does not exist)."""
        value = self.service.metrics.registry.get_sample_value(name, {"repository": REPO, **labels})
        return float(value or 0.0)


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[DaemonFactory]:
    """Build (not start) in-process daemons; stop them afterwards."""
    made: list[Daemon] = []

    def build(repo_extra: str = SCHEDULED) -> Daemon:
        config = load_config(tmp_path, stratum0, staging, repo_extra)
        made.append(Daemon(Service(config)))
        return made[-1]

    yield build
    for item in made:
        if item.service.scheduler.running or item.service.lanes:
            item.stop()


def _published(stratum0: FakeStratum0, name: str) -> bool:
    return name in stratum0.published_tree(REPO)


def _finished(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.ended is not None]


def _idle(daemon: Daemon) -> bool:
    status = daemon.service.lanes[REPO].status()
    return status.state == "idle" and status.pending == 0


def test_gc_and_publish_never_overlap_when_each_is_slow(
    daemon: DaemonFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A gc due during a slow publish waits for it; a publish due during a slow gc waits too."""
    d = daemon()
    d.start()
    maint = d.service.maintenance[REPO]
    wait_for(lambda: _idle(d), 30, "the lane to settle after start")

    # 1. gc asked for while a publish is slowed down: queued, runs after the publish.
    stratum0.inject_fault("publish", "delay", at="before_sync", delay=1.5, times=1)
    (staging / "first.txt").write_text("first\n")
    wait_for(lambda: d.calls.of("publish"), 30, "the slow publish to start")
    submitted = time.monotonic()
    maint.submit_gc()
    submit_seconds = time.monotonic() - submitted
    maint.submit_gc()  # due again while still queued: coalesced, not run twice
    assert maint.status()["gc"]["queued"] or _finished(d.calls.of("gc"))
    wait_for(lambda: _finished(d.calls.of("gc")), 30, "the queued gc to run")
    publish = d.calls.of("publish")[-1]
    [gc] = d.calls.of("gc")
    assert publish.ended is not None
    assert gc.started >= publish.ended, "gc started while the publish ran"
    assert gc.outcome is Outcome.OK
    assert _published(stratum0, "first.txt")

    # 2. a change arriving during a slowed-down gc is published only after the gc.
    stratum0.inject_fault("gc", "delay", at="locked", delay=1.5, times=1)
    maint.submit_gc()
    wait_for(lambda: len(d.calls.of("gc")) == 2, 30, "the slow gc to start")
    (staging / "second.txt").write_text("second\n")
    wait_for(lambda: _published(stratum0, "second.txt"), 30, "the change to be published")
    slow_gc = d.calls.of("gc")[-1]
    assert slow_gc.ended is not None
    assert gc.ended is not None
    first_done = gc.ended
    late = [
        c for c in d.calls.calls if c.name in ("transaction", "publish") and c.started > first_done
    ]
    assert late
    assert all(c.started >= slow_gc.ended for c in late), "a transaction opened during gc"

    # Nothing ever met the other's transaction.
    outcomes = [c.outcome for c in d.calls.calls]
    assert Outcome.ALREADY_IN_TRANSACTION not in outcomes
    assert Outcome.GC_IN_TRANSACTION not in outcomes
    assert d.sample("cvmfs_syncd_maintenance_failures_total", task="gc") == 0
    assert d.sample("cvmfs_syncd_maintenance_last_success_timestamp_seconds", task="gc") > 0
    assert submit_seconds < 1.0, "submitting gc waited for the lane"
    assert not stratum0.violations()
    # Measured figures, shown with -s.
    print(
        f"\npublish {publish.ended - publish.started:.2f}s; gc queued behind it started "
        f"{gc.started - publish.ended:.3f}s after it ended; slow gc "
        f"{slow_gc.ended - slow_gc.started:.2f}s; next transaction started "
        f"{min(c.started for c in late) - slow_gc.ended:.3f}s after it"
    )


def test_check_runs_beside_a_slow_publish(
    daemon: DaemonFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """check does not wait for the lane: it finishes while a slowed-down publish still runs."""
    d = daemon()
    d.start()
    maint = d.service.maintenance[REPO]
    wait_for(lambda: _idle(d), 30, "the lane to settle after start")
    stratum0.inject_fault("publish", "delay", at="before_sync", delay=2.0, times=1)
    (staging / "slow.txt").write_text("slow\n")
    wait_for(lambda: d.calls.of("publish"), 30, "the slow publish to start")
    result = maint.check()
    assert result is not None
    assert result.ok, result.message
    check = d.calls.of("check")[-1]
    publish = d.calls.of("publish")[-1]
    assert check.ended is not None
    assert publish.ended is None or check.ended < publish.ended
    wait_for(lambda: _published(stratum0, "slow.txt"), 30, "the publish")


def test_foreign_transaction_blocks_scheduled_gc_until_it_is_closed(
    daemon: DaemonFactory, stratum0: FakeStratum0
) -> None:
    """gc meets an operator's transaction: never aborted, retried with back-off, then runs."""
    d = daemon()
    d.start()
    maint = d.service.maintenance[REPO]
    wait_for(lambda: _idle(d), 30, "the lane to settle after start")
    stratum0.check_run("transaction", REPO)
    maint.submit_gc()
    wait_for(
        lambda: d.sample("cvmfs_syncd_retries_total", operation="gc") >= 2,
        30,
        "gc to be retried twice",
    )
    assert stratum0.in_transaction(REPO)
    assert d.calls.of("gc") == []
    assert d.calls.of("abort") == []
    assert d.sample("cvmfs_syncd_maintenance_failing", task="gc") == 1
    assert d.sample("cvmfs_syncd_foreign_transaction_open") == 1
    assert "foreign_transaction" in maint.status()["gc"]["last_outcome"]
    stratum0.check_run("abort", "-f", REPO)
    wait_for(lambda: _finished(d.calls.of("gc")), 30, "gc to run once the transaction is gone")
    wait_for(
        lambda: d.sample("cvmfs_syncd_maintenance_failing", task="gc") == 0, 10, "gc to succeed"
    )
    assert d.calls.of("abort") == []


def test_expired_whitelist_at_start_is_resigned_before_publishing(
    daemon: DaemonFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """The daemon starting on an expired whitelist re-signs first, then publishes the backlog."""
    (staging / "backlog.txt").write_text("waiting\n")
    stratum0.check_run("resign", "-f", "-d", "0", REPO)
    assert stratum0.run("transaction", REPO).returncode == 5  # expired (h_resign 34)
    d = daemon()
    d.start()
    wait_for(lambda: _published(stratum0, "backlog.txt"), 30, "the backlog to be published")
    names = [n for n in d.calls.names() if n in ("resign", "transaction", "publish", "abort")]
    assert names[0] == "resign"
    assert "abort" not in names
    assert Outcome.WHITELIST_EXPIRED not in [c.outcome for c in d.calls.calls]
    assert d.sample("cvmfs_syncd_publish_failures_total", outcome="whitelist_expired") == 0
    expiry = stratum0.whitelist_expiry(REPO)
    assert d.sample("cvmfs_syncd_whitelist_expiry_timestamp_seconds") == expiry
    assert d.service.lanes[REPO].status().held == ""


def test_transaction_stuck_by_expiry_is_resigned_then_published_without_abort(
    tmp_path: Path, daemon: DaemonFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A crash left our transaction open and the whitelist expired: resign, then plain publish."""
    (staging / "crossing.txt").write_text("crossing expiry\n")
    config = load_config(tmp_path, stratum0, staging, SCHEDULED)
    state = State(config.daemon.state_dir)
    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))

    class Crash(Exception):
        """The daemon dies right before publishing."""

    def crash(*_args: object, **_kw: object) -> None:
        raise Crash

    lane.server.publish = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(Crash):
        lane.sync_once(30)
    lane.lock.release()
    state.close()
    assert stratum0.in_transaction(REPO)
    stratum0.check_run("resign", "-f", "-d", "0", REPO)  # expires while the transaction is open
    assert stratum0.run("abort", "-f", REPO).returncode == 1  # stuck (h_resign 57)

    d = daemon()
    d.start()
    wait_for(lambda: _published(stratum0, "crossing.txt"), 30, "the stuck batch to be published")
    names = [n for n in d.calls.names() if n in ("resign", "transaction", "publish", "abort")]
    assert names == ["resign", "publish"]
    assert not stratum0.in_transaction(REPO)


def test_whitelist_expiring_while_running_is_resigned_on_the_lane_request(
    daemon: DaemonFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """transaction meets an expired whitelist: the lane asks, resign runs now, publish goes on."""
    d = daemon()
    d.start()
    wait_for(lambda: _idle(d), 30, "the lane to settle after start")
    # The fake's clock jumps 31 days ahead: the whitelist has expired for cvmfs_server,
    # while the daemon's own clock still says it is valid.
    stratum0.set_clock_offset(31 * 86400)
    (staging / "later.txt").write_text("later\n")
    wait_for(lambda: _published(stratum0, "later.txt"), 30, "the change to be published")
    expired = [c for c in d.calls.calls if c.outcome is Outcome.WHITELIST_EXPIRED]
    assert expired
    resigns = [c for c in d.calls.of("resign") if c.started > expired[0].started]
    assert resigns
    assert resigns[0].outcome is Outcome.OK
    assert d.calls.of("abort") == []
    wait_for(lambda: d.service.lanes[REPO].status().held == "", 10, "the hold to clear")
    assert d.sample("cvmfs_syncd_lane_held", reason="whitelist-expired") == 0


def test_status_shows_maintenance(daemon: DaemonFactory, stratum0: FakeStratum0) -> None:
    """/status carries whitelist expiry, master key, schedules and next runs per repository."""
    d = daemon()
    d.start()
    wait_for(lambda: _idle(d), 30, "the lane to settle after start")
    code, body = d.service.status({})
    assert code == 200
    maint = body["maintenance"][REPO]
    assert maint["whitelist"]["expires_at"] == stratum0.whitelist_expiry(REPO)
    assert maint["master_key_present"] is True
    assert maint["schedules"] == {"gc": "0 3 * * 0", "check": "0 4 * * *"}
    assert maint["gc"]["next_run"] is not None
    assert maint["resign"]["next_run"] is not None
    assert any("CVMFS_AUTO_GC=true" in note for note in maint["gc_settings"]["notes"])
    assert maint["problems"] == []
    healthy, why = d.service.health()
    assert healthy, why


def _cli(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfs_syncd", args[0], "-c", str(config), *args[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def test_cli_gc_waits_for_the_repository_lock(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """`cvmfs-syncd gc` waits while the daemon holds the repository lock, then collects."""
    config = load_config(tmp_path, stratum0, staging, SCHEDULED)
    lock = RepositoryLock(config.daemon.state_dir, REPO)
    assert lock.acquire(timeout=1)
    before = stratum0.last_gc(REPO)  # mkfs's own publish already collected once
    stratum0.set_clock_offset(3600)  # a later gc stamps a later last_gc
    proc = _cli(tmp_path / "cvmfs-syncd.toml", "gc", REPO)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while "waiting for the repository lock" not in line and line:
            line = proc.stderr.readline()
        assert "waiting for the repository lock" in line
        assert proc.poll() is None
        assert stratum0.last_gc(REPO) == before
    finally:
        lock.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{REPO}: gc: garbage collected" in out
    after = stratum0.last_gc(REPO)
    assert after is not None
    assert before is None or after > before


def test_cli_resign_and_check_exit_codes(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """resign/check exit 0 when done, 1 with the reason when not, 2 for an unknown repository."""
    load_config(tmp_path, stratum0, staging, SCHEDULED)
    config = tmp_path / "cvmfs-syncd.toml"
    before = stratum0.whitelist_expiry(REPO)
    stratum0.set_clock_offset(60)
    proc = _cli(config, "resign", REPO)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "whitelist re-signed, valid until" in out
    assert stratum0.whitelist_expiry(REPO) != before
    proc = _cli(config, "check", REPO)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "no problems found" in out
    (stratum0.config_dir / "keys" / f"{REPO}.masterkey").unlink()
    proc = _cli(config, "resign", REPO)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "master key" in err
    proc = _cli(config, "check", "nosuch.example.org")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown repository" in err


def test_lane_mounts_again_when_transaction_finds_no_mount(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """Auto-repair off and the union mount gone: the lane runs `mount`, then publishes."""
    (staging / "after-repair.txt").write_text("repaired\n")
    stratum0.set_config(REPO, "CVMFS_AUTO_REPAIR_MOUNTPOINT", "false")
    stratum0.unmount(REPO)
    config = load_config(tmp_path, stratum0, staging)
    state = State(config.daemon.state_dir)
    try:
        lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
        calls = CallLog(lane.server, COMMANDS)
        ok, why = lane.sync_once(30)
        lane.lock.release()
    finally:
        state.close()
    assert ok, why
    names = [(c.name, c.outcome) for c in calls.calls]
    assert names[:3] == [
        ("transaction", Outcome.NOT_MOUNTED),
        ("mount", Outcome.OK),
        ("transaction", Outcome.OK),
    ]
    assert _published(stratum0, "after-repair.txt")


def test_a_long_gc_does_not_count_as_a_stalled_lane(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """gc runs in the lane for as long as it takes: the watchdog's stall check exempts it."""
    import dataclasses

    config = load_config(tmp_path, stratum0, staging, SCHEDULED)
    config = dataclasses.replace(
        config, daemon=dataclasses.replace(config.daemon, stall_seconds=1.0)
    )
    daemon = Daemon(Service(config))
    daemon.start()
    try:
        wait_for(lambda: _idle(daemon), 30, "an idle lane")
        stratum0.inject_fault("gc", "delay", delay=3.0, times=1)
        daemon.service.maintenance[REPO].submit_gc()
        lane = daemon.service.lanes[REPO]
        wait_for(lambda: lane.job_running, 30, "gc to run in the lane")
        states: set[tuple[bool, str]] = set()

        def sampled_until_done() -> bool:
            states.add(daemon.service.health())
            return not lane.job_running

        wait_for(sampled_until_done, 30, "gc to finish")
        assert states == {(True, "")}
        assert _finished(daemon.calls.of("gc"))
    finally:
        daemon.stop()
