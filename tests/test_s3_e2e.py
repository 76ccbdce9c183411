"""End-to-end: objects uploaded to a real S3 HTTP endpoint (moto) are published by a lane
(and by the daemon process) and read back byte for byte through the fake client view."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from moto.core.authorization import enable_iam_authentication

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.cvmfs.hashing import object_name
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.planner import ApplyOutcome
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.sources.s3 import S3Input
from cvmfs_syncd.state import State
from tests.daemon import REPO as REPO_E2E
from tests.daemon import DaemonUnderTest
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.sources.s3_support import (
    Bucket,
    Moto,
    grant_iam_user,
    write_credentials,
    write_s3_config,
)
from tests.support import close_lanes, wait_for

REPO = "s3e2e.example.org"
MIB = 1024 * 1024

LaneFactory = Callable[..., Lane]

# The repository chunks grafts at 1 MiB (so tests stay small).
pytestmark = pytest.mark.stratum0(REPO, config={"CVMFS_MAX_CHUNK_SIZE": str(MIB)})


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """A moto S3 server shared by the module's tests (each test has its own bucket)."""
    server = Moto()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: Moto) -> Iterator[Bucket]:
    """A fresh bucket."""
    created = Bucket(moto)
    yield created
    created.close()


@pytest.fixture
def lanes(
    tmp_path: Path, stratum0: FakeStratum0, moto: Moto, bucket: Bucket
) -> Iterator[LaneFactory]:
    """Build (not started) lanes on one configuration; stop their sources afterwards."""
    built: list[tuple[Lane, State]] = []
    credentials = write_credentials(tmp_path / "credentials")

    def build(s3_extra: str = "", repo_extra: str = "") -> Lane:
        path = write_s3_config(
            tmp_path / "cvmfs-syncd.toml",
            state_dir=tmp_path / "state",
            server_command=stratum0.server_command,
            config_dir=stratum0.config_dir,
            repo=REPO,
            endpoint=moto.url,
            bucket=bucket.name,
            credentials_file=credentials,
            s3_extra=s3_extra,
            repo_extra=repo_extra,
        )
        config = config_mod.load(path)
        state = State(config.daemon.state_dir)
        lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
        built.append((lane, state))
        return lane

    yield build
    close_lanes(built)


def sync(lane: Lane) -> None:
    """Publish everything pending; fail with the lane's reason otherwise."""
    ok, why = lane.sync_once(60)
    assert ok, why


def s3_source(lane: Lane) -> S3Input:
    """The lane's S3 source."""
    return next(source for source in lane.inputs if isinstance(source, S3Input))


def readable(stratum0: FakeStratum0, path: str, repo: str = REPO) -> bytes | None:
    """What a client reads at ``path`` (None if it does not exist or cannot be read)."""
    try:
        return stratum0.read_file(repo, path)
    except OSError:
        return None


def ci_tree(stratum0: FakeStratum0) -> dict[str, str]:
    """Path -> type of everything published below /ci."""
    return {
        path: entry.type
        for path, entry in stratum0.published_tree(REPO).items()
        if path == "ci" or path.startswith("ci/")
    }


@pytest.mark.parametrize("prepare", [False, True], ids=["copy-below", "prepared"])
def test_copied_and_grafted_objects_read_back_byte_for_byte_and_a_restart_adds_nothing(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket, prepare: bool
) -> None:
    """Without prepare, small objects are copied and large ones grafted; with it, every
    object below the minimum chunk size (4 MiB) is stored before the transaction as one
    object. The client reads every byte back, grafted files carry the
    object's LastModified and mode 0644, their objects are in the repository's storage,
    and a new lane on the same state publishes nothing again."""
    rng = random.Random(4)
    contents = {
        "builds/small.txt": b"hello from CI\n" * 700,
        "builds/empty": b"",
        "builds/sub/medium.bin": rng.randbytes(600 * 1024),
        "builds/sub/large.bin": rng.randbytes(2 * MIB + 12345),
        "builds/sub/zeros.bin": bytes(3 * MIB),
    }
    for key, data in contents.items():
        bucket.put(key, data)
    extra = f'  copy_below = "256KiB"\n  prepare = {str(prepare).lower()}'
    lane = lanes(s3_extra=extra)
    sync(lane)
    tree = stratum0.published_tree(REPO)
    for key, data in contents.items():
        path = "ci/" + key.removeprefix("builds/")
        assert stratum0.read_file(REPO, path) == data, path
        entry = tree[path]
        assert entry.mode & 0o777 == 0o644
        assert entry.mtime == int(bucket.last_modified(key).timestamp())
    assert [tree[p].grafted for p in ("ci/small.txt", "ci/empty", "ci/sub/medium.bin")] == [
        prepare,
        prepare,
        True,
    ]
    assert tree["ci/sub/large.bin"].grafted
    # Below the minimum chunk size (4 MiB) publish stores one object, and so does a graft.
    assert tree["ci/sub/large.bin"].chunks == ()
    assert tree["ci/sub/zeros.bin"].chunks == ()
    assert tree["ci/sub"].type == "dir"
    assert tree["ci/sub"].mode & 0o777 == 0o755
    whole = tree["ci/sub/large.bin"].hash
    assert whole is not None
    assert (stratum0.storage_dir(REPO) / object_name(whole)).is_file()
    assert not stratum0.violations()
    revision = stratum0.revision(REPO)
    again = lanes(s3_extra=extra)
    sync(again)
    assert stratum0.revision(REPO) == revision


