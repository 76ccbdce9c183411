"""One test per row of docs/failures.md: how a lane reacts to each recorded publish failure.

The failures are provoked for real in the fake cvmfs_server (open descriptors under the
union directory, a vanished mount, an aborted transaction, an expired whitelist) right
before the lane's first publish attempt.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.outcomes import CommandResult, Outcome
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.pipeline.transaction import lease_wait
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "failures.example.org"

pytestmark = pytest.mark.stratum0(REPO)


def _nothing() -> None:
    pass


class Recorder:
    """Wraps the lane's cvmfs adapter: records publish, abort and mount calls, and runs
    hooks before the first publish, before every publish and after every publish."""

    def __init__(
        self,
        lane: Lane,
        before_first_publish: Callable[[], None] = _nothing,
        *,
        before_publish: Callable[[], None] = _nothing,
        after_publish: Callable[[], None] = _nothing,
    ) -> None:
        self.lane = lane
        self.hook = before_first_publish
        self.before_publish = before_publish
        self.after_publish = after_publish
        self.calls: list[tuple[str, dict[str, Any], Outcome]] = []
        self.server = lane.server
        self._publish = self.server.publish
        self._abort = self.server.abort
        self._mount = self.server.mount
        self.server.publish = self.publish  # type: ignore[method-assign]
        self.server.abort = self.abort  # type: ignore[method-assign]
        self.server.mount = self.mount  # type: ignore[method-assign]

    def publish(self, repo: str, **kw: Any) -> CommandResult:
        if not any(name == "publish" for name, _, _ in self.calls):
            self.hook()
        self.before_publish()
        result = self._publish(repo, **kw)
        self.after_publish()
        self.calls.append(("publish", kw, result.outcome))
        return result

    def abort(self, repo: str, **kw: Any) -> CommandResult:
        result = self._abort(repo, **kw)
        self.calls.append(("abort", kw, result.outcome))
        return result

    def mount(self, repo: str, **kw: Any) -> CommandResult:
        result = self._mount(repo, **kw)
        self.calls.append(("mount", kw, result.outcome))
        return result

    def names(self) -> list[tuple[str, Outcome]]:
        return [(name, outcome) for name, _, outcome in self.calls]


@pytest.fixture
def setup(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> Iterator[tuple[FakeStratum0, Path, Lane]]:
    """A fake stratum 0, a staging directory with one file, and a lane."""
    (staging / "file.txt").write_text("content\n")
    path = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
    )
    config = config_mod.load(path)
    state = State(config.daemon.state_dir)
    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
    yield stratum0, staging, lane
    state.close()


def _published(stratum0: FakeStratum0) -> bool:
    return stratum0.published_tree(REPO).get("file.txt") is not None


def _failures(lane: Lane, outcome: str) -> float:
    value = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_publish_failures_total", {"repository": REPO, "outcome": outcome}
    )
    return value or 0.0


def test_open_writers_are_waited_out_without_force(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """OPEN_WRITERS: publish is retried with back-off, never with -f; the transaction stays ours."""
    stratum0, _, lane = setup
    handles: list[io.TextIOWrapper] = []

    def hold_writer() -> None:
        handles.append((stratum0.union_dir(REPO) / "held").open("w"))

    def release() -> None:
        for handle in handles:
            handle.close()
        (stratum0.union_dir(REPO) / "held").unlink(missing_ok=True)

    recorder = Recorder(lane, hold_writer, after_publish=release)
    ok, why = lane.sync_once(30)
    assert ok, why
    assert recorder.names()[:2] == [
        ("publish", Outcome.OPEN_WRITERS),
        ("publish", Outcome.OK),
    ]
    assert all(not kw.get("force") for _, kw, _ in recorder.calls)
    assert _failures(lane, "open_writers") == 1
    assert _published(stratum0)


def test_open_readers_are_logged_then_forced(setup: tuple[FakeStratum0, Path, Lane]) -> None:
    """OPEN_READERS: the holders are logged and publish is retried once with -f."""
    stratum0, _, lane = setup
    handles: list[io.BufferedReader] = []
    target = stratum0.union_dir(REPO) / "new_repository"
    recorder = Recorder(lane, lambda: handles.append(target.open("rb")))
    try:
        ok, why = lane.sync_once(30)
    finally:
        for handle in handles:
            handle.close()
    assert ok, why
    assert recorder.names() == [("publish", Outcome.OPEN_READERS), ("publish", Outcome.OK)]
    assert recorder.calls[1][1]["force"] is True
    assert _published(stratum0)


INVALID_LEASE_STDERR = """\
SessionContext::DoUpload - error reply: {"reason":"invalid lease","status":"error"}
terminate called after throwing an instance of 'ECvmfsException'
  what():  PANIC: <src>/cvmfs/session_context.cc : 405
