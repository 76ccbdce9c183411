"""End-to-end: tarball drops published by ``cvmfs-syncd sync``, by a running lane and by the
daemon process, against the stateful fake ``cvmfs_server`` (its ``ingest`` included):
hostile archives refused before ``ingest`` runs, replacement across versions, a type change
through a transaction, kill -9 around ``ingest``, and S3 objects streamed into it."""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.feed import FedResult, Feed
from cvmfs_syncd.ingest import Manifest, check_archive, emit_plain_tar
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.daemon import REPO as DAEMON_REPO
from tests.daemon import DaemonUnderTest
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.ingest import archives
from tests.sources.s3_support import Bucket, Moto, write_credentials, write_s3_config
from tests.support import Tree, client_tree, close_lanes, wait_for, write_config

REPO = "ingest.example.org"

LaneFactory = Callable[..., Lane]

pytestmark = pytest.mark.stratum0(REPO)

INGEST = '  tarballs = "ingest"'

#: A release: directories, an executable, a symlink, a hard link, an empty directory.
RELEASE = (
    archives.directory("bin"),
    archives.file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
    archives.file("lib/libx.so", b"\x7fELF" + bytes(5000)),
    archives.hardlink("lib/libx.so.1", "lib/libx.so"),
    archives.symlink("current", "lib"),
    archives.directory("empty"),
)

#: What a client sees of RELEASE under its base (the nested catalog's marker included).
RELEASE_TREE: Tree = {
    ".cvmfscatalog": ("file", 0o644, b""),
    "bin": ("dir", 0o755, b""),
    "bin/tool": ("file", 0o755, b"#!/bin/sh\necho tool\n"),
    "lib": ("dir", 0o755, b""),
    "lib/libx.so": ("file", 0o644, b"\x7fELF" + bytes(5000)),
    "lib/libx.so.1": ("file", 0o644, b"\x7fELF" + bytes(5000)),
    "current": ("symlink", 0o777, b"lib"),
    "empty": ("dir", 0o755, b""),
}


def under(tree: Tree, base: str) -> Tree:
    """The part of a client tree below ``base``, relative to it, the catalog marker's
    mode left as the tool chose it."""
    found = {}
    for path, (kind, mode, data) in tree.items():
        if path.startswith(base + "/"):
            rel = path[len(base) + 1 :]
            found[rel] = (kind, 0o644 if rel == ".cvmfscatalog" else mode, data)
    return found


def gzipped(*entries: archives.Entry) -> bytes:
    return archives.compress(archives.tar_bytes(*entries), "gzip")


@pytest.fixture
def lanes(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[LaneFactory]:
    """Build (not started) lanes on a staging source with tarball drops; close them after."""
    built: list[tuple[Lane, State]] = []

    def build(staging_extra: str = "", quiet_seconds: float | None = None, **kw: str) -> Lane:
        path = write_config(
            tmp_path / "cvmfs-syncd.toml",
            state_dir=tmp_path / "state",
            server_command=stratum0.server_command,
            config_dir=stratum0.config_dir,
            repo=REPO,
            staging=staging,
            staging_extra=f"{INGEST}\n{staging_extra}",
            **kw,
        )
        if quiet_seconds is not None:
            text = path.read_text().replace(
                "quiet_seconds = 0.2", f"quiet_seconds = {quiet_seconds}"
            )
            path.write_text(
                text.replace("max_batch_seconds = 2", f"max_batch_seconds = {2 * quiet_seconds}")
            )
        config = config_mod.load(path)
        state = State(config.daemon.state_dir)
        lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
        built.append((lane, state))
        return lane

    yield build
    close_lanes(built)


def sync(lane: Lane) -> None:
    ok, why = lane.sync_once(60)
    assert ok, why


class Calls:
    """Records the lane's ``ingest`` and ``transaction`` commands (and what was fed)."""

    def __init__(self, lane: Lane) -> None:
        self.ingests: list[dict[str, Any]] = []
        self.fed: list[FedResult] = []
        self.transactions = 0
        server = lane.server
        real_ingest, real_transaction = server.ingest, server.transaction

        def ingest(repo: str, **kw: Any) -> FedResult:
            self.ingests.append(kw)
            result = real_ingest(repo, **kw)
            self.fed.append(result)
            return result

        def transaction(repo: str, **kw: Any) -> Any:
            self.transactions += 1
            return real_transaction(repo, **kw)

        server.ingest = ingest  # type: ignore[method-assign]
        server.transaction = transaction  # type: ignore[method-assign]


def refused_count(lane: Lane, reason: str) -> float:
    value = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_ingest_refused_total", {"repository": REPO, "reason": reason}
    )
    return value or 0.0


