"""End-to-end tests: the real daemon process against the fake cvmfs_server."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import REPO, DaemonUnderTest
from tests.support import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonUnderTest]:
    """A daemon (not started yet) with its fake stratum 0 and staging directory."""
    under_test = DaemonUnderTest(tmp_path)
    yield under_test
    under_test.stop()


def _journal_stages(daemon: DaemonUnderTest) -> list[str]:
    db = sqlite3.connect(daemon.tmp_path / "state" / "state.sqlite")
    try:
        return [str(r[0]) for r in db.execute("SELECT stage FROM batches ORDER BY id")]
    finally:
        db.close()


def _drop_tree(staging: Path) -> None:
    (staging / "pkg" / "bin").mkdir(parents=True, exist_ok=True)
    (staging / "pkg" / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    (staging / "pkg" / "bin" / "tool").chmod(0o755)
    (staging / "pkg" / "README").write_text("read me\n")
    (staging / "pkg" / "current").symlink_to("bin/tool")


def test_drop_is_published_and_reported_live(daemon: DaemonUnderTest) -> None:
    """A dropped file goes live; `wait` and /status say so; /metrics counts the publish."""
    daemon.start()
    _drop_tree(daemon.staging)
    result = daemon.cli("wait", str(daemon.staging / "pkg" / "README"), "--timeout", "30")
    assert result.returncode == 0, result.stderr + daemon.log()
    daemon.wait_converged()
    status, body = daemon.get(f"/status?path={daemon.staging / 'pkg' / 'README'}")
    assert status == 200
    assert body["path"]["live"] is True
    status, text = daemon.get("/metrics")
    assert status == 200
    assert f'cvmfs_syncd_publishes_total{{repository="{REPO}"}}' in text
    assert "cvmfs_syncd_drop_to_published_seconds_bucket" in text
    (daemon.staging / "pkg" / "README").write_text("a newer version\n")
    status, body = daemon.get(f"/status?path={daemon.staging / 'pkg' / 'README'}")
    assert body["path"]["live"] is False
    daemon.wait_converged()
    shown = daemon.cli("status")
    assert shown.returncode == 0
    assert REPO in shown.stdout


def test_wait_times_out_for_a_file_that_is_never_published(daemon: DaemonUnderTest) -> None:
    """`wait` exits 3 when the file does not go live in time (here: a temporary name)."""
    daemon.start()
    (daemon.staging / "upload.part").write_text("half")
    result = daemon.cli("wait", str(daemon.staging / "upload.part"), "--timeout", "2")
    assert result.returncode == 3


# (fault command, fault point, what must be true before the kill)
KILL_POINTS = [
    ("transaction", "start", "opening"),
    ("transaction", "after_lock", "opening+lock"),
    ("publish", "start", "publishing"),
    ("publish", "after_upload", "publishing"),
    ("publish", "after_manifest", "revision"),
    ("publish", "end", "revision"),
]


@pytest.mark.parametrize(("command", "point", "evidence"), KILL_POINTS)
def test_kill_9_at_each_journal_stage_converges(
    daemon: DaemonUnderTest, command: str, point: str, evidence: str
) -> None:
    """kill -9 while cvmfs_server hangs at each step; the restarted daemon converges."""
    daemon.start()
    (daemon.staging / "first").write_text("first")
    daemon.wait_converged()
    revision = daemon.stratum0.revision(REPO)
    daemon.stratum0.inject_fault(command, "hang", at=point, times=1)
    _drop_tree(daemon.staging)

    def reached() -> bool:
        stages = _journal_stages(daemon)
        if evidence == "opening":
            return stages[-1] == "opening"
        if evidence == "opening+lock":
            return stages[-1] == "opening" and daemon.stratum0.in_transaction(REPO)
        if evidence == "publishing":
            return stages[-1] == "publishing"
        return daemon.stratum0.revision(REPO) > revision

    wait_for(reached, 30, f"the daemon to hang at {command}/{point}")
    daemon.kill()
    daemon.stratum0.clear_faults()
    daemon.start()
    daemon.wait_converged()
    assert not daemon.stratum0.violations()
    wait_for(lambda: _journal_stages(daemon)[-1] in ("done", "aborted"), 10, "the journal")
    assert all(s in ("done", "aborted", "failed") for s in _journal_stages(daemon))


def test_storage_outage_during_publish_is_finished_without_abort(daemon: DaemonUnderTest) -> None:
    """A publish failing on unreachable storage is retried with a plain publish (no abort)."""
    daemon.start()
    daemon.stratum0.inject_fault("publish", "fail", at="upload", times=2)
    _drop_tree(daemon.staging)
    daemon.wait_converged()
    _, text = daemon.get("/metrics")
    series = f'outcome="storage_unreachable",repository="{REPO}"'
    assert f"cvmfs_syncd_publish_failures_total{{{series}}} 2.0" in text
    assert "aborted own transaction" not in daemon.log()


def test_rejected_input_is_set_aside_and_the_rest_published(daemon: DaemonUnderTest) -> None:
    """A publish that rejects one input: our transaction is aborted, the rest goes live."""
    daemon.start()
    (daemon.staging / "good").write_text("good")
    (daemon.staging / "bad").write_text("bad")
    daemon.stratum0.inject_fault(
        "publish",
        "exit",
        at="start",
        times=1,
        exit_code=1,
        stdout="(fs traversal) Failed to parse value of size=abc\n",
        stderr=(
            "PANIC: encountered a grafted file (bad) with invalid grafting information\n"
            "Encountered a grafted file (bad) with invalid grafting information\n"
            "Synchronization failed\n"
        ),
    )

    def good_live() -> bool:
        return "good" in daemon.published()

    wait_for(good_live, 30, "the good file to be published")
    assert "bad" not in daemon.published()
    _, body = daemon.get("/status")
    aside = body["repositories"][REPO]["set_aside"]
    assert [a["path"] for a in aside] == ["bad"]
    assert not daemon.stratum0.in_transaction(REPO)


def test_failing_abort_holds_the_lane_then_recovers(daemon: DaemonUnderTest) -> None:
    """While abort fails the lane is held and alerts; once abort works publishing resumes."""
    daemon.start()
    daemon.stratum0.inject_fault(
        "publish",
        "exit",
        at="start",
        times=1,
        exit_code=1,
        stderr="Encountered a grafted file (x) with invalid grafting information\n",
    )
    daemon.stratum0.inject_fault("abort", "fail", times=3)
    (daemon.staging / "x").write_text("x")
    wait_for(lambda: "input rejected by publish" in daemon.log(), 30, "the abort to succeed")
    assert not daemon.stratum0.in_transaction(REPO)
    _, text = daemon.get("/metrics")
    assert f'cvmfs_syncd_retries_total{{operation="abort",repository="{REPO}"}} 3.0' in text
    assert f'cvmfs_syncd_lane_held{{reason="abort-failed",repository="{REPO}"}} 0.0' in text
    held = [line for line in daemon.log().splitlines() if '"publishing held"' in line]
    assert held
    assert "abort failed" in held[0]
    (daemon.staging / "y").write_text("y")
    wait_for(lambda: "y" in daemon.published(), 30, "publishing to resume")


def test_foreign_transaction_is_left_alone(daemon: DaemonUnderTest) -> None:
    """An operator's open transaction is never aborted; the daemon waits and says so."""
    daemon.stratum0.run("transaction", REPO)
    daemon.start()
    (daemon.staging / "a").write_text("a")
    wait_for(
        lambda: (
            "cvmfs_syncd_foreign_transaction_open" in str(daemon.get("/metrics")[1])
            and f'cvmfs_syncd_foreign_transaction_open{{repository="{REPO}"}} 1.0'
            in str(daemon.get("/metrics")[1])
        ),
        30,
        "the foreign transaction metric",
    )
    assert daemon.stratum0.in_transaction(REPO)
    daemon.stratum0.run("abort", "-f", REPO)
    daemon.wait_converged()