def test_mirror_follows_changes_and_holds_an_emptied_prefix_until_released(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket
) -> None:
    """Changed and deleted objects are republished and removed; emptying the prefix is
    held (nothing deleted) until an operator releases it."""
    for name in ("a", "b", "d/c"):
        bucket.put(f"builds/{name}", name.encode())
    lane = lanes()
    sync(lane)
    assert ci_tree(stratum0) == {
        "ci": "dir",
        "ci/a": "file",
        "ci/b": "file",
        "ci/d": "dir",
        "ci/d/c": "file",
    }
    bucket.put("builds/a", b"a, second version")
    bucket.delete("builds/d/c")
    sync(lane)
    assert stratum0.read_file(REPO, "ci/a") == b"a, second version"
    assert ci_tree(stratum0) == {"ci": "dir", "ci/a": "file", "ci/b": "file"}
    bucket.delete("builds/a")
    bucket.delete("builds/b")
    ok, why = lane.sync_once(30)
    assert not ok
    assert "listing of s3://" in why and "is empty" in why
    assert set(ci_tree(stratum0)) == {"ci", "ci/a", "ci/b"}
    lane.state.request_release(REPO)
    sync(lane)
    assert ci_tree(stratum0) == {"ci": "dir"}


def test_inbox_with_ready_marker_publishes_a_directory_once_and_empties_the_bucket(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket
) -> None:
    """Objects wait for their directory's marker, go live in one revision, and are then
    deleted from the bucket together with the marker."""
    bucket.put("builds/run7/bin/tool", b"#!/bin/sh\n")
    bucket.put("builds/run7/lib/big.so", random.Random(1).randbytes(300 * 1024))
    lane = lanes(s3_extra='  mode = "inbox"\n  ready_marker = ".done"\n  copy_below = "64KiB"')
    ok, why = lane.sync_once(10)
    assert not ok
    assert "ready marker" in why
    assert readable(stratum0, "ci/run7/bin/tool") is None
    revision = stratum0.revision(REPO)
    bucket.put("builds/run7/.done", b"")
    sync(lane)
    assert stratum0.revision(REPO) == revision + 1
    assert stratum0.read_file(REPO, "ci/run7/bin/tool") == b"#!/bin/sh\n"
    assert stratum0.published_tree(REPO)["ci/run7/lib/big.so"].grafted
    assert readable(stratum0, "ci/run7/.done") is None
    assert bucket.keys() == set()
    sync(lane)  # the bucket is empty: inbox keeps what it published
    assert stratum0.read_file(REPO, "ci/run7/bin/tool") == b"#!/bin/sh\n"


def test_hostile_keys_are_refused_and_counted_while_good_ones_publish(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket
) -> None:
    """Keys that would escape the target, use reserved names or control characters are
    not published; each refusal is counted under its reason."""
    hostile = {
        "builds/../escape": "dot-segment",
        "builds/a/./b": "dot-segment",
        "builds//root": "absolute",
        "builds/x//y": "empty-segment",
        "builds/.cvmfscatalog": "reserved-name",
        "builds/bell\x07": "control-character",
        "builds/clash": "file-directory-conflict",
    }
    for key in hostile:
        bucket.put(key, b"evil")
    bucket.put("builds/clash/inner", b"inner")
    bucket.put("builds/good", b"good")
    bucket.put("builds/folder/", b"")  # a console-made "folder": ignored silently
    lane = lanes()
    sync(lane)
    assert ci_tree(stratum0) == {
        "ci": "dir",
        "ci/good": "file",
        "ci/clash": "dir",
        "ci/clash/inner": "file",
    }
    assert readable(stratum0, "escape") is None
    counts: dict[str, float] = {}
    for reason in hostile.values():
        value = lane.metrics.registry.get_sample_value(
            "cvmfs_syncd_inputs_skipped_total",
            {"repository": REPO, "source": s3_source(lane).name, "reason": reason},
        )
        counts[reason] = value or 0.0
    assert counts == {
        "dot-segment": 2,
        "absolute": 1,
        "empty-segment": 1,
        "reserved-name": 1,
        "control-character": 1,
        "file-directory-conflict": 1,
    }


