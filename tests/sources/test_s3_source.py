"""The S3 source at the listing level: key mapping, readiness, deletions and their guard,
restarts, large prefixes, outages and credentials, with an in-memory client (no HTTP)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import EndpointConnectionError
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_syncd import fsops
from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config
from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.errors import SourceError
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, ListedObject, Op, OpKind
from cvmfs_syncd.paths import reserved_name, split_repo_path
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy
from cvmfs_syncd.planner import ApplyOutcome, Plan
from cvmfs_syncd.sources.s3 import S3Input
from cvmfs_syncd.sources.s3_client import make_client
from cvmfs_syncd.state import State
from tests.sources.s3_support import FakeS3, write_credentials
from tests.support import wait_for

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REPO = "s3.example.org"
T0 = 1_800_000_000.0


def make_source(
    state: State,
    fake: FakeS3,
    *,
    content: ContentPolicy = COPY_ONLY,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    **config: object,
) -> S3Input:
    """An S3 source on ``fake`` with prefix ``builds/`` and target ``/ci``."""
    values: dict[str, object] = {"bucket": "ci", "prefix": "builds/", "target": "/ci"}
    values.update(config)
    values.setdefault("poll_seconds", 1.0)
    return S3Input(
        REPO,
        S3Config(**values),  # type: ignore[arg-type]
        state,
        metrics or Metrics(),
        content=content,
        clock=clock,
        client_factory=lambda _config: fake,  # type: ignore[arg-type,return-value]
    )


#: A repository whose objects this host writes, chunking from 4 MiB.
WRITABLE = ContentPolicy(writable=True, small_limit=4 * 1024 * 1024)


def pending(hints: Sequence[Dirty]) -> list[Pending]:
    """Turn hints into the entries the lane would hand to plan()."""
    return [Pending(h.source, h.rel_path, h.at, h.at, from_scan=h.from_scan) for h in hints]


def plan_hints(source: S3Input, hints: Sequence[Dirty], now: float) -> Plan:
    """Plan the hints as the lane would."""
    return source.plan(pending(hints), now)


def publish(state: State, ops: Sequence[Op], revision: int = 2) -> None:
    """Record ops as live, as the lane does after a successful publish."""
    state.apply_published(REPO, ops, revision)


def ops_by_path(plan: Plan) -> dict[str, OpKind]:
    """Path -> kind of every op of a plan."""
    return {op.repo_path: op.kind for op in plan.ops}


def skipped(metrics: Metrics, reason: str, source: str = "s3:ci/builds/") -> float:
    """The skipped-inputs counter for ``reason``."""
    value = metrics.registry.get_sample_value(
        "cvmfs_syncd_inputs_skipped_total",
        {"repository": REPO, "source": source, "reason": reason},
    )
    return value or 0.0


@pytest.fixture
def fake() -> FakeS3:
    """An empty in-memory bucket."""
    return FakeS3()


def test_hostile_keys_are_refused_once_with_a_reason_and_never_planned(
    state: State, fake: FakeS3
) -> None:
    """Escaping, empty, reserved, control-character and conflicting keys never become ops;
    each is counted once under its reason, directory markers are ignored silently."""
    for key in (
        "builds/ok.txt",
        "builds/../etc/passwd",
        "builds/a//b",
        "builds/./x",
        "builds//abs",
        "builds/.cvmfscatalog",
        "builds/sub/.cvmfsgraft-ok",
        "builds/new\nline",
        "builds/dir/",
        "builds/" + "n" * 300,
        "builds/x",
        "builds/x/y",
    ):
        fake.put(key, b"data")
    metrics = Metrics()
    source = make_source(state, fake, metrics=metrics)
    source.poll(T0)
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    assert ops_by_path(plan) == {
        "ci/ok.txt": OpKind.COPY_FILE,
        "ci/x": OpKind.MAKE_DIR,
        "ci/x/y": OpKind.COPY_FILE,
    }
    expected = {
        "dot-segment": 2,
        "empty-segment": 1,
        "absolute": 1,
        "reserved-name": 2,
        "control-character": 1,
        "name-too-long": 1,
        "file-directory-conflict": 1,
        "directory-marker": 0,
    }
    assert {reason: skipped(metrics, reason) for reason in expected} == expected
    source.poll(T0 + 2)
    assert skipped(metrics, "dot-segment") == 2  # reported once per version, not per poll


def test_an_object_is_taken_after_two_listings_with_the_same_size_and_etag(
    state: State, fake: FakeS3
) -> None:
    """A new object is deferred until the next listing; a changed one starts over."""
    fake.put("builds/a.bin", b"one")
    source = make_source(state, fake)
    first = source.poll(T0)
    plan = plan_hints(source, first, T0)
    assert plan.ops == []
    assert [p.rel_path for p in plan.deferred] == ["a.bin"]
    assert plan.deferred[0].not_before >= T0 + 1
    fake.put("builds/a.bin", b"two!")  # rewritten before the second listing
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    assert plan.ops == []
    second = source.poll(T0 + 2)
    assert [h.rel_path for h in second] == ["a.bin"]
    plan = plan_hints(source, second, T0 + 2)
    [op] = plan.ops
    assert (op.kind, op.repo_path, op.source_path) == (OpKind.COPY_FILE, "ci/a.bin", "builds/a.bin")
    assert op.fingerprint is not None
    assert (op.fingerprint.size, op.fingerprint.mode) == (4, 0o644)
    assert op.fingerprint.etag == fake.objects["builds/a.bin"][1]
    assert op.fingerprint.mtime_ns == int(fake.objects["builds/a.bin"][2].timestamp()) * 10**9


def test_large_objects_are_grafted_and_long_names_copied(state: State, fake: FakeS3) -> None:
    """Without prepare, copy_below splits copies from grafts; a name too long for
    .cvmfsgraft- is copied."""
    long_name = "L" * (GRAFT_NAME_MAX + 1)
    fake.put("builds/small", b"x" * 99)
    fake.put("builds/edge", b"x" * 100)
    fake.put(f"builds/{long_name}", b"x" * 1000)
    fake.put("builds/" + "F" * GRAFT_NAME_MAX, b"x" * 1000)
    source = make_source(state, fake, content=WRITABLE, copy_below=100, prepare=False)
    source.poll(T0)
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    assert ops_by_path(plan) == {
        "ci/small": OpKind.COPY_FILE,
        "ci/edge": OpKind.GRAFT,
        f"ci/{long_name}": OpKind.COPY_FILE,
        "ci/" + "F" * GRAFT_NAME_MAX: OpKind.GRAFT,
    }


def test_with_prepare_small_objects_are_prepared_and_large_ones_follow_copy_below(
    state: State, fake: FakeS3
) -> None:
    """prepare (the default) grafts every object below the repository's minimum chunk size;
    from there on copy_below decides; a name too long for .cvmfsgraft- is copied; a
    repository whose objects this host cannot write copies everything."""
    long_name = "L" * (GRAFT_NAME_MAX + 1)
    fake.put("builds/small", b"x" * 99)
    fake.put("builds/chunked", b"x" * 300)
    fake.put("builds/big", b"x" * 1000)
    fake.put(f"builds/{long_name}", b"x" * 10)
    content = ContentPolicy(writable=True, small_limit=200)
    source = make_source(state, fake, content=content, copy_below=500)
    source.poll(T0)
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    assert ops_by_path(plan) == {
        "ci/small": OpKind.GRAFT,
        "ci/chunked": OpKind.COPY_FILE,
        "ci/big": OpKind.GRAFT,
        f"ci/{long_name}": OpKind.COPY_FILE,
    }
    copying = make_source(state, fake, copy_below=500, bucket="other")
    copying.poll(T0)
    plan = plan_hints(copying, copying.poll(T0 + 1), T0 + 1)
    assert set(ops_by_path(plan).values()) == {OpKind.COPY_FILE}


def test_a_ready_marker_holds_a_directory_then_publishes_it_at_once_together(
    state: State, fake: FakeS3
) -> None:
    """Without the marker the directory waits; with it every object is taken at once (no
    second listing) as one atomic group, and the marker itself is never published."""
    fake.put("builds/run1/a", b"a")
    fake.put("builds/run1/sub/b", b"b")
    fake.put("builds/top-level", b"t")
    source = make_source(state, fake, ready_marker=".ready")
    plan = plan_hints(source, source.poll(T0), T0)
    assert sorted(p.rel_path for p in plan.waiting_for_marker) == [
        "run1",
        "run1/a",
        "run1/sub",
        "run1/sub/b",
    ]
    assert [p.rel_path for p in plan.deferred] == ["top-level"]  # no marker rule at the top
    fake.put("builds/run1/.ready", b"")
    hints = source.poll(T0 + 0.5)
    plan = plan_hints(source, hints, T0 + 0.5)
    assert ops_by_path(plan) == {
        "ci/run1": OpKind.MAKE_DIR,
        "ci/run1/a": OpKind.COPY_FILE,
        "ci/run1/sub": OpKind.MAKE_DIR,
        "ci/run1/sub/b": OpKind.COPY_FILE,
    }
    # top-level, seen for 0.5 s only, is not stable yet: the poll sent no hint for it.
    assert [sorted(group) for group in plan.atomic_groups] == [
        ["ci/run1", "ci/run1/a", "ci/run1/sub", "ci/run1/sub/b"]
    ]


def _publish_all(source: S3Input, state: State, now: float) -> list[Op]:
    """List twice, plan everything, record it as live; return the ops."""
    source.poll(now)
    plan = plan_hints(source, source.reconcile(now + 1), now + 1)
    publish(state, plan.ops)
    return plan.ops


def test_mirror_deletes_vanished_objects_and_empty_directories(state: State, fake: FakeS3) -> None:
    """A deleted key deletes its path; a directory whose last key went goes too."""
    fake.put("builds/keep", b"k")
    fake.put("builds/d/only", b"o")
    source = make_source(state, fake)
    _publish_all(source, state, T0)
    del fake.objects["builds/d/only"]
    plan = plan_hints(source, source.poll(T0 + 2), T0 + 2)
    assert ops_by_path(plan) == {"ci/d": OpKind.DELETE, "ci/d/only": OpKind.DELETE}
    assert not plan.guarded


def test_mass_deletion_and_an_empty_listing_are_held(state: State, fake: FakeS3) -> None:
    """Deleting most of the target is held by the guard; an emptied prefix is held even
    below the guard's minimum, with a reason naming the prefix."""
    for i in range(20):
        fake.put(f"builds/f{i:02d}", b"x")
    source = make_source(state, fake)
    _publish_all(source, state, T0)
    for i in range(15):
        del fake.objects[f"builds/f{i:02d}"]
    plan = plan_hints(source, source.poll(T0 + 2), T0 + 2)
    assert plan.ops == []
    assert len(plan.guarded) == 15
    assert "15 of 20" in plan.guard_reason

    small = FakeS3()
    for i in range(3):
        small.put(f"builds/s{i}", b"x")
    state2 = State(Path(tempfile.mkdtemp(dir=state.path.parent)))
    try:
        other = make_source(state2, small)
        _publish_all(other, state2, T0)
        small.objects.clear()
        small.put("builds/", b"")  # a console's folder marker survives the emptying
        plan = plan_hints(other, other.poll(T0 + 2), T0 + 2)
        assert plan.ops == []
        assert len(plan.guarded) == 3
        assert "listing of s3://ci/builds/ is empty" in plan.guard_reason
    finally:
        state2.close()


