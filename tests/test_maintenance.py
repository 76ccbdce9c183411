"""Maintenance tasks (resign, gc, check, repair) against the fake cvmfs_server, one at a time.

Decisions are made with an injected clock; the fake's own clock is set to the same time
where the fake signs or tags something. Lane- and daemon-level behaviour (gc between
publishes, resign before recovery) is in test_maintenance_lane.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.config import Config, MaintenanceConfig
from cvmfs_syncd.cvmfs.outcomes import Outcome
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, Whitelist, load_layout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.tags import Tag
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.maintenance import RepositoryMaintenance, Verdict
from cvmfs_syncd.maintenance.policy import (
    MAX_RETRIES,
    MountHealth,
    auto_tags_to_remove,
    gc_settings,
    mount_health,
    parse_last_gc,
    repair_plan,
    resign_due,
)
from cvmfs_syncd.maintenance.repair import read_mount_table
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.service import make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "maint.example.org"
DAY = 86400.0

# The stratum0 fixture's repository is garbage-collectable (mkfs -z).
pytestmark = pytest.mark.stratum0(REPO, gc=True)


# -- helpers shared with test_maintenance_lane.py ------------------------------------------


@dataclass
class Call:
    """One recorded cvmfs command: name, monotonic start/end, outcome."""

    name: str
    started: float
    ended: float | None = None
    outcome: Outcome | None = None


class CallLog:
    """Wraps methods of a CvmfsServer to record when each command ran and how it ended."""

    def __init__(self, server: CvmfsServer, names: Iterable[str]) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        for name in names:
            setattr(server, name, self._wrap(name, getattr(server, name)))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            entry = Call(name, time.monotonic())
            with self._lock:
                self.calls.append(entry)
            result = original(*args, **kw)
            entry.outcome = result.result.outcome if hasattr(result, "tags") else result.outcome
            entry.ended = time.monotonic()
            return result

        return call

    def of(self, name: str) -> list[Call]:
        """The calls of one command, in start order."""
        with self._lock:
            return [c for c in self.calls if c.name == name]

    def names(self) -> list[str]:
        """Every command name in start order."""
        with self._lock:
            return [c.name for c in self.calls]


def maintenance_toml(**keys: str) -> str:
    """A ``[repository.maintenance]`` table for write_config's repo_extra."""
    lines = ["[repository.maintenance]"] + [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def load_config(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path, repo_extra: str = ""
) -> Config:
    """Write and load a daemon configuration for the fake repository REPO."""
    path = write_config(
        tmp_path / "cvmfs-syncd.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
        repo_extra=repo_extra,
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    return config_mod.load(path)


def fake_mount_table(stratum0: FakeStratum0, repo: str) -> Callable[[], dict[str, str]]:
    """The fake's mount state as the kernel's mount table would show it."""

    def table() -> dict[str, str]:
        state = stratum0.state(repo)
        mounts: dict[str, str] = {}
        if state["mount_mode"] is not None:
            mounts[str(stratum0.union_dir(repo))] = state["mount_mode"]
        if state["rdonly_mounted"]:
            mounts[str(stratum0.spool_dir(repo) / "rdonly")] = "ro"
        return mounts

    return table


def publish_file(stratum0: FakeStratum0, name: str, content: str) -> None:
    """Publish one file with the fake directly (as an operator would)."""
    stratum0.check_run("transaction", REPO)
    (stratum0.union_dir(REPO) / name).write_text(content)
    stratum0.check_run("publish", REPO)


class Deferred:
    """Stands in for the scheduler: records (task, fn, delay) of run_soon for the test to run
    (or, while ``at_once``, runs them in the caller's thread)."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.runs: list[tuple[str, Callable[[], object], float]] = []
        self.at_once = at_once

    def run_soon(self, repo: str, task: str, fn: Callable[[], object], delay: float) -> None:
        """Record the run (or run it now)."""
        assert repo == REPO
        if self.at_once:
            fn()
        else:
            self.runs.append((task, fn, delay))

    def next_run(self, repo: str, task: str) -> float | None:
        """Nothing is scheduled ahead."""
        assert repo == REPO, task
        return None

    def problems(self, repo: str) -> list[str]:
        """Every schedule is usable."""
        assert repo == REPO
        return []

    def tasks(self) -> list[str]:
        """The tasks asked for, in order."""
        return [task for task, _, _ in self.runs]


ENABLED_SINCE = "cvmfs_syncd_maintenance_enabled_since_timestamp_seconds"
LAST_SUCCESS = "cvmfs_syncd_maintenance_last_success_timestamp_seconds"


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The current value of one series."""
    value = metrics.registry.get_sample_value(name, {"repository": REPO, **labels})
    return None if value is None else float(value)


# -- fixtures ---------------------------------------------------------------------------


Factory = Callable[..., RepositoryMaintenance]


@pytest.fixture
def maintenance(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[Factory]:
    """Build a RepositoryMaintenance (no lane) for REPO with the given maintenance keys."""
    states: list[State] = []

    def build(
        clock: Callable[[], float] = time.time,
        repo_extra: str = "",
        scheduling: Deferred | None = None,
        **keys: str,
    ) -> RepositoryMaintenance:
        config = load_config(tmp_path, stratum0, staging, repo_extra or maintenance_toml(**keys))
        repo = config.repositories[0]
        states.append(State(config.daemon.state_dir))
        return RepositoryMaintenance(
            config,
            repo,
            layout=load_layout(config.cvmfs.config_dir, REPO),
            server=make_server(config),
            metrics=Metrics(),
            state=states[-1],
            scheduling=scheduling,
            clock=clock,
            mount_table=fake_mount_table(stratum0, REPO),
        )

    yield build
    for state in states:
        state.close()


# -- pure decisions -----------------------------------------------------------------------


def test_resign_is_due_exactly_when_expiry_comes_within_the_lead_time() -> None:
    """resign_due turns true at expiry minus lead, not a second earlier; unreadable is due."""
    expiry = 1_800_000_000.0
    lead = 7 * DAY
    assert not resign_due(expiry, expiry - lead - 1, lead)
    assert resign_due(expiry, expiry - lead, lead)
    assert resign_due(expiry, expiry + 1, lead)
    assert resign_due(None, 0.0, lead)


def _tag(name: str, when: float, revision: int = 1) -> Tag:
    return Tag(name, "ab" * 20, 100, revision, datetime.fromtimestamp(when, UTC), "", "")


def test_only_old_automatic_tags_are_removed() -> None:
    """auto_tags_to_remove picks generic-* tags older than the limit, never named or undo tags."""
    now = 1_800_000_000.0
    tags = [
        _tag("generic-2026-11-01T00:00:00Z", now - 30 * DAY),
        _tag("generic_1-2026-11-01T00:00:00Z", now - 30 * DAY),
        _tag("generic-2026-11-28T00:00:00Z", now - 1 * DAY),
        _tag("release-1", now - 30 * DAY),
        _tag("trunk", now - 30 * DAY),
        _tag("trunk-previous", now - 30 * DAY),
    ]
    removed = [t.name for t in auto_tags_to_remove(tags, now, 7 * DAY)]
    assert removed == ["generic-2026-11-01T00:00:00Z", "generic_1-2026-11-01T00:00:00Z"]


def _layout(**settings: str) -> RepositoryLayout:
    return RepositoryLayout(
        name=REPO,
        union_dir=Path("/cvmfs") / REPO,
        spool_dir=Path("/var/spool/cvmfs") / REPO,
        stratum0="",
        upstream_storage=f"local,/srv/cvmfs/{REPO}/data/txn,/srv/cvmfs/{REPO}",
        settings=settings,
    )


def test_gc_settings_follow_the_repository_server_conf() -> None:
    """gc is skipped without CVMFS_GARBAGE_COLLECTION; auto-gc and auto-tags are warned about."""
    scheduled = MaintenanceConfig(gc_schedule="0 3 * * 0")
    off = gc_settings(_layout(CVMFS_GARBAGE_COLLECTION="false"), scheduled)
    assert not off.enabled
    assert "CVMFS_GARBAGE_COLLECTION" in off.reason
    recorded_z = _layout(
        CVMFS_GARBAGE_COLLECTION="true",
        CVMFS_AUTO_GC="true",
        CVMFS_AUTO_TAG="true",
        CVMFS_AUTO_TAG_TIMESPAN="",
    )
    verdict = gc_settings(recorded_z, scheduled)
    assert verdict.enabled
    assert any("CVMFS_AUTO_GC=false" in n for n in verdict.notes)
    assert any("gc frees nothing" in n for n in verdict.notes)
    with_keep = MaintenanceConfig(gc_schedule="0 3 * * 0", auto_tag_keep_seconds=7 * DAY)
    assert not any("frees nothing" in n for n in gc_settings(recorded_z, with_keep).notes)
    unscheduled = gc_settings(recorded_z, MaintenanceConfig())
    assert not unscheduled.enabled
    assert any("collects garbage itself" in n for n in unscheduled.notes)
    assert gc_settings(recorded_z, MaintenanceConfig(), on_demand=True).enabled


def test_repair_plan_mounts_only_without_a_transaction() -> None:
    """Missing mounts are repaired by `mount` only when no transaction is open; else reported."""
    healthy = MountHealth("ro", True)
    assert repair_plan(False, False, healthy) == (False, [])
    assert repair_plan(False, False, None) == (False, [])
    do_mount, findings = repair_plan(False, False, MountHealth(None, True))
    assert do_mount
    assert "union mount missing" in findings[0]
    do_mount, findings = repair_plan(True, False, MountHealth(None, True))
    assert not do_mount
    assert "only abort repairs it" in findings[0]
    assert repair_plan(True, False, MountHealth("rw", True)) == (False, [])
    assert repair_plan(True, True, MountHealth("ro", True)) == (False, [])
    do_mount, findings = repair_plan(False, False, MountHealth("rw", True))
    assert not do_mount
    assert "read/write but no transaction" in findings[0]


def test_mount_table_is_read_from_mountinfo(tmp_path: Path) -> None:
    """read_mount_table maps mount points (octal escapes undone) to rw/ro; mount_health reads it."""
    info = tmp_path / "mountinfo"
    info.write_text(
        f"36 25 0:32 / /var/spool/cvmfs/{REPO}/rdonly ro,nodev,relatime - fuse {REPO} ro\n"
        f"37 25 0:33 / /cvmfs/{REPO} rw,relatime - overlay overlay_{REPO} rw,lowerdir=x\n"
        "38 25 0:34 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    table = read_mount_table(str(info))
    assert table is not None
    assert table["/mnt/with space"] == "rw"
    assert mount_health(_layout(), table) == MountHealth("rw", True)
    assert mount_health(_layout(), {}) == MountHealth(None, False)
    assert read_mount_table(str(tmp_path / "missing")) is None


def test_last_gc_of_the_repository_status_file_is_parsed() -> None:
    """.cvmfs_status.json's last_gc (as recorded in k_s3_cycle) becomes a UNIX time."""
    recorded = b'{\n  "last_gc": "Sun Nov 29 21:15:48 UTC 2026"\n}'
    assert parse_last_gc(recorded) == datetime(2026, 11, 29, 21, 15, 48, tzinfo=UTC).timestamp()
    assert parse_last_gc(b'{"last_gc": "Sun Nov  1 01:02:03 UTC 2026"}') == (
        datetime(2026, 11, 1, 1, 2, 3, tzinfo=UTC).timestamp()
    )
    assert parse_last_gc(b"{}") is None
    assert parse_last_gc(b"not json") is None


def test_whitelist_fingerprint_starting_with_e_is_not_the_expiry() -> None:
    """A certificate fingerprint line beginning with E does not replace the E (expiry) line."""
    text = (
        b"20261129225333\nE20261229225333\nNmaint.example.org\n"
        b"E3:EF:57:00:80:04:ED:E7:4A:92:F5:61:74:BA:47:FA:31:AB:CC:71\n--\n"
    )
    parsed = Whitelist.parse(text + b"0" * 40 + b"\n")
    assert parsed.expires_at == datetime(2026, 12, 29, 22, 53, 33, tzinfo=UTC).timestamp()
    assert parsed.name == "maint.example.org"


# -- resign --------------------------------------------------------------------------------


def test_resign_fires_exactly_when_expiry_comes_within_the_lead_time(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """One second before expiry-minus-lead nothing is signed; at that second the whitelist is."""
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    now = [expiry - 7 * DAY - 1]
    maint = maintenance(clock=lambda: now[0], resign_before_expiry='"7d"', resign_days="30")
    stratum0.set_clock(now[0])
    assert maint.resign_check() is None
    assert stratum0.whitelist_expiry(REPO) == expiry
    assert sample(maint.metrics, "cvmfs_syncd_whitelist_expiry_timestamp_seconds") == expiry
    now[0] += 1
    stratum0.set_clock(now[0])
    result = maint.resign_check()
    assert result is not None
    assert result.ok, result.message
    renewed = stratum0.whitelist_expiry(REPO)
    assert renewed == pytest.approx(now[0] + 30 * DAY, abs=1)
    assert sample(maint.metrics, "cvmfs_syncd_whitelist_expiry_timestamp_seconds") == renewed
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="resign") == 0
    assert maint.resign_check() is None


def test_daemon_restarted_on_day_29_resigns_at_start(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """The start-up check re-signs a whitelist signed 29 days ago (expiry, not a calendar)."""
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    day_29 = expiry - 1 * DAY
    stratum0.set_clock(day_29)
    maint = maintenance(clock=lambda: day_29)
    maint.startup()
    renewed = stratum0.whitelist_expiry(REPO)
    assert renewed is not None
    assert renewed > expiry
    status = maint.status()
    assert status["resign"]["last_outcome"] == "ok"
    assert status["whitelist"]["expires_at"] == renewed


def test_failed_resign_is_retried_and_the_metric_keeps_showing_the_expiry(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """A failing resign is counted, keeps the expiry metric, and its retry renews the whitelist."""
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    now = expiry - 2 * DAY
    stratum0.set_clock(now)
    retries = Deferred()
    maint = maintenance(clock=lambda: now, scheduling=retries)
    stratum0.inject_fault("resign", "fail", times=1)
    result = maint.resign_check()
    assert result is not None
    assert not result.ok
    assert "fake fault" in result.message
    assert sample(maint.metrics, "cvmfs_syncd_whitelist_expiry_timestamp_seconds") == expiry
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failures_total", task="resign") == 1
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="resign") == 1
    assert sample(maint.metrics, "cvmfs_syncd_retries_total", operation="resign") == 1
    assert maint.problems() == [f"{REPO}: resign failing: {result.message}"]
    [(task, retry, delay)] = retries.runs
    assert task == "resign"
    assert delay == pytest.approx(0.1)  # retry_initial_seconds of the test configuration
    retry()
    renewed = stratum0.whitelist_expiry(REPO)
    assert renewed is not None
    assert renewed > expiry
    assert sample(maint.metrics, "cvmfs_syncd_whitelist_expiry_timestamp_seconds") == renewed
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="resign") == 0
    assert maint.problems() == []


def test_master_key_kept_offline_is_reported_not_attempted(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """Without <config_dir>/keys/R.masterkey no resign runs; status and metrics say why."""
    (stratum0.config_dir / "keys" / f"{REPO}.masterkey").unlink()
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    now = expiry - 3 * DAY
    maint = maintenance(clock=lambda: now)
    result = maint.resign_check()
    assert result is not None
    assert result.outcome == "master_key_missing"
    assert not result.verdict.ran
    assert "master key" in result.message
    assert stratum0.whitelist_expiry(REPO) == expiry
    assert sample(maint.metrics, "cvmfs_syncd_master_key_present") == 0
    assert sample(maint.metrics, ENABLED_SINCE, task="resign") == 0
    status = maint.status()
    assert status["master_key_present"] is False
    assert any("master key is not on this host" in p for p in maint.problems())


def test_requested_resign_is_not_repeated_after_someone_signed(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """A resign asked for by the lane signs once; one asked for after an outside resign does not."""
    deferred = Deferred(at_once=True)
    maint = maintenance(scheduling=deferred)
    maint.refresh()
    calls = CallLog(maint.server, ["resign"])
    maint.request_resign()
    assert len(calls.of("resign")) == 1
    first = stratum0.whitelist_expiry(REPO)
    deferred.at_once = False
    maint.request_resign()
    stratum0.set_clock_offset(5)
    stratum0.check_run("resign", "-f", REPO)  # an operator, meanwhile
    deferred.runs[0][1]()
    assert len(calls.of("resign")) == 1
    assert stratum0.whitelist_expiry(REPO) != first


# -- gc ------------------------------------------------------------------------------------


def test_gc_removes_old_automatic_tags_and_collects_swept_revisions(
    tmp_path: Path, staging: Path
) -> None:
    """auto_tag_keep removes generic-* tags older than 7 days (named ones stay), then gc sweeps."""
    stratum0 = FakeStratum0(tmp_path / "root")
    now = stratum0.now()
    base = now - 30 * DAY
    stratum0.set_clock(base)
    stratum0.mkfs(REPO, gc=True)
    for day, content in ((10, "v2"), (20, "v3"), (29, "v4")):
        stratum0.set_clock(base + day * DAY)
        publish_file(stratum0, "file.txt", content)
        if day == 20:
            stratum0.check_run("tag", "-a", "release-1", REPO)
    stratum0.set_clock(now)
    stratum0.check_run("resign", "-f", REPO)
    assert stratum0.tags(REPO)["release-1"] == 3
    config = load_config(
        tmp_path,
        stratum0,
        staging,
        maintenance_toml(gc_schedule='"0 3 * * 0"', gc_keep='"3d"', auto_tag_keep='"7d"'),
    )
    state = State(config.daemon.state_dir)
    maint = RepositoryMaintenance(
        config,
        config.repositories[0],
        layout=load_layout(config.cvmfs.config_dir, REPO),
        server=make_server(config),
        metrics=Metrics(),
        state=state,
        clock=lambda: now,
    )
    result = maint.gc_locked()
    state.close()
    assert result is not None
    assert result.ok, result.message
    assert "removed 3 automatic tags" in result.message
    left = stratum0.tags(REPO)
    assert "release-1" in left
    assert "trunk" in left
    assert "trunk-previous" in left
    automatic = [name for name in left if name.startswith("generic")]
    assert len(automatic) == 1
    assert left[automatic[0]] == 4
    with pytest.raises(FileNotFoundError):
        stratum0.catalog(REPO, 2)
    assert stratum0.read_file(REPO, "file.txt", revision=3) == b"v3"
    assert stratum0.read_file(REPO, "file.txt") == b"v4"
    assert sample(maint.metrics, LAST_SUCCESS, task="gc") == now
    stratum0.kill_orphans()


def test_gc_without_garbage_collection_enabled_is_skipped_once_not_failed(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """A repository without CVMFS_GARBAGE_COLLECTION: gc is not run, not counted, not alerted."""
    stratum0.set_config(REPO, "CVMFS_GARBAGE_COLLECTION", "false")
    maint = maintenance(gc_schedule='"0 3 * * 0"')
    calls = CallLog(maint.server, ["gc"])
    result = maint.gc_locked()
    assert result is not None
    assert result.verdict is Verdict.SKIPPED
    assert "CVMFS_GARBAGE_COLLECTION" in result.message
    assert calls.of("gc") == []
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failures_total", task="gc") == 0
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="gc") == 0
    assert sample(maint.metrics, ENABLED_SINCE, task="gc") == 0
    assert maint.status()["gc_settings"]["enabled"] is False


def test_gc_refused_by_the_tool_disables_it_without_alerting(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """GC_NOT_ENABLED from cvmfs_server itself (server.conf changed behind us) is a skip too."""
    maint = maintenance(gc_schedule='"0 3 * * 0"')
    stratum0.inject_fault(
        "gc", "exit", stderr=f"Garbage Collection is not enabled for {REPO}\n", times=1
    )
    result = maint.gc_locked()
    assert result is not None
    assert result.verdict is Verdict.SKIPPED
    assert result.outcome == "disabled"
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="gc") == 0
    assert sample(maint.metrics, ENABLED_SINCE, task="gc") == 0


def test_foreign_transaction_blocks_gc_without_being_aborted(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """gc meets someone's open transaction: it does not run, aborts nothing, and is retried."""
    retries = Deferred()
    maint = maintenance(gc_schedule='"0 3 * * 0"', scheduling=retries)
    calls = CallLog(maint.server, ["gc", "abort", "tag_list", "tag_remove"])
    stratum0.check_run("transaction", REPO)
    result = maint.gc_locked()
    assert result is not None
    assert result.outcome == "foreign_transaction"
    assert result.verdict.retry
    assert calls.calls == []
    assert stratum0.in_transaction(REPO)
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failures_total", task="gc") == 1
    assert sample(maint.metrics, "cvmfs_syncd_retries_total", operation="gc") == 1
    assert retries.tasks() == ["gc"]
    stratum0.check_run("abort", "-f", REPO)
    again = maint.gc_locked()
    assert again is not None
    assert again.ok, again.message
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="gc") == 0


def test_gc_without_a_running_lane_fails_and_is_retried(maintenance: Factory) -> None:
    """The scheduled gc finds no running lane: nothing runs, the run is counted and retried."""
    retries = Deferred()
    maint = maintenance(gc_schedule='"0 3 * * 0"', scheduling=retries)
    calls = CallLog(maint.server, ["gc"])
    maint.submit_gc()
    assert calls.calls == []
    assert retries.tasks() == ["gc"]
    assert maint.status()["gc"]["last_outcome"] == "lane_not_running"
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failures_total", task="gc") == 1


def test_gc_waits_while_a_check_runs(maintenance: Factory) -> None:
    """gc does not delete objects while a check (which may read them all) holds the check lock."""
    maint = maintenance(gc_schedule='"0 3 * * 0"')
    check_lock = RepositoryLock(maint.state_dir, REPO, name="check")
    assert check_lock.acquire(timeout=1)
    try:
        result = maint.gc_locked()
    finally:
        check_lock.release()
    assert result is not None
    assert result.outcome == "check_running"
    assert result.verdict.retry


# -- check ---------------------------------------------------------------------------------


def test_check_records_problems_and_works_during_a_transaction(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """check finds a missing object (failing, no quick retry); it runs during a transaction."""
    publish_file(stratum0, "data.txt", "some data\n")
    retries = Deferred()
    maint = maintenance(check_schedule='"0 4 * * *"', scheduling=retries)
    entry = stratum0.published_tree(REPO)["data.txt"]
    assert entry.hash is not None
    obj = stratum0.object_path(REPO, entry.hash)
    saved = obj.read_bytes()
    obj.unlink()
    result = maint.check()
    assert result is not None
    assert result.outcome == Outcome.CHECK_FAILED.value
    assert "missing" in result.message
    assert retries.runs == []
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="check") == 1
    obj.write_bytes(saved)
    stratum0.check_run("transaction", REPO)
    result = maint.check()
    assert result is not None
    assert result.ok, result.message
    assert stratum0.in_transaction(REPO)
    assert sample(maint.metrics, "cvmfs_syncd_maintenance_failing", task="check") == 0
    duration = sample(maint.metrics, "cvmfs_syncd_maintenance_last_duration_seconds", task="check")
    assert duration is not None
    assert duration > 0


def test_check_integrity_passes_dash_i(stratum0: FakeStratum0, maintenance: Factory) -> None:
    """check_integrity = true runs `check -i`, which finds a corrupted object plain check misses."""
    publish_file(stratum0, "data.txt", "some data\n")
    entry = stratum0.published_tree(REPO)["data.txt"]
    assert entry.hash is not None
    obj = stratum0.object_path(REPO, entry.hash)
    obj.chmod(0o644)
    obj.write_bytes(b"corrupted")
    plain = maintenance(check_schedule='"0 4 * * *"').check()
    assert plain is not None
    assert plain.ok
    thorough = maintenance(check_schedule='"0 4 * * *"', check_integrity="true").check()
    assert thorough is not None
    assert thorough.outcome == Outcome.CHECK_FAILED.value


# -- repair and records --------------------------------------------------------------------


def test_repair_mounts_a_missing_union_and_reports_what_it_cannot_fix(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """Missing mounts are mounted again; with a transaction open nothing is touched, only said."""
    maint = maintenance()
    stratum0.unmount(REPO, union=True, rdonly=True)
    findings = maint.repair()
    assert any("running cvmfs_server mount" in f for f in findings)
    assert stratum0.state(REPO)["mount_mode"] == "ro"
    assert stratum0.state(REPO)["rdonly_mounted"]
    assert maint.repair() == []
    stratum0.check_run("transaction", REPO)
    stratum0.unmount(REPO)
    calls = CallLog(maint.server, ["mount", "abort"])
    findings = maint.repair()
    assert calls.calls == []
    assert any("only abort repairs it" in f for f in findings)
    assert stratum0.in_transaction(REPO)
    assert maint.status()["repair"] == findings


def test_last_success_survives_a_restart(maintenance: Factory) -> None:
    """Last successes are kept in the state directory and the repository's own gc status file."""
    first = maintenance(gc_schedule='"0 3 * * 0"', check_schedule='"0 4 * * *"')
    gc_result = first.gc_locked()
    check_result = first.check()
    assert gc_result is not None
    assert gc_result.ok
    assert check_result is not None
    assert check_result.ok
    second = maintenance(gc_schedule='"0 3 * * 0"', check_schedule='"0 4 * * *"')
    second.refresh()
    for task in ("gc", "check"):
        before = first.status()[task]["last_success"]
        assert before
        after = second.status()[task]["last_success"]
        assert after == pytest.approx(before, abs=1)
    enabled = sample(second.metrics, ENABLED_SINCE, task="gc")
    assert enabled == first.status()["gc"]["enabled_since"]


def test_gc_waiting_behind_a_check_is_retried_beyond_the_cap(maintenance: Factory) -> None:
    """Waiting behind a long check (or a foreign transaction) never exhausts gc's retries;
    real failures stop after MAX_RETRIES until the next scheduled run."""
    retries = Deferred()
    maint = maintenance(gc_schedule='"0 3 * * 0"', scheduling=retries)
    check_lock = RepositoryLock(maint.state_dir, REPO, name="check")
    assert check_lock.acquire(timeout=1)
    try:
        for _ in range(MAX_RETRIES + 5):
            maint.gc_locked()
    finally:
        check_lock.release()
    assert retries.tasks() == ["gc"] * (MAX_RETRIES + 5)
    retries.runs.clear()
    maint.submit_gc()  # no lane: a failure of its own, the (MAX_RETRIES + 6)th in a row
    assert retries.tasks() == []
    assert maint.status()["gc"]["last_outcome"] == "lane_not_running"


def test_a_gateway_publisher_leaves_resign_and_gc_to_the_gateway_host(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """Behind a gateway resign, gc and tag edits fail on a publisher (gateway.md 19): with a
    resign due and gc asked for, nothing runs, nothing alerts, and status says why."""
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    stratum0.set_config(
        REPO,
        "CVMFS_UPSTREAM_STORAGE",
        f"gw,/srv/cvmfs/{REPO}/data/txn,http://127.0.0.1:9/api/v1",
    )
    now = expiry - 3 * DAY
    maint = maintenance(clock=lambda: now, gc_schedule='"0 3 * * *"')
    calls = CallLog(maint.server, ["resign", "gc", "tag_list", "tag_remove"])
    for result in (maint.resign_check(), maint.resign(), maint.gc_locked()):
        assert result is not None
        assert result.verdict is Verdict.SKIPPED
        assert "gateway" in result.message
    maint.request_resign()
    assert calls.names() == []
    assert sample(maint.metrics, ENABLED_SINCE, task="resign") == 0
    assert sample(maint.metrics, ENABLED_SINCE, task="gc") == 0
    status = maint.status()
    assert status["gateway_publisher"]["off"] == ["resign", "gc", "tag cleanup"]
    assert not any("master key" in p for p in maint.problems())


def test_on_the_gateway_host_gc_is_off_and_resign_runs(
    stratum0: FakeStratum0, maintenance: Factory
) -> None:
    """The gateway host (its repo.json lists the repository) re-signs and checks; gc and tag
    edits would race the receiver's commits (not recorded), so they stay off and say why."""
    gateway_conf = stratum0.config_dir / "gateway" / "repo.json"
    gateway_conf.parent.mkdir(parents=True, exist_ok=True)
    gateway_conf.write_text(
        json.dumps({"version": 2, "repos": [{"domain": REPO, "keys": [{"id": "k", "path": "/"}]}]})
    )
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    maint = maintenance(clock=lambda: expiry - 3 * DAY, gc_schedule='"0 3 * * *"')
    calls = CallLog(maint.server, ["gc", "tag_remove"])
    result = maint.gc_locked()
    assert result is not None
    assert result.verdict is Verdict.SKIPPED
    assert "gateway" in result.message
    assert calls.names() == []
    resigned = maint.resign_check()
    assert resigned is not None
    assert resigned.verdict is Verdict.DONE
    assert maint.status()["gateway_host"]["off"] == ["gc", "tag cleanup"]