SessionContext: could not submit payload. Aborting.
Killed
Synchronization failed
"""


def test_expired_gateway_lease_aborts_and_publishes_the_batch_again(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """LEASE_INVALID (p_gateway_lease_expiry 5): publish never succeeds on an expired lease,
    so the transaction is aborted with -f and the batch planned and published again."""
    stratum0, _, lane = setup
    stratum0.inject_fault("publish", "fail", exit_code=1, stderr=INVALID_LEASE_STDERR, times=1)
    recorder = Recorder(lane)
    ok, why = lane.sync_once(30)
    assert ok, why
    names = recorder.names()
    assert names[0] == ("publish", Outcome.LEASE_INVALID)
    assert names[1] == ("abort", Outcome.OK)
    assert names[-1] == ("publish", Outcome.OK)
    assert _published(stratum0)


def test_busy_gateway_lease_is_waited_for_without_an_error(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """LEASE_BUSY (p_gateway_conflict 2): contention with another publisher is a wait for
    about the time the gateway says remains, not a failure shown to operators."""
    stratum0, _, lane = setup
    stratum0.inject_fault(
        "transaction",
        "fail",
        exit_code=16,
        stdout="Path busy. Time remaining = 0.2s\n",
        stderr="CernVM-FS transaction error: lease path busy\n",
        times=2,
    )

    def gauge() -> float | None:
        return lane.metrics.registry.get_sample_value(
            "cvmfs_syncd_lease_wait_since_timestamp_seconds", {"repository": REPO}
        )

    seen: list[float | None] = []
    pause = lane.pause

    def watching_pause(delay: float, abort_batch: int | None = None) -> None:
        seen.append(gauge())
        pause(delay, abort_batch)

    lane.pause = watching_pause  # type: ignore[method-assign]
    ok, why = lane.sync_once(30)
    assert ok, why
    assert _published(stratum0)
    assert lane.status().last_error == ""
    assert stratum0.faults() == []
    assert len(seen) == 2
    assert seen[0] is not None
    assert seen[0] > 0
    assert seen[0] == seen[1]  # one wait, since its first refusal
    assert gauge() == 0  # the alert's gauge clears once the lease is granted


def test_lease_wait_follows_the_remaining_time_within_the_back_off() -> None:
    """Wait about the other lease's remaining time, never longer than the back-off, jittered."""
    for _ in range(50):
        assert 0.4 <= lease_wait(0.5, 10.0) <= 0.6
        assert 8.0 <= lease_wait(30.0, 10.0) <= 12.0
        assert 4.0 <= lease_wait(None, 5.0) <= 6.0
        assert 0.4 <= lease_wait(0.0, 10.0) <= 0.6


def test_lost_union_mount_aborts_own_transaction_and_repairs(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """CANNOT_REPAIR: abort our own transaction, run mount, publish the batch again."""
    stratum0, _, lane = setup
    recorder = Recorder(lane, lambda: stratum0.unmount(REPO, union=True))
    ok, why = lane.sync_once(30)
    assert ok, why
    names = recorder.names()
    assert names[0] == ("publish", Outcome.CANNOT_REPAIR)
    assert ("abort", Outcome.OK) in names
    assert any(name == "mount" for name, _ in names)
    assert names[-1] == ("publish", Outcome.OK)
    assert _published(stratum0)


def test_vanished_transaction_requeues_the_batch(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """NOT_IN_TRANSACTION after our publish: the batch is re-queued and published later."""
    stratum0, _, lane = setup

    def abort_behind_our_back() -> None:
        stratum0.check_run("abort", "-f", REPO)

    recorder = Recorder(lane, abort_behind_our_back)
    ok, why = lane.sync_once(30)
    assert ok, why
    assert recorder.names()[0] == ("publish", Outcome.NOT_IN_TRANSACTION)
    assert recorder.names()[-1] == ("publish", Outcome.OK)
    stages = [b.stage for b in lane.state.recent_batches(REPO)]
    assert "failed" in stages
    assert stages[0] == "done"
    assert _published(stratum0)


def test_expired_whitelist_holds_until_resigned_without_abort(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """WHITELIST_EXPIRED: hold, ask for a resign, then finish the same transaction (no abort)."""
    stratum0, _, lane = setup
    expiry = stratum0.whitelist_expiry(REPO)
    assert expiry is not None
    resigned: list[bool] = []

    def resign() -> None:
        stratum0.set_clock(None)
        stratum0.check_run("resign", REPO)
        resigned.append(True)

    lane.on_whitelist_expired = resign
    recorder = Recorder(lane, lambda: stratum0.set_clock(expiry + 60))
    ok, why = lane.sync_once(30)
    assert ok, why
    assert recorder.names() == [("publish", Outcome.WHITELIST_EXPIRED), ("publish", Outcome.OK)]
    assert resigned == [True]
    assert lane.status().held == ""
    assert _published(stratum0)


def test_own_stuck_transaction_sets_the_open_since_gauge(
    setup: tuple[FakeStratum0, Path, Lane],
) -> None:
    """While a publish retries (storage down), the transaction-open-since gauge is set."""
    stratum0, _, lane = setup
    stratum0.inject_fault("publish", "fail", at="upload", times=1)
    seen: list[float | None] = []

    def look() -> None:
        seen.append(
            lane.metrics.registry.get_sample_value(
                "cvmfs_syncd_transaction_open_since_timestamp_seconds", {"repository": REPO}
            )
        )

    Recorder(lane, before_publish=look)
    ok, why = lane.sync_once(30)
    assert ok, why
    assert len(seen) == 2
    assert all(value is not None and value > 0 for value in seen)