def test_inbox_mode_never_deletes_from_the_repository(state: State, fake: FakeS3) -> None:
    """In inbox mode an object that left the bucket stays published."""
    fake.put("builds/a", b"a")
    source = make_source(state, fake, mode="inbox")
    source.poll(T0)
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    publish(state, plan.ops)
    fake.objects.clear()
    assert plan_hints(source, source.poll(T0 + 2), T0 + 2).ops == []
    assert source.reconcile(T0 + 2) == []


def test_a_restart_publishes_nothing_twice_and_keeps_readiness(state: State, fake: FakeS3) -> None:
    """A new source on the same state finds everything live (no hints), and an object seen
    before the restart is ready at the first listing after it."""
    fake.put("builds/a", b"a")
    fake.put("builds/d/b", b"b")
    source = make_source(state, fake)
    _publish_all(source, state, T0)
    fake.put("builds/new", b"n")
    source.poll(T0 + 2)  # seen once before the "restart"
    restarted = make_source(state, fake)
    hints = restarted.poll(T0 + 3)
    assert [h.rel_path for h in hints] == ["new"]
    assert ops_by_path(plan_hints(restarted, hints, T0 + 3)) == {"ci/new": OpKind.COPY_FILE}


def test_an_object_replaced_after_the_listing_waits_for_the_next_listing(
    state: State, fake: FakeS3, tmp_path: Path
) -> None:
    """A download that finds a newer version (If-Match fails) is not re-planned from the
    same listing (that would only fail again); the next listings publish the new one."""
    fake.put("builds/a", b"first")
    source = make_source(state, fake)
    source.poll(T0)
    [op] = plan_hints(source, source.poll(T0 + 1), T0 + 1).ops
    fake.put("builds/a", b"second version")
    union = tmp_path / "union"
    union.mkdir()
    assert source.apply(op, union).outcome is ApplyOutcome.CHANGED
    assert not (union / "ci" / "a").exists()
    again = source.plan(pending([Dirty(source.name, "a", T0 + 1)]), T0 + 1)
    assert again.ops == []
    assert [p.rel_path for p in again.deferred] == ["a"]
    source.poll(T0 + 2)
    [fresh] = plan_hints(source, source.poll(T0 + 3), T0 + 3).ops
    assert source.apply(fresh, union).outcome is ApplyOutcome.APPLIED
    assert (union / "ci" / "a").read_bytes() == b"second version"
    del fake.objects["builds/a"]
    assert source.apply(fresh, union).outcome is ApplyOutcome.VANISHED


