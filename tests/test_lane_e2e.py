"""End-to-end tests of a repository lane against the stateful fake cvmfs_server (in process)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.config import Config
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Op
from cvmfs_syncd.pipeline.confirm import revision_of_batch
from cvmfs_syncd.pipeline.transaction import Transaction
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import Tree, client_tree, staging_tree, write_config

REPO = "test.example.org"

LaneFactory = Callable[..., Lane]

pytestmark = pytest.mark.stratum0(REPO)


def make_lane_config(tmp_path: Path, stratum0: FakeStratum0, staging: Path, **kw: str) -> Config:
    """Write and load a configuration for the fake."""
    path = write_config(
        tmp_path / "cvmfs-syncd.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
        **kw,
    )
    return config_mod.load(path)


@pytest.fixture
def lane_factory(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[LaneFactory]:
    """Build lanes (not started) and close their state afterwards."""
    states: list[State] = []

    def build(**kw: str) -> Lane:
        config = make_lane_config(tmp_path, stratum0, staging, **kw)
        state = State(config.daemon.state_dir)
        states.append(state)
        return build_lane(config, config.repositories[0], state, Metrics(), make_server(config))

    yield build
    for state in states:
        state.close()


def _publish_then_delete_most(lane_factory: LaneFactory, staging: Path) -> Lane:
    """Publish 20 files, then delete 15 of them from staging (a mass deletion)."""
    for i in range(20):
        (staging / f"f{i}").write_text(str(i))
    lane = lane_factory()
    _sync(lane)
    for i in range(15):
        (staging / f"f{i}").unlink()
    return lane


def _sync(lane: Lane) -> None:
    ok, why = lane.sync_once(60)
    assert ok, why


def test_sync_publishes_a_tree_byte_for_byte(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Files, directories, modes, empty files and symlinks are published exactly."""
    (staging / "dir" / "sub").mkdir(parents=True)
    (staging / "dir" / "a.txt").write_bytes(b"hello\n")
    (staging / "dir" / "sub" / "exe").write_bytes(b"#!/bin/sh\n")
    os.chmod(staging / "dir" / "sub" / "exe", 0o755)
    (staging / "empty").write_bytes(b"")
    os.symlink("dir/a.txt", staging / "link")
    os.symlink("/etc/passwd", staging / "abs-link")
    lane = lane_factory()
    _sync(lane)
    assert client_tree(stratum0, REPO) == staging_tree(staging)
    assert stratum0.revision(REPO) >= 2
    assert not stratum0.violations()


def test_each_revision_names_its_batch_in_the_history(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """The publish message names the batch, so the history ties a revision to it (which is
    how a batch is confirmed live behind a gateway, where others move the revision too)."""
    (staging / "a.txt").write_text("a")
    lane = lane_factory()
    _sync(lane)
    batch = lane.state.recent_batches(REPO, 1)[0]
    listing = lane.server.tag_list(REPO)
    assert revision_of_batch(listing, lane.command_tag(batch.id), 1) == stratum0.revision(REPO)


def test_a_lease_on_a_missing_target_widens_to_an_existing_parent(
    lane_factory: LaneFactory, stratum0: FakeStratum0
) -> None:
    """A path-scoped transaction on a target that does not exist yet is refused with the
    missing path named (f_path_scoped_transaction 6; gateway.md 1); the lease moves to the
    parent until one exists, and the transaction opens there."""
    stratum0.check_run("transaction", REPO)
    (stratum0.union_dir(REPO) / "sw").mkdir()
    stratum0.check_run("publish", REPO)
    lane = lane_factory()
    batch_id = lane.state.create_batch(REPO, (), reason="test", summary="scoped")
    transaction = Transaction(lane, batch_id, scope="sw/new/deeper")
    assert transaction.open(stratum0.revision(REPO))
    assert transaction.scope == "sw"
    assert stratum0.in_transaction(REPO)
    assert transaction.abort("test over")


def test_mirror_propagates_changes_renames_and_deletes(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A second pass publishes modifications, renames and deletions."""
    (staging / "d").mkdir()
    for i in range(4):
        (staging / "d" / f"f{i}").write_text(str(i))
    (staging / "keep").write_text("k")
    lane = lane_factory()
    _sync(lane)
    (staging / "d" / "f0").write_text("changed")
    os.rename(staging / "d" / "f1", staging / "d" / "renamed")
    (staging / "d" / "f2").unlink()
    _sync(lane)
    assert client_tree(stratum0, REPO) == staging_tree(staging)


def test_symlinks_are_never_followed(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path, tmp_path: Path
) -> None:
    """A symlink to a directory outside staging is published as a link, never followed."""
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text("do not publish")
    os.symlink(secret, staging / "escape")
    lane = lane_factory()
    _sync(lane)
    tree = client_tree(stratum0, REPO)
    assert tree["escape"] == ("symlink", 0o777, os.fsencode(str(secret)))
    assert "escape/secret.txt" not in tree


def test_fifo_is_skipped_and_counted(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A FIFO is never opened (this would hang) and not published; the rest is."""
    os.mkfifo(staging / "pipe")
    (staging / "ok").write_text("ok")
    lane = lane_factory()
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"ok"}
    value = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_inputs_skipped_total",
        {"repository": REPO, "source": lane.inputs[0].name, "reason": "fifo"},
    )
    assert value == 1