def test_a_name_too_long_for_a_graft_file_is_copied(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket
) -> None:
    """A large object whose name cannot carry '.cvmfsgraft-' is downloaded instead."""
    name = "n" * (GRAFT_NAME_MAX + 5)
    data = random.Random(2).randbytes(400 * 1024)
    bucket.put(f"builds/{name}", data)
    lane = lanes(s3_extra='  copy_below = "64KiB"')
    sync(lane)
    entry = stratum0.published_tree(REPO)[f"ci/{name}"]
    assert not entry.grafted
    assert stratum0.read_file(REPO, f"ci/{name}") == data


def test_an_abandoned_batch_deletes_exactly_the_objects_it_created(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket
) -> None:
    """publish rejects a graft: the batch is aborted, the objects it created are deleted,
    an object it shared with a published file stays, and the rest of the batch publishes."""
    first = random.Random(3).randbytes(5 * MIB)  # above the minimum chunk size: chunked
    bucket.put("builds/one.bin", first + b"tail of one")
    lane = lanes(s3_extra='  copy_below = "64KiB"')
    sync(lane)
    shared = stratum0.published_tree(REPO)["ci/one.bin"].chunks[0]
    shared_object = stratum0.storage_dir(REPO) / object_name(shared.hash, partial=True)
    bucket.put("builds/two.bin", first + b"another tail")
    bucket.put("builds/note.txt", b"note")
    stratum0.inject_fault(
        "publish",
        "fail",
        times=1,
        exit_code=1,
        stdout="",
        stderr=(
            "PANIC: Encountered a grafted file (ci/two.bin) with invalid grafting "
            "information\nSynchronization failed\n"
        ),
    )
    before = {p for p in (stratum0.storage_dir(REPO) / "data").rglob("*") if p.is_file()}
    sync(lane)
    after = {p for p in (stratum0.storage_dir(REPO) / "data").rglob("*") if p.is_file()}
    assert shared_object.is_file()
    assert stratum0.read_file(REPO, "ci/one.bin") == first + b"tail of one"
    assert stratum0.read_file(REPO, "ci/note.txt") == b"note"
    assert readable(stratum0, "ci/two.bin") is None
    new_objects = {p for p in after - before if "txn" not in p.parts}
    # Only the objects of the publish of note.txt's revision are new: none of two.bin's.
    assert all(not p.name.endswith("P") for p in new_objects)
    assert lane.state.set_aside_entry(REPO, s3_source(lane).name, "builds/two.bin") is not None


def test_graft_objects_are_journalled_as_they_are_written_and_abandon_spares_reused(
    lanes: LaneFactory, stratum0: FakeStratum0, bucket: Bucket, tmp_path: Path
) -> None:
    """Preparing journals each object it creates (a crash mid-graft can be undone), never
    an object that was already there; a replaced or deleted object is not prepared."""
    data = random.Random(5).randbytes(4 * MIB + 7)  # chunked: 1 MiB chunks
    etag = bucket.put("builds/g.bin", data)
    lane = lanes(s3_extra='  copy_below = "64KiB"')
    source = s3_source(lane)
    modified = bucket.last_modified("builds/g.bin")
    fp = Fingerprint(
        EntryType.FILE,
        0o644,
        len(data),
        int(modified.timestamp()) * 10**9,
        etag=etag,
    )
    op = Op(OpKind.GRAFT, "ci/g.bin", source.name, "builds/g.bin", fp)
    preparer = lane.preparer
    assert preparer is not None
    first = preparer.prepare(901, [op], source.open_content)
    assert list(first.prepared) == ["ci/g.bin"]
    assert len(first.created) == 5
    assert sorted(lane.state.created_objects(901)) == sorted(first.created)
    assert first.prepared["ci/g.bin"].graft.startswith(f"size={len(data)}\n")
    again = preparer.prepare(902, [op], source.open_content)
    assert again.created == []
    assert lane.state.created_objects(902) == []
    storage = stratum0.storage_dir(REPO)
    assert all((storage / name).is_file() for name in first.created)
    preparer.delete_objects(first.created)
    assert not any((storage / name).exists() for name in first.created)
    bucket.put("builds/g.bin", b"replaced")
    [(_, changed)] = preparer.prepare(903, [op], source.open_content).failed
    assert changed.outcome is ApplyOutcome.CHANGED
    bucket.delete("builds/g.bin")
    source.refresh(time.time())  # a new listing clears what the GETs found changed
    [(_, gone)] = preparer.prepare(904, [op], source.open_content).failed
    assert gone.outcome is ApplyOutcome.VANISHED
    del tmp_path