def test_sigterm_lets_the_inflight_publish_finish(daemon: DaemonUnderTest) -> None:
    """SIGTERM during a slow publish: the publish completes, the journal is done, exit 0."""
    daemon.start()
    daemon.stratum0.inject_fault("publish", "delay", at="before_sync", delay=2.0, times=1)
    (daemon.staging / "a").write_text("a")
    wait_for(
        lambda: daemon.stratum0.state(REPO)["is_publishing_lock"],
        30,
        "the slow publish to be under way",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert not daemon.stratum0.in_transaction(REPO)
    assert _journal_stages(daemon)[-1] == "done"
    assert "a" in daemon.published()


def test_sigterm_while_publish_retries_aborts_own_transaction(daemon: DaemonUnderTest) -> None:
    """SIGTERM while storage is down: the daemon aborts its own transaction and exits 0."""
    daemon.start()
    daemon.stratum0.inject_fault("publish", "fail", at="upload")
    (daemon.staging / "a").write_text("a")
    wait_for(lambda: "publish failed" in daemon.log(), 30, "a failed publish")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert not daemon.stratum0.in_transaction(REPO)
    assert _journal_stages(daemon)[-1] == "aborted"


def test_sync_command_publishes_everything(daemon: DaemonUnderTest) -> None:
    """`cvmfs-syncd sync` publishes pending inputs and exits 0 only when in sync."""
    _drop_tree(daemon.staging)
    result = daemon.cli("sync", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert daemon.converged()
    daemon.stratum0.run("transaction", REPO)
    (daemon.staging / "more").write_text("more")
    result = daemon.cli("sync", "--timeout", "5")
    assert result.returncode == 1
    assert "did not open" in result.stderr


def test_file_moved_in_from_elsewhere_is_published(daemon: DaemonUnderTest) -> None:
    """A file renamed into staging from another directory (no close event) goes live."""
    daemon.start()
    outside = daemon.tmp_path / "build-output.tar"
    outside.write_bytes(b"artifact" * 1000)
    outside.rename(daemon.staging / "artifact.tar")
    result = daemon.cli("wait", str(daemon.staging / "artifact.tar"), "--timeout", "30")
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    daemon.wait_converged()


def test_sigterm_with_failing_abort_exits_nonzero_and_recovers(daemon: DaemonUnderTest) -> None:
    """If our abort fails at shutdown the daemon exits 1; the next start finishes the batch."""
    daemon.start()
    daemon.stratum0.inject_fault("publish", "fail", at="upload")
    daemon.stratum0.inject_fault("abort", "fail")
    (daemon.staging / "a").write_text("a")
    wait_for(lambda: "publish failed" in daemon.log(), 30, "a failed publish")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 1
    assert daemon.stratum0.in_transaction(REPO)
    assert _journal_stages(daemon)[-1] in ("publishing", "applied")
    daemon.stratum0.clear_faults()
    daemon.start()
    daemon.wait_converged()
    # The tree is live as soon as cvmfs_server publish ends; the journal follows a moment later.
    wait_for(lambda: _journal_stages(daemon)[-1] == "done", 10, "the journal")


def test_reload_adds_and_removes_repositories(daemon: DaemonUnderTest) -> None:
    """SIGHUP with a new [[repository]] starts its lane; removing it stops that lane."""
    daemon.start()
    second = "second.example.org"
    daemon.stratum0.mkfs(second)
    other = daemon.tmp_path / "staging2"
    other.mkdir()
    original = daemon.config_path.read_text()
    daemon.config_path.write_text(
        original
        + f'\n[[repository]]\nname = "{second}"\nquiet_seconds = 0.2\nmax_batch_seconds = 2\n'
        f'  [[repository.staging]]\n  path = "{other}"\n  settle_seconds = 0.1\n'
    )
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "repository lane started by reload" in daemon.log(), 30, "the new lane")
    (other / "x").write_text("x")
    wait_for(lambda: "x" in daemon.stratum0.published_tree(second), 30, "the new repository")
    daemon.config_path.write_text(original)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "repository lane stopped by reload" in daemon.log(), 30, "the lane to stop")
    _, body = daemon.get("/status")
    assert set(body["repositories"]) == {REPO}