# ------------------------------------------------------------------- publishing a drop


def test_sync_command_publishes_a_tarball_as_its_directory(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """`cvmfs-syncd sync` publishes `app-1.0.tar.gz` as `/app-1.0` in one revision, with a
    nested catalog, every member as archived; inbox mode then removes the tarball."""
    (staging / "app-1.0.tar.gz").write_bytes(gzipped(*RELEASE))
    (staging / "README").write_bytes(b"read me")
    path = write_config(
        tmp_path / "cvmfs-syncd.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
        staging_extra=f'{INGEST}\n  mode = "inbox"',
    )
    before = stratum0.revision(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_syncd", "sync", "-c", str(path), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tree = client_tree(stratum0, REPO)
    assert under(tree, "app-1.0") == RELEASE_TREE
    assert tree["README"] == ("file", 0o644, b"read me")
    assert stratum0.revision(REPO) == before + 2  # the plain file, then the tarball
    assert not (staging / "app-1.0.tar.gz").exists()
    assert not stratum0.in_transaction(REPO)


def test_a_running_lane_publishes_drops_one_revision_each(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A started lane ingests each of two drops in a revision of its own, never inside a
    transaction of its own; the tarballs stay (mirror mode)."""
    lane = lanes()
    calls = Calls(lane)
    before = stratum0.revision(REPO)
    lane.start()
    (staging / "a.tar").write_bytes(archives.tar_bytes(archives.file("x", b"a")))
    (staging / "b.tar.xz").write_bytes(
        archives.compress(archives.tar_bytes(archives.file("y", b"b")), "xz")
    )

    def both_live() -> bool:
        tree = client_tree(stratum0, REPO)
        return tree.get("a/x") == ("file", 0o644, b"a") and tree.get("b/y") == (
            "file",
            0o644,
            b"b",
        )

    wait_for(both_live, 30, "both tarballs to be live")
    assert stratum0.revision(REPO) == before + 2
    assert sorted(call["base"] for call in calls.ingests) == ["a", "b"]  # in either order
    assert calls.transactions == 0
    assert (staging / "a.tar").exists()
    wait_for(lambda: lane.status().state == "idle", 10, "the lane to be idle")
    status = lane.status()
    assert (status.ingesting, status.ingest_fed_bytes) == ("", 0)
    duration = lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_ingest_duration_seconds_count", {"repository": REPO}
    )
    assert duration == 2


@pytest.mark.parametrize("how", ["written-in-place", "moved-in"])
def test_a_drop_does_not_wait_for_the_quiet_period(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path, tmp_path: Path, how: str
) -> None:
    """With nothing but a tarball drop pending, a running lane ingests it at once: live long
    before the repository's quiet period (60 s here) is over, whether it was written in
    place or moved in from another directory (which no close event follows). A plain file
    dropped next waits for its quiet period."""
    lane = lanes(quiet_seconds=60)
    lane.start()
    wait_for(lambda: lane.status().state == "idle", 10, "the lane to be idle")
    release = archives.tar_bytes(archives.file("x", b"release"))
    if how == "moved-in":
        (tmp_path / "rel.tar").write_bytes(release)
        (tmp_path / "rel.tar").rename(staging / "rel.tar")
    else:
        (staging / "rel.tar").write_bytes(release)
    wait_for(
        lambda: client_tree(stratum0, REPO).get("rel/x") == ("file", 0o644, b"release"),
        20,
        "the drop to be live",
    )
    assert lane.metrics.registry.get_sample_value(
        "cvmfs_syncd_batches_total", {"repository": REPO, "reason": "drop"}
    )
    (staging / "notes.txt").write_bytes(b"notes")
    wait_for(lambda: lane.status().state == "batching", 10, "the file to be pending")
    assert "notes.txt" not in client_tree(stratum0, REPO)


# ------------------------------------------------------------------- refusals


HOSTILE = {
    "dot-dot": (archives.file("d/ok.txt", b"ok"), archives.file("../escape.txt", b"x")),
    "absolute-name": (archives.file("/abs/evil.txt", b"x"),),
    "symlink-escape": (archives.symlink("up", "../../../../etc"),),
    "symlink-absolute": (archives.symlink("passwd", "/etc/passwd"),),
    "unsupported-type": (archives.special("dev", tarfile.CHRTYPE),),
    "hardlink-target": (archives.hardlink("hard", "/etc/passwd"),),
    "reserved-name": (archives.file("sub/.cvmfscatalog", b""),),
    "duplicate": (archives.file("a", b"1"), archives.file("./a", b"2")),
    "too-many-members": tuple(archives.file(f"f{i}", b"") for i in range(11)),
    "too-large": (archives.file("big", bytes(2048)),),
}


def _truncated() -> bytes:
    data = archives.tar_bytes(archives.file("m/f.bin", bytes(range(256)) * 3))
    return data[:1000]  # inside the member's content


@pytest.mark.parametrize("reason", [*HOSTILE, "truncated", "not-a-tar", "cut-gzip"])
def test_a_hostile_or_broken_archive_is_refused_before_ingest_and_kept(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path, reason: str
) -> None:
    """Each class of hostile member, and a damaged archive: set aside with its reason,
    counted, nothing published, `ingest` never run, the archive kept (inbox mode)."""
    if reason == "truncated":
        data, expected = _truncated(), "unreadable"
    elif reason == "not-a-tar":
        data, expected = b"this is not an archive at all\n" * 40, "unreadable"
    elif reason == "cut-gzip":
        whole = gzipped(*RELEASE)
        data, expected = whole[: len(whole) - 10], "unreadable"
    else:
        data, expected = archives.tar_bytes(*HOSTILE[reason]), reason
    name = "drop.tgz" if reason == "cut-gzip" else "drop.tar"
    (staging / name).write_bytes(data)
    lane = lanes('  mode = "inbox"\n  max_ingest_members = 10\n  max_ingest_bytes = "1KiB"')
    calls = Calls(lane)
    before = stratum0.revision(REPO)
    sync(lane)
    assert calls.ingests == []
    assert stratum0.revision(REPO) == before
    assert "drop" not in client_tree(stratum0, REPO)
    assert (staging / name).read_bytes() == data
    [(_, path, why)] = lane.state.set_aside_list(REPO)
    assert path == name and f"({expected})" in why, why
    assert refused_count(lane, expected) == 1
    sync(lane)  # set aside until it changes: not read again
    assert refused_count(lane, expected) == 1


def test_colliding_tarballs_are_refused_and_a_directory_keeps_its_name(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """`pkg.tgz` beside `pkg.tar.gz`: both refused; `tool.tgz` beside `tool/`: the
    directory is published, the tarball refused. Removing one of the pair lets the other go."""
    (staging / "pkg.tgz").write_bytes(gzipped(archives.file("one", b"1")))
    (staging / "pkg.tar.gz").write_bytes(gzipped(archives.file("two", b"2")))
    (staging / "tool").mkdir()
    (staging / "tool" / "plain").write_bytes(b"p")
    (staging / "tool.tgz").write_bytes(gzipped(archives.file("t", b"t")))
    lane = lanes()
    sync(lane)
    tree = client_tree(stratum0, REPO)
    assert "pkg" not in tree
    assert tree["tool/plain"] == ("file", 0o644, b"p") and "tool/t" not in tree
    refused = {path: why for _, path, why in lane.state.set_aside_list(REPO)}
    assert set(refused) == {"pkg.tgz", "pkg.tar.gz", "tool.tgz"}
    assert "(same-base)" in refused["pkg.tgz"] and "(base-taken)" in refused["tool.tgz"]
    assert refused_count(lane, "same-base") == 2
    (staging / "pkg.tgz").unlink()  # no watcher here: the next scan sees it
    sync(lane)
    assert client_tree(stratum0, REPO)["pkg/two"] == ("file", 0o644, b"2")
    assert "pkg.tar.gz" not in {path for _, path, _ in lane.state.set_aside_list(REPO)}


def test_ingest_failing_to_read_a_checked_tar_sets_it_aside(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """`ingest` reporting an unreadable archive although our feed had no error: set
    aside (kept), no revision, no transaction left."""
    (staging / "app.tar").write_bytes(archives.tar_bytes(*RELEASE))
    stratum0.inject_fault(
        "ingest",
        "fail",
        at="upload",
        stderr="failed to read data from the tar entry: /app/bin/tool (-1)\n"
        " Truncated tar archive\n",
        times=1,
    )
    lane = lanes()
    before = stratum0.revision(REPO)
    sync(lane)
    assert stratum0.revision(REPO) == before
    assert not stratum0.in_transaction(REPO)
    [(_, path, why)] = lane.state.set_aside_list(REPO)
    assert path == "app.tar" and "ingest refused the archive" in why
    assert refused_count(lane, "unreadable") == 1
    assert (staging / "app.tar").exists()


# ------------------------------------------------------------------- versions


def test_a_new_version_replaces_the_old_one(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Version 2 lacks `b` and `d/x`: they are deleted with `-d` in the same revision; an
    unchanged tarball (touched only) publishes nothing; removing it (mirror) deletes the
    base."""
    tarball = staging / "pkg.tgz"
    tarball.write_bytes(
        gzipped(archives.file("a", b"v1"), archives.file("b", b"b"), archives.file("d/x", b"x"))
    )
    lane = lanes()
    calls = Calls(lane)
    sync(lane)
    first = stratum0.revision(REPO)
    tarball.write_bytes(gzipped(archives.file("a", b"v2"), archives.file("c", b"c")))
    sync(lane)
    assert stratum0.revision(REPO) == first + 1
    assert under(client_tree(stratum0, REPO), "pkg") == {
        ".cvmfscatalog": ("file", 0o644, b""),
        "a": ("file", 0o644, b"v2"),
        "c": ("file", 0o644, b"c"),
    }
    assert sorted(calls.ingests[-1]["deletes"]) == ["pkg/b", "pkg/d"]
    data = tarball.read_bytes()
    tarball.unlink()
    tarball.write_bytes(data)  # a new inode, the same archive: already live
    sync(lane)
    assert stratum0.revision(REPO) == first + 1
    assert len(calls.ingests) == 2
    tarball.unlink()
    sync(lane)
    assert "pkg" not in client_tree(stratum0, REPO)
    assert lane.state.published_under(REPO, "pkg") == []


def test_a_type_change_goes_through_a_transaction(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """`x` was a file and becomes a directory: one `ingest` cannot do it, so the archive
    is unpacked into a transaction, published in one revision, exactly."""
    tarball = staging / "pkg.tar"
    tarball.write_bytes(
        archives.tar_bytes(archives.file("x", b"file"), archives.file("keep", b"k"))
    )
    lane = lanes()
    calls = Calls(lane)
    sync(lane)
    first = stratum0.revision(REPO)
    assert (len(calls.ingests), calls.transactions) == (1, 0)
    version2 = (archives.file("x/y", b"now below"), *RELEASE)
    tarball.write_bytes(archives.tar_bytes(*version2))
    sync(lane)
    assert (len(calls.ingests), calls.transactions) == (1, 1)
    assert stratum0.revision(REPO) == first + 1
    expected = dict(RELEASE_TREE)
    expected["x"] = ("dir", 0o755, b"")
    expected["x/y"] = ("file", 0o644, b"now below")
    assert under(client_tree(stratum0, REPO), "pkg") == expected
    assert lane.state.unfinished_batch(REPO) is None


def test_removing_a_large_tarball_is_held_by_the_deletion_guard(
    lanes: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Mirror mode counts the base's live paths, not 1: deleting a tarball of 30 files
    beside 5 plain ones is held until released."""
    (staging / "pkg.tar").write_bytes(
        archives.tar_bytes(*(archives.file(f"f{i:02d}", b"x") for i in range(30)))
    )
    for i in range(5):
        (staging / f"plain{i}").write_bytes(b"p")
    lane = lanes()
    sync(lane)
    (staging / "pkg.tar").unlink()
    ok, why = lane.sync_once(30)
    assert not ok and "31 of 36" in why, why
    assert "pkg/f00" in client_tree(stratum0, REPO)
    lane.state.request_release(REPO)
    sync(lane)
    assert "pkg" not in client_tree(stratum0, REPO)


# ------------------------------------------------------------------- crashes


def _journal(daemon: DaemonUnderTest) -> list[tuple[str, str]]:
    """(stage, summary) of every batch, oldest first (read-only, beside the daemon)."""
    path = daemon.tmp_path / "state" / "state.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(str(s), str(m)) for s, m in db.execute("SELECT stage, summary FROM batches")]
    finally:
        db.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonUnderTest]:
    """The daemon process on a staging source with tarball drops."""
    under_test = DaemonUnderTest(tmp_path, staging_extra=INGEST)
    yield under_test
    under_test.stop()


@pytest.mark.parametrize(
    ("point", "published"),
    [("start", False), ("upload", False), ("end", True)],
    ids=["before-transaction", "transaction-open", "after-commit"],
)
def test_kill_9_around_ingest_loses_nothing_and_publishes_nothing_twice(
    daemon: DaemonUnderTest, point: str, published: bool
) -> None:
    """kill -9 while `ingest` hangs before opening its transaction, with it open, or after
    its revision is live: the restart stops the leftover command, aborts a transaction it
    held, and the tarball ends live in exactly one revision."""
    daemon.stratum0.inject_fault("ingest", "hang", at=point, times=1)
    daemon.start()
    before = daemon.stratum0.revision(DAEMON_REPO)
    (daemon.staging / "app.tgz").write_bytes(gzipped(*RELEASE))

    def hanging() -> bool:
        stages = [stage for stage, _ in _journal(daemon)]
        if not stages or stages[-1] != "ingesting" or daemon.stratum0.faults():
            return False
        return not published or daemon.stratum0.revision(DAEMON_REPO) > before

    wait_for(hanging, 30, f"ingest to hang at {point}")
    daemon.kill(orphans=False)
    daemon.start()

    def live() -> bool:
        tree = under(daemon.published(), "app")
        return tree == RELEASE_TREE and not daemon.stratum0.in_transaction(DAEMON_REPO)

    wait_for(live, 60, "the tarball to be live")
    waited = daemon.cli("wait", str(daemon.staging / "app.tgz"), "--timeout", "30")
    assert waited.returncode == 0, waited.stdout + waited.stderr  # recorded in the index
    wait_for(
        lambda: all(stage in ("done", "aborted") for stage, _ in _journal(daemon)),
        30,
        "the journal to settle",
    )
    assert daemon.stratum0.revision(DAEMON_REPO) == before + 1
    stages = [stage for stage, _ in _journal(daemon)]
    if published:
        # Recorded by comparing the archive with what is live: no batch, no revision.
        assert stages == ["aborted"]
        assert "tarball already live" in daemon.log()
    else:
        assert stages == ["aborted", "done"]
    assert not daemon.stratum0.orphans()
    assert not daemon.stratum0.violations()
    code, status = daemon.get("/status")
    assert code == 200 and status["repositories"][DAEMON_REPO]["set_aside"] == []


def test_sigterm_during_an_ingest_lets_it_finish(daemon: DaemonUnderTest) -> None:
    """A stop request while `ingest` runs waits for it like for a publish."""
    daemon.stratum0.inject_fault("ingest", "delay", at="upload", delay=2.0, times=1)
    daemon.start()
    (daemon.staging / "app.tgz").write_bytes(gzipped(*RELEASE))
    wait_for(
        lambda: [s for s, _ in _journal(daemon)][-1:] == ["ingesting"], 30, "the ingest to start"
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert under(daemon.published(), "app") == RELEASE_TREE


# ------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = Moto()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: Moto) -> Iterator[Bucket]:
    created = Bucket(moto)
    yield created
    created.close()


def test_an_s3_tarball_is_streamed_into_ingest_without_a_local_copy(
    tmp_path: Path,
    stratum0: FakeStratum0,
    moto: Moto,
    bucket: Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two GETs pinned to the listed ETag, the second written straight into `ingest`: the
    bytes fed are exactly the checked tar, and no file the archive's size appears on
    local disk (state directory or temporary directory) while it is fed; inbox mode then
    deletes the object."""
    payload = bytes(range(256)) * 16384  # 4 MiB
    entries = (archives.file("data/blob.bin", payload), *RELEASE)
    data = gzipped(*entries)
    bucket.put("builds/big.tgz", data)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = write_s3_config(
        tmp_path / "cvmfs-syncd.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        endpoint=moto.url,
        bucket=bucket.name,
        credentials_file=write_credentials(tmp_path / "credentials"),
        s3_extra=f'{INGEST}\n  mode = "inbox"',
    )
    config = config_mod.load(path)
    state = State(config.daemon.state_dir)
    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
    large: list[Path] = []
    server = lane.server
    real_ingest = server.ingest

    def ingest(repo: str, *, feed: Callable[[Feed], object], **kw: Any) -> FedResult:
        def watched(stream: Feed) -> None:
            feed(stream)
            for root in (config.daemon.state_dir, scratch):
                large.extend(
                    p
                    for p in root.rglob("*")
                    if p.is_file() and p.stat().st_size >= len(payload) // 2
                )

        return real_ingest(repo, feed=watched, **kw)

    server.ingest = ingest  # type: ignore[method-assign]
    calls = Calls(lane)
    try:
        ok, why = lane.sync_once(60)
        assert ok, why
        assert not large
        manifest = check_archive(io.BytesIO(data))
        assert isinstance(manifest, Manifest)
        emitted = io.BytesIO()
        emit_plain_tar(io.BytesIO(data), manifest, emitted)
        [result] = calls.fed
        assert result.feed_error is None
        assert result.fed_bytes == len(emitted.getvalue())
        assert stratum0.read_file(REPO, "ci/big/data/blob.bin") == payload
        assert under(client_tree(stratum0, REPO), "ci/big")["current"] == ("symlink", 0o777, b"lib")
        remaining = bucket.keys()
        assert "builds/big.tgz" not in remaining
    finally:
        for source in lane.inputs:
            source.stop()
        lane.lock.release()
        state.close()