def test_an_endpoint_outage_is_survived_while_staging_keeps_publishing(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path, lanes: LaneFactory
) -> None:
    """With its endpoint down the S3 source reports down (source_up 0) and plans nothing,
    a staging source of the same repository keeps publishing, and once the endpoint is
    back the S3 source recovers by itself and publishes new uploads."""
    del lanes  # this test runs its own server, which it stops and starts
    outage = Moto()
    bucket = Bucket(outage)
    path = write_s3_config(
        tmp_path / "outage.toml",
        state_dir=tmp_path / "outage-state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        endpoint=outage.url,
        bucket=bucket.name,
        credentials_file=write_credentials(tmp_path / "outage-credentials"),
        repo_extra=(
            f'  [[repository.staging]]\n  path = "{staging}"\n  target = "/staging"\n'
            "  settle_seconds = 0.1\n"
        ),
    )
    config = config_mod.load(path)
    state = State(config.daemon.state_dir)
    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
    source = s3_source(lane)
    labels = {"repository": REPO, "source": source.name}
    lane.start()
    try:
        bucket.put("builds/before", b"before the outage")
        wait_for(lambda: readable(stratum0, "ci/before"), 30, "the first object")
        outage.stop()
        wait_for(lambda: not source.health()[0], 30, "the source to be reported down")
        assert "Could not connect" in source.health()[1]
        assert lane.metrics.registry.get_sample_value("cvmfs_syncd_source_up", labels) == 0
        (staging / "during.txt").write_text("staging still works")
        wait_for(lambda: readable(stratum0, "staging/during.txt"), 30, "the staged file")
        assert readable(stratum0, "ci/before") == b"before the outage"  # nothing deleted
        outage.start()
        bucket.put("builds/after", b"after the outage")
        wait_for(lambda: readable(stratum0, "ci/after"), 60, "recovery")
        assert source.health() == (True, "")
        assert lane.metrics.registry.get_sample_value("cvmfs_syncd_source_up", labels) == 1
    finally:
        lane.request_stop()
        lane.join(timeout=60)
        bucket.close()
        outage.stop()
        state.close()


def test_the_daemon_reports_wrong_credentials_and_recovers_when_they_are_fixed(
    tmp_path: Path, moto: Moto, bucket: Bucket
) -> None:
    """The daemon process, against an endpoint that checks signatures: a wrong secret
    marks the source down with the S3 error code in /status and source_up 0, without
    logging any secret; after the credentials file is fixed the objects publish."""
    key_id, secret = grant_iam_user(moto, f"ci-{bucket.name}")
    bucket.put("builds/artifact.tar", random.Random(9).randbytes(200 * 1024))
    bucket.put("builds/readme", b"read me\n")
    daemon = DaemonUnderTest(tmp_path)
    wrong_secret = "definitely-not-the-secret-0123456789"  # noqa: S105 (a test value)
    credentials = write_credentials(tmp_path / "ci.credentials", key_id, wrong_secret)
    write_s3_config(
        daemon.config_path,
        state_dir=tmp_path / "state",
        server_command=daemon.stratum0.server_command,
        config_dir=daemon.stratum0.config_dir,
        repo=REPO_E2E,
        endpoint=moto.url,
        bucket=bucket.name,
        credentials_file=credentials,
        metrics_address=f"127.0.0.1:{daemon.port}",
        s3_extra='  copy_below = "64KiB"',
    )
    source = f"s3:{bucket.name}/builds/"
    with enable_iam_authentication():
        daemon.start()
        try:

            def reported_down() -> str:
                _, body = daemon.get("/status")
                detail = body["repositories"][REPO_E2E]["sources"][source]
                failed = not detail["up"] and "failed" in str(detail["detail"])
                return str(detail["detail"]) if failed else ""

            why = wait_for(reported_down, 30, "the source to be reported down")
            assert "SignatureDoesNotMatch" in why
            _, metrics = daemon.get("/metrics")
            assert (
                f'cvmfs_syncd_source_up{{repository="{REPO_E2E}",source="{source}"}} 0.0' in metrics
            )
            write_credentials(credentials, key_id, secret)
            wait_for(
                lambda: readable(daemon.stratum0, "ci/readme", REPO_E2E),
                60,
                "publishing after the fix",
            )
            assert daemon.stratum0.read_file(REPO_E2E, "ci/artifact.tar") == random.Random(
                9
            ).randbytes(200 * 1024)
            assert daemon.stratum0.published_tree(REPO_E2E)["ci/artifact.tar"].grafted
            _, body = daemon.get("/status")
            assert body["repositories"][REPO_E2E]["sources"][source]["up"] is True
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0
        finally:
            daemon.stop()
    log = daemon.log()
    assert "SignatureDoesNotMatch" in log
    assert wrong_secret not in log
    assert secret not in log