def test_command_left_running_by_a_killed_daemon_is_stopped_at_restart(
    daemon: DaemonUnderTest,
) -> None:
    """kill -9 during a slow `transaction`: the restart stops that command before recovering,
    so it cannot open a transaction later that would look foreign forever."""
    # The daemon must not kill the hanging command itself (its transaction timeout) before
    # the test kills the daemon, however slow a loaded machine is.
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(
        text.replace("transaction_timeout_seconds = 20", "transaction_timeout_seconds = 600")
    )
    daemon.start()
    # it outlives the daemon whatever the machine's load; the restart must stop it
    daemon.stratum0.inject_fault("transaction", "hang", times=1)
    (daemon.staging / "a").write_text("a")

    def command_journalled() -> bool:
        db = sqlite3.connect(daemon.tmp_path / "state" / "state.sqlite")
        try:
            rows = db.execute("SELECT stage, pgid FROM batches ORDER BY id").fetchall()
        finally:
            db.close()
        return bool(rows) and rows[-1][0] == "opening" and rows[-1][1] is not None

    wait_for(command_journalled, 30, "the slow transaction to be journalled")
    faults = daemon.stratum0.root / "fake-faults.json"
    # The command took its fault (it hangs now) before the daemon dies: a fake still
    # starting up on a loaded machine would otherwise miss it once the faults are cleared.
    wait_for(lambda: json.loads(faults.read_text() or "[]") == [], 30, "the hang to be taken")
    daemon.kill(orphans=False)
    left = set(daemon.stratum0.orphans())
    assert left  # the command outlived the daemon
    daemon.stratum0.clear_faults()
    daemon.start()
    daemon.wait_converged()
    # (a command of the new daemon, e.g. its publish still exiting, may be running now)
    assert not left & set(daemon.stratum0.orphans())
    assert "stopping commands left by the previous run" in daemon.log()


@pytest.mark.parametrize("point", ["after_upload", "end"])
def test_an_orphaned_publish_that_goes_on_after_a_kill_9_is_recovered(
    daemon: DaemonUnderTest, point: str
) -> None:
    """faults.md F8: with the daemon killed, its publish goes on in its own session until
    its next output fails on the closed pipe (after_upload: transaction left open, union
    read/write) or finishes by itself (end). The restart converges either way."""
    daemon.start()
    (daemon.staging / "first").write_text("first")
    daemon.wait_converged()
    daemon.stratum0.inject_fault("publish", "orphaned", at=point, times=1)
    (daemon.staging / "second").write_text("second")
    wait_for(lambda: not daemon.stratum0.faults(), 30, "the publish to reach the fault")
    daemon.kill(orphans=False)
    wait_for(lambda: not daemon.stratum0.orphans(), 30, "the orphaned publish to end")
    daemon.start()
    daemon.wait_converged()
    assert not daemon.stratum0.violations()
    assert not daemon.stratum0.in_transaction(REPO)
    wait_for(lambda: _journal_stages(daemon)[-1] in ("done", "aborted"), 10, "the journal")