def test_reserved_names_are_refused(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """CVMFS's reserved names in staging are set aside with a reason, not published."""
    (staging / ".cvmfscatalog").write_text("")
    (staging / "d").mkdir()
    (staging / "d" / ".cvmfsgraft-x").write_text("size=1\n")
    (staging / "fine").write_text("x")
    lane = lane_factory()
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"d", "fine"}
    reasons = lane.state.set_aside_list(REPO)
    assert {p for _, p, _ in reasons} == {".cvmfscatalog", "d/.cvmfsgraft-x"}


def test_setuid_bits_are_stripped(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """setuid/setgid never reach the repository."""
    path = staging / "suid"
    path.write_text("x")
    os.chmod(path, 0o6755)
    lane = lane_factory()
    _sync(lane)
    assert stat.S_IMODE(stratum0.published_tree(REPO)["suid"].mode) & 0o6000 == 0


def test_non_utf8_and_long_names(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Names that are not UTF-8 and 255-byte names are published unchanged."""
    odd = os.fsdecode(b"caf\xe9-\xff")
    long_name = "L" * 255
    (staging / odd).write_text("latin-1")
    (staging / long_name).write_text("long")
    lane = lane_factory()
    _sync(lane)
    assert client_tree(stratum0, REPO) == staging_tree(staging)


def test_temporary_names_are_ignored(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Temporary names (*.tmp, *.part, rsync's .name.XXXXXX) are never published."""
    for name in ("a.tmp", "b.part", ".c.swp", ".data.bin.Ab3xYz", "real.bin"):
        (staging / name).write_text(name)
    lane = lane_factory()
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"real.bin"}


def test_inbox_removes_published_files(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """In inbox mode a file leaves staging only after it is live; deletions do not propagate."""
    (staging / "drop.txt").write_text("one")
    lane = lane_factory(staging_extra='  mode = "inbox"')
    assert lane.inputs[0].path_status(staging / "drop.txt") == {  # type: ignore[attr-defined]
        "repository": REPO,
        "path": "/drop.txt",
        "source": lane.inputs[0].name,
        "live": False,
        "reason": "pending",
    }
    _sync(lane)
    assert not (staging / "drop.txt").exists()
    assert client_tree(stratum0, REPO)["drop.txt"][2] == b"one"
    answer = lane.inputs[0].path_status(staging / "drop.txt")  # type: ignore[attr-defined]
    assert answer["live"] is True
    (staging / "second.txt").write_text("two")
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"drop.txt", "second.txt"}


def test_ready_marker_holds_a_directory(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A top-level directory is published only once its marker exists; the marker never is."""
    (staging / "release").mkdir()
    (staging / "release" / "a").write_text("a")
    (staging / "loose").write_text("l")
    lane = lane_factory(staging_extra='  ready_marker = ".ready"')
    ok, why = lane.sync_once(10)
    assert not ok
    assert "ready marker" in why
    assert set(client_tree(stratum0, REPO)) == {"loose"}
    (staging / "release" / ".ready").write_text("")
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"loose", "release", "release/a"}


def test_mass_deletion_is_held_until_released(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A batch deleting most of the target is held; `release` lets it through."""
    lane = _publish_then_delete_most(lane_factory, staging)
    ok, why = lane.sync_once(10)
    assert not ok
    assert "release" in why
    assert len(client_tree(stratum0, REPO)) == 20
    lane.state.request_release(REPO)
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {f"f{i}" for i in range(15, 20)}


def test_a_deep_tree_removed_counts_each_live_path_once(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Removing nested/deep/x/y/z.dat (5 live paths) and one file of a 13-path tree
    deletes 6 of 13 (46 %): below the 50 % guard, so it is published, not held."""
    import shutil

    (staging / "nested" / "deep" / "x" / "y").mkdir(parents=True)
    (staging / "nested" / "deep" / "x" / "y" / "z.dat").write_text("z")
    for name in "abcdefgh":
        (staging / name).write_text(name)
    lane = lane_factory()
    _sync(lane)
    assert len(client_tree(stratum0, REPO)) == 13
    shutil.rmtree(staging / "nested")
    (staging / "a").unlink()
    ok, why = lane.sync_once(10)
    assert ok, why
    assert set(client_tree(stratum0, REPO)) == set("bcdefgh")


def test_missing_staging_path_never_wipes_the_repository(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A vanished staging directory holds the deletions instead of publishing them."""
    (staging / "a").write_text("a")
    lane = lane_factory()
    _sync(lane)
    (staging / "a").unlink()
    staging.rmdir()
    ok, why = lane.sync_once(10)
    assert not ok
    assert "missing" in why
    assert set(client_tree(stratum0, REPO)) == {"a"}
    held = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_lane_held", {"repository": REPO, "reason": "staging-missing"}
    )
    assert held == 1


def test_foreign_transaction_is_never_aborted(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A transaction the daemon did not open makes the lane wait; it is left open."""
    stratum0.run("transaction", REPO)
    (staging / "a").write_text("a")
    lane = lane_factory()
    ok, why = lane.sync_once(10)
    assert not ok
    assert "did not open" in why
    assert stratum0.state(REPO)["in_transaction_lock"]
    stratum0.run("abort", "-f", REPO)
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"a"}


#: The two ways a file's content reaches the repository: prepared objects, or a copy.
CONTENT_PATHS = pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "copied"])


def _break_reading(
    monkeypatch: pytest.MonkeyPatch, prepare: bool, failing: Callable[[str], object | None]
) -> None:
    """Make reading a staged file fail where ``failing(rel)`` returns or raises."""
    from cvmfs_syncd import fsops
    from cvmfs_syncd.planner import Applied, ApplyOutcome
    from cvmfs_syncd.sources.staging import StagingInput

    real_copy = fsops.copy_file
    real_open = StagingInput.open_content

    def copy(union: Path, repo_path: str, root: Path, rel: str, *a: object, **kw: object) -> object:
        return failing(rel) or real_copy(union, repo_path, root, rel, *a, **kw)  # type: ignore[arg-type]

    def open_content(source: StagingInput, op: Op) -> object:
        if failing(op.source_path) is fsops.CopyOutcome.UNREADABLE:
            return Applied(ApplyOutcome.REFUSED, "unreadable")
        return real_open(source, op)

    if prepare:
        monkeypatch.setattr(StagingInput, "open_content", open_content)
    else:
        monkeypatch.setattr(fsops, "copy_file", copy)


def _content_config(prepare: bool) -> dict[str, str]:
    return {"staging_extra": f"  prepare = {str(prepare).lower()}"}


@CONTENT_PATHS
def test_unreadable_file_is_set_aside_and_the_batch_goes_on(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: bool,
) -> None:
    """An input that cannot be read is reported and set aside; the rest is published."""
    from cvmfs_syncd import fsops

    def failing(rel: str) -> object | None:
        return fsops.CopyOutcome.UNREADABLE if rel == "secret" else None

    _break_reading(monkeypatch, prepare, failing)
    (staging / "secret").write_text("no")
    (staging / "fine").write_text("yes")
    lane = lane_factory(**_content_config(prepare))
    _sync(lane)
    assert set(client_tree(stratum0, REPO)) == {"fine"}
    assert lane.state.set_aside_list(REPO) == [(lane.inputs[0].name, "secret", "unreadable")]


@CONTENT_PATHS
def test_an_input_that_breaks_apply_does_not_stop_the_lane(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: bool,
) -> None:
    """An unexpected error reading one input re-queues it; the others are published."""
    failures: list[str] = []

    def failing(rel: str) -> object | None:
        if rel == "flaky" and not failures:
            failures.append(rel)
            raise RuntimeError("injected")
        return None

    _break_reading(monkeypatch, prepare, failing)
    (staging / "flaky").write_text("f")
    (staging / "steady").write_text("s")
    lane = lane_factory(**_content_config(prepare))
    _sync(lane)
    assert failures == ["flaky"]
    assert set(client_tree(stratum0, REPO)) == {"flaky", "steady"}


def test_file_still_open_for_writing_is_not_published_by_a_scan(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A paused writer's file (old mtime, found by a scan, no watch event) waits for the close."""
    path = staging / "download.iso"
    with path.open("wb") as handle:
        handle.write(b"first half ")
        handle.flush()
        os.utime(path, (1, 1))  # looks long settled
        lane = lane_factory()
        ok, _ = lane.sync_once(2)
        assert not ok
        assert "download.iso" not in client_tree(stratum0, REPO)
        handle.write(b"second half")
    _sync(lane)
    assert client_tree(stratum0, REPO)["download.iso"][2] == b"first half second half"


def test_replaced_file_with_same_size_and_mtime_is_republished(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A new file renamed over the old one with equal size, mode and mtime is published."""
    (staging / "lib.so").write_bytes(b"version-1")
    os.utime(staging / "lib.so", (1000, 1000))
    lane = lane_factory()
    _sync(lane)
    (staging / "new.tmp").write_bytes(b"version-2")
    os.utime(staging / "new.tmp", (1000, 1000))
    os.rename(staging / "new.tmp", staging / "lib.so")
    _sync(lane)
    assert client_tree(stratum0, REPO)["lib.so"][2] == b"version-2"


def test_publish_that_fails_after_going_live_counts_as_published(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """publish dying after the new revision is live: the batch is done, not re-queued as lost."""
    (staging / "a").write_text("a")
    stratum0.inject_fault("publish", "die", at="end", times=1)
    lane = lane_factory()
    _sync(lane)
    stages = [b.stage for b in lane.state.recent_batches(REPO)]
    assert stages == ["done"]
    entry = lane.state.published_entry(REPO, "a")
    assert entry is not None
    assert entry.revision == stratum0.revision(REPO)
    assert not stratum0.in_transaction(REPO)


def test_retried_transaction_stays_in_one_journal_row(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A transaction that failed once and then opened leaves no other journal row behind."""
    (staging / "a").write_text("a")
    stratum0.inject_fault("transaction", "fail", times=1)
    lane = lane_factory()
    _sync(lane)
    batches = lane.state.recent_batches(REPO)
    assert [b.stage for b in batches] == ["done"]
    assert batches[0].attempts >= 3  # opening twice, publishing once
    assert lane.state.unfinished_batch(REPO) is None


@CONTENT_PATHS
def test_persistent_apply_errors_back_off(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: bool,
) -> None:
    """An input that keeps failing to read (EIO) does not spin batch after batch (nor
    transaction/abort cycles)."""
    import errno

    def broken(_rel: str) -> object:
        raise OSError(errno.EIO, "Input/output error")

    _break_reading(monkeypatch, prepare, broken)
    (staging / "f").write_text("x")
    os.utime(staging / "f", (1, 1))
    lane = lane_factory(**_content_config(prepare))
    ok, _ = lane.sync_once(3)
    assert not ok
    attempts = len(lane.state.recent_batches(REPO, limit=1000))
    # back-off 0.1, 0.2, 0.4, 0.8, 1, 1 s (retry_initial/max of the test config): at most
    # a handful of transactions in three seconds, where a tight loop made dozens.
    assert 2 <= attempts <= 8
    retries = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_retries_total", {"repository": REPO, "operation": "apply"}
    )
    assert retries is not None
    assert retries >= 1
    assert not stratum0.in_transaction(REPO)


def test_ready_marker_directory_waits_whole_for_its_slowest_file(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """One unsettled file holds its whole marked directory; inbox then empties it completely."""
    job = staging / "job1"
    job.mkdir()
    (job / "a.txt").write_text("a")
    os.utime(job / "a.txt", (1, 1))
    (job / ".ready").write_text("")
    (job / "b.txt").write_text("b")  # written just now: not settled yet
    lane = lane_factory(staging_extra='  mode = "inbox"\n  ready_marker = ".ready"')
    lane.recovery.recover()
    lane.reconcile(lane.clock())
    lane.batches.publish_pending("test", lane.clock())
    assert "job1/a.txt" not in client_tree(stratum0, REPO)  # not without b.txt
    _sync(lane)
    assert {"job1/a.txt", "job1/b.txt"} <= set(client_tree(stratum0, REPO))
    assert sorted(os.listdir(job)) == []


def test_inbox_keeps_the_marker_while_files_are_left(staging: Path) -> None:
    """The marker is removed only when nothing but directories is left beside it."""
    from cvmfs_syncd import fsops

    job = staging / "job"
    (job / "sub").mkdir(parents=True)
    (job / ".ready").write_text("")
    (job / "left.txt").write_text("x")
    assert not fsops.remove_marker_if_alone(staging, "job", ".ready")
    assert (job / ".ready").exists()
    (job / "left.txt").unlink()
    assert fsops.remove_marker_if_alone(staging, "job", ".ready")
    assert not (job / ".ready").exists()
    outside = staging.parent / "outside"
    outside.mkdir()
    (outside / ".ready").write_text("")
    (staging / "link").symlink_to(outside)
    assert not fsops.remove_marker_if_alone(staging, "link", ".ready")
    assert (outside / ".ready").exists()


def test_mass_deletion_hold_survives_unrelated_publishes(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Other changes are published while deletions are held; the hold and its alert stay."""
    lane = _publish_then_delete_most(lane_factory, staging)
    lane.sync_once(2)
    (staging / "new").write_text("n")
    lane.sync_once(2)
    lane.sync_once(2)  # a second reconciliation must not guard the same paths twice
    assert "new" in client_tree(stratum0, REPO)
    assert "release" in lane.status().held
    held = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_lane_held", {"repository": REPO, "reason": "mass-delete"}
    )
    assert held == 1
    assert len(lane._guarded) == 15


def test_sync_timeout_is_a_deadline_for_publish_retries(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A publish that keeps failing (storage unreachable) is retried only until the
    deadline: sync returns soon after it, aborts our own transaction (nothing of it is
    live) and says which batch is unfinished; the next run publishes it."""
    import time

    (staging / "a").write_text("a")
    stratum0.inject_fault("publish", "fail")
    lane = lane_factory()
    started = time.monotonic()
    ok, why = lane.sync_once(3)
    elapsed = time.monotonic() - started
    assert not ok
    assert "deadline reached" in why and "batch" in why and "aborted" in why, why
    assert lane.deadline_report == why
    assert elapsed < 3 + 10  # retries stopped at the deadline (grace and one command aside)
    assert not stratum0.in_transaction(REPO)
    stratum0.clear_faults()
    _sync(lane)
    assert client_tree(stratum0, REPO)["a"][2] == b"a"


def test_sync_timeout_while_no_transaction_can_open_names_what_is_pending(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """With storage unreachable no transaction opens: the deadline ends the retries and
    the message says how many changes wait and why."""
    (staging / "a").write_text("a")
    stratum0.inject_fault("storage", "unreachable")
    lane = lane_factory()
    ok, why = lane.sync_once(2)
    assert not ok
    assert "deadline reached with 1 changes pending" in why, why
    assert "whitelist" in why
    assert not stratum0.in_transaction(REPO)


def test_sync_timeout_bounds_a_hanging_publish(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A publish that hangs is killed at the deadline plus the grace period, not at the
    configured 1800 s publish timeout; its transaction is left to recovery or aborted."""
    import time

    from cvmfs_syncd.pipeline.one_shot import DEADLINE_GRACE_SECONDS

    (staging / "a").write_text("a")
    stratum0.inject_fault("publish", "hang", times=1)
    lane = lane_factory()
    started = time.monotonic()
    ok, why = lane.sync_once(2)
    assert not ok
    assert "deadline reached" in why, why
    assert time.monotonic() - started < 2 + DEADLINE_GRACE_SECONDS + 10
    _sync(lane)
    assert client_tree(stratum0, REPO)["a"][2] == b"a"


def _at(tree: Tree, path: str) -> Tree:
    """The part of ``tree`` at and below ``path``."""
    return {p: e for p, e in tree.items() if p == path or p.startswith(path + "/")}


def _must_settle(path: Path) -> None:
    """Give a staged file an mtime ahead of now: it settles only once ``settle_seconds``
    have passed since the lane first saw it, so the first plan always defers it."""
    import time

    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))


def _assert_replaced_in_one_revision(
    stratum0: FakeStratum0, staging: Path, path: str, old: Tree, since: int
) -> None:
    """Every revision after ``since`` shows ``path`` either as it was or as it is now."""
    new = _at(staging_tree(staging), path)
    assert _at(client_tree(stratum0, REPO), path) == new
    for revision in (r for r in stratum0.revisions(REPO) if r > since):
        seen = _at(client_tree(stratum0, REPO, revision), path)
        assert seen in (old, new), f"revision {revision} shows {sorted(seen)}"


def test_a_directory_replaced_by_a_file_is_published_in_one_revision(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """The old directory stays live, content and all, until the file that replaces it has
    settled; then both changes go in one revision."""
    import shutil

    (staging / "pkg" / "sub").mkdir(parents=True)
    (staging / "pkg" / "a").write_text("a")
    (staging / "pkg" / "sub" / "b").write_text("b")
    (staging / "other").write_text("o")
    lane = lane_factory()
    _sync(lane)
    old, since = _at(client_tree(stratum0, REPO), "pkg"), stratum0.revision(REPO)
    assert len(old) == 4
    shutil.rmtree(staging / "pkg")
    (staging / "pkg").write_text("now a file")
    _must_settle(staging / "pkg")
    _sync(lane)
    _assert_replaced_in_one_revision(stratum0, staging, "pkg", old, since)
    assert client_tree(stratum0, REPO) == staging_tree(staging)


def test_a_file_replaced_by_a_directory_is_published_in_one_revision(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """The old file stays live until the directory that replaces it and its content (which
    must settle) can go together."""
    (staging / "pkg").write_text("a file")
    (staging / "other").write_text("o")
    lane = lane_factory()
    _sync(lane)
    old, since = _at(client_tree(stratum0, REPO), "pkg"), stratum0.revision(REPO)
    (staging / "pkg").unlink()
    (staging / "pkg" / "sub").mkdir(parents=True)
    (staging / "pkg" / "a").write_text("a")
    (staging / "pkg" / "sub" / "b").write_text("b")
    _must_settle(staging / "pkg" / "sub" / "b")
    _sync(lane)
    _assert_replaced_in_one_revision(stratum0, staging, "pkg", old, since)
    assert client_tree(stratum0, REPO) == staging_tree(staging)


def test_a_replaced_directory_counts_for_the_deletion_guard(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A file replacing a directory of 16 of 20 live paths is held with the deletions, the
    directory staying live; once released, both go in one revision."""
    import shutil

    (staging / "big").mkdir()
    for i in range(15):
        (staging / "big" / f"f{i}").write_text(str(i))
    for i in range(4):
        (staging / f"k{i}").write_text(str(i))
    lane = lane_factory()
    _sync(lane)
    old, since = _at(client_tree(stratum0, REPO), "big"), stratum0.revision(REPO)
    shutil.rmtree(staging / "big")
    (staging / "big").write_text("now a file")
    ok, why = lane.sync_once(10)
    assert not ok
    assert "delete 16 of 20 live paths" in why, why
    assert _at(client_tree(stratum0, REPO), "big") == old
    lane.state.request_release(REPO)
    _sync(lane)
    _assert_replaced_in_one_revision(stratum0, staging, "big", old, since)