def test_a_failed_download_backs_off_before_planning_again(
    state: State, fake: FakeS3, tmp_path: Path
) -> None:
    """An endpoint failing during a download raises OSError (the lane re-queues the op)
    and the source defers its entries for a back-off instead of retrying at once."""
    fake.put("builds/a", b"a")
    source = make_source(state, fake, poll_seconds=5.0)
    source.poll(T0)
    [op] = plan_hints(source, source.poll(T0 + 5), T0 + 5).ops
    fake.failure = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/ci")
    source.clock = lambda: T0 + 5
    with pytest.raises(OSError, match="S3 GET of 'builds/a' failed"):
        source.apply(op, tmp_path)
    plan = source.plan(pending([Dirty(source.name, "a", T0 + 5)]), T0 + 6)
    assert plan.ops == []
    assert plan.deferred[0].not_before >= T0 + 10
    fake.failure = None
    assert [
        o.repo_path for o in source.plan(pending([Dirty(source.name, "a", T0)]), T0 + 10).ops
    ] == ["ci/a"]


def test_a_large_prefix_is_listed_in_pages_and_stored_incrementally(
    state: State, fake: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 000 keys in 100 pages: listing, mapping and storing take seconds, and a poll
    that finds nothing new writes nothing to the state database."""
    for i in range(100_000):
        fake.put(f"builds/dir{i % 100:02d}/file{i:06d}", b"")
    source = make_source(state, fake)
    started = time.monotonic()
    hints = source.poll(T0)
    first = time.monotonic() - started
    assert len(hints) == 100_100  # every file and its directory differs from the empty index
    assert len(state.s3_listing(source.listing_key)) == 100_000
    written: list[int] = []
    original = state.update_s3_listing

    def spy(name: str, changed: Iterable[ListedObject], removed: Iterable[str]) -> None:
        rows = list(changed)
        written.append(len(rows))
        original(name, rows, removed)

    monkeypatch.setattr(state, "update_s3_listing", spy)
    started = time.monotonic()
    source.poll(T0 + 1)  # every object becomes stable: 100 000 rows change once
    source.poll(T0 + 2)
    later = time.monotonic() - started
    assert written == [100_000, 0]
    assert first < 30 and later < 30, (first, later)


def test_a_failing_listing_marks_the_source_down_and_it_recovers(
    state: State, fake: FakeS3
) -> None:
    """An unreachable endpoint: SourceError, up=0 with the reason, nothing planned (no
    deletions from a stale view); the next good listing brings it back."""
    fake.put("builds/a", b"a")
    metrics = Metrics()
    source = make_source(state, fake, metrics=metrics)
    _publish_all(source, state, T0)
    fake.failure = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/ci")
    with pytest.raises(SourceError, match="Could not connect"):
        source.poll(T0 + 2)
    up, detail = source.health()
    assert not up
    assert "listing s3://ci/builds/" in detail
    labels = {"repository": REPO, "source": source.name}
    assert metrics.registry.get_sample_value("cvmfs_syncd_source_up", labels) == 0
    entries = pending([Dirty(source.name, "a", T0 + 2)])
    plan = source.plan(entries, T0 + 2)
    assert plan.ops == []
    assert [p.rel_path for p in plan.deferred] == ["a"]
    fake.failure = None
    assert source.poll(T0 + 3) == []
    assert source.health() == (True, "")
    assert metrics.registry.get_sample_value("cvmfs_syncd_source_up", labels) == 1


def test_the_poller_thread_submits_hints_and_stops(state: State, fake: FakeS3) -> None:
    """start() polls in its own thread and sends hints; stop() ends it and closes the client."""
    fake.put("builds/a", b"a")
    source = make_source(state, fake)
    seen: list[Dirty] = []
    source.start(seen.append)
    try:
        wait_for(lambda: seen, 10, "a hint from the poller")
        assert [h.rel_path for h in seen] == ["a"]
        assert source.health() == (True, "")
    finally:
        source.stop()
    assert fake.closed


_KEY_PARTS = st.sampled_from(["a", "b", ".", "..", "", "x y", "é", "\x00", "\n", ".cvmfsgraft-a"])


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(
        st.lists(_KEY_PARTS, min_size=1, max_size=4).map("/".join), min_size=1, max_size=12
    ),
    prefix=st.sampled_from(["", "builds", "builds/"]),
)
def test_no_key_ever_plans_an_op_outside_its_target(keys: list[str], prefix: str) -> None:
    """Whatever keys a bucket holds, every op stays below the target, has only safe
    components and no reserved name, and copies a key from under the prefix."""
    fake = FakeS3()
    for key in keys:
        fake.put(prefix.rstrip("/") + "/" + key if prefix else key, b"x")
    with tempfile.TemporaryDirectory() as tmp:
        db = State(Path(tmp))
        try:
            source = make_source(db, fake, prefix=prefix)
            source.poll(T0)
            plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
        finally:
            db.close()
    full = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    for op in plan.ops:
        parts = split_repo_path(op.repo_path)
        assert parts[0] == "ci"
        assert len(parts) > 1
        assert all(reserved_name(part) is None for part in parts)
        assert op.source_path.startswith(full)
        if op.kind is not OpKind.MAKE_DIR:
            assert op.source_path in fake.objects


def test_credentials_come_from_the_file_not_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With credentials_file and a profile, the file's keys are used even when AWS_* keys
    are in the environment, and the environment is left untouched."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-environment")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    path = write_credentials(tmp_path / "creds", "from-file", "file-secret", profile="ci")
    config = S3Config(bucket="b", endpoint_url="http://127.0.0.1:9", credentials_file=path)
    with pytest.raises(SourceError, match="profile"):
        make_client(config)  # profile "default" is not in the file
    client = make_client(S3Config(bucket="b", credentials_file=path, profile="ci"))
    try:
        frozen = client._request_signer._credentials.get_frozen_credentials()  # type: ignore[attr-defined]
        assert frozen.access_key == "from-file"
    finally:
        client.close()
    assert "AWS_SHARED_CREDENTIALS_FILE" not in os.environ
    chain = make_client(S3Config(bucket="b"))  # no file: the standard chain (environment)
    try:
        frozen = chain._request_signer._credentials.get_frozen_credentials()  # type: ignore[attr-defined]
        assert frozen.access_key == "from-environment"
    finally:
        chain.close()


def test_write_stream_places_complete_downloads_only(tmp_path: Path) -> None:
    """fsops.write_stream writes pieces atomically with mode and mtime, leaves nothing for a
    short download, and replaces a symlinked parent instead of writing through it."""
    union = tmp_path / "union"
    union.mkdir()
    assert fsops.write_stream(union, "a/b", [b"ab", b"cd"], size=4, mtime_ns=10**18)
    st = (union / "a" / "b").stat()
    assert ((union / "a" / "b").read_bytes(), st.st_mode & 0o777, st.st_mtime_ns) == (
        b"abcd",
        0o644,
        10**18,
    )
    assert not fsops.write_stream(union, "a/b", [b"abc"], size=4)
    assert (union / "a" / "b").read_bytes() == b"abcd"
    assert sorted(os.listdir(union / "a")) == ["b"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (union / "link").symlink_to(outside)
    assert fsops.write_stream(union, "link/x", [b"x"])
    assert list(outside.iterdir()) == []
    assert (union / "link").is_dir() and not (union / "link").is_symlink()

    def failing() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        fsops.write_stream(union, "a/c", failing())
    assert sorted(os.listdir(union / "a")) == ["b"]


def test_update_s3_listing_upserts_and_removes(state: State) -> None:
    """The incremental listing update changes only the rows given."""
    a, b, c = (
        ListedObject("a", 1, "e1", "t", 1.0, False),
        ListedObject("b", 2, "e2", "t", 1.0, False),
        ListedObject("c", 3, "e3", "t", 2.0, False),
    )
    state.save_s3_listing("s", [a, b])
    stable_a = replace(a, stable=True)
    state.update_s3_listing("s", [stable_a, c], ["b"])
    assert state.s3_listing("s") == {"a": stable_a, "c": c}


def test_directories_carry_a_directory_fingerprint(state: State, fake: FakeS3) -> None:
    """Implied directories are planned with mode 0755 and a key-like source path."""
    fake.put("builds/d/e/f", b"x")
    source = make_source(state, fake)
    source.poll(T0)
    plan = plan_hints(source, source.poll(T0 + 1), T0 + 1)
    dirs = [op for op in plan.ops if op.kind is OpKind.MAKE_DIR]
    assert [(op.repo_path, op.source_path) for op in dirs] == [
        ("ci/d", "builds/d/"),
        ("ci/d/e", "builds/d/e/"),
    ]
    assert all(
        op.fingerprint is not None
        and op.fingerprint.type is EntryType.DIRECTORY
        and op.fingerprint.mode == 0o755
        for op in dirs
    )


def test_a_dead_endpoint_is_tried_once_per_batch(tmp_path: Path, state: State) -> None:
    """After one failed download the rest of the batch fails at once, without a request each."""
    from tests.sources.s3_support import Bucket, Moto

    moto = Moto()
    bucket = Bucket(moto)
    for i in range(5):
        bucket.put(f"builds/f{i}", b"x" * 100)
    bucket.client.close()
    requests: list[str] = []

    def count_get(params: dict[str, Any], **_: Any) -> None:
        requests.append(params["Key"])

    def counting_client(config: S3Config) -> S3Client:
        client = make_client(config)
        client.meta.events.register("provide-client-params.s3.GetObject", count_get)
        return client

    creds = write_credentials(tmp_path / "creds")
    config = S3Config(
        bucket=bucket.name,
        prefix="builds/",
        target="/ci",
        endpoint_url=moto.url,
        region="us-east-1",
        credentials_file=creds,
        poll_seconds=1.0,
    )
    source = S3Input("r.example", config, state, Metrics(), client_factory=counting_client)
    try:
        source.poll(T0)
        source.poll(T0 + 2)
        plan = source.plan(pending(source.reconcile(T0 + 2)), T0 + 2)
        files = [op for op in plan.ops if op.kind is OpKind.COPY_FILE]
        assert len(files) == 5
        moto.stop()
        union = tmp_path / "union"
        union.mkdir()
        failures = 0
        for op in files:
            try:
                source.apply(op, union)
            except OSError:
                failures += 1
        assert failures == 5
        assert len(requests) == 1
    finally:
        source.stop()
        moto.stop()


class _DeletingS3(FakeS3):
    """FakeS3 with HEAD/DELETE, and GETs that can be made to fail."""

    fail_get: frozenset[str] = frozenset()

    def get_object(self, *, Bucket: str, Key: str, IfMatch: str = "") -> dict[str, Any]:
        if Key in self.fail_get:
            raise EndpointConnectionError(endpoint_url="http://minio:9000")
        return super().get_object(Bucket=Bucket, Key=Key, IfMatch=IfMatch)

    def head_object(
        self,
        *,
        Bucket: str,  # noqa: ARG002 (boto3's signature)
        Key: str,
        IfMatch: str | None = None,
    ) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "404"}}, "HeadObject")
        if IfMatch and IfMatch != self.objects[Key][1]:
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "HeadObject")
        return {}

    def delete_object(
        self,
        *,
        Bucket: str,  # noqa: ARG002 (boto3's signature)
        Key: str,
    ) -> dict[str, Any]:
        self.objects.pop(Key, None)
        return {}


def test_inbox_keeps_the_marker_until_its_directory_is_empty(state: State, tmp_path: Path) -> None:
    """An object that failed to publish keeps its directory's marker, and goes live later."""
    fake = _DeletingS3()
    for key in ("builds/b1/a", "builds/b1/b", "builds/b1/.done"):
        fake.put(key, b"data-" + key.encode())
    now = [T0]
    source = make_source(state, fake, mode="inbox", ready_marker=".done", clock=lambda: now[0])
    plan = plan_hints(source, source.poll(T0), T0)
    fake.fail_get = frozenset({"builds/b1/b"})
    union = tmp_path / "union"
    union.mkdir()
    applied = []
    for op in plan.ops:
        try:
            source.apply(op, union)
        except OSError:
            continue
        applied.append(op)
    state.apply_published("r", applied, 2)
    source.published(applied)
    assert sorted(fake.objects) == ["builds/b1/.done", "builds/b1/b"]
    fake.fail_get = frozenset()
    now[0] += 60  # the back-off after the failed GET has passed
    retry = source.plan([Pending(source.name, "b1/b", T0, T0)], T0 + 500)
    assert [op.source_path for op in retry.ops] == ["builds/b1/b"]
    for op in retry.ops:
        source.apply(op, union)
    source.published(retry.ops)
    assert fake.objects == {}
