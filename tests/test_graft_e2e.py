"""End-to-end tests: large staged files published as grafts, read back through the fake client."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import OpKind
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "graft.example.org"
MIB = 1024 * 1024
CHUNK = MIB  # the repository's CVMFS_MAX_CHUNK_SIZE in these tests

LaneFactory = Callable[..., Lane]


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _text(size: int) -> bytes:
    line = b"export PATH=/cvmfs/software/bin:$PATH\n"
    return (line * (size // len(line) + 1))[:size]


FILES = {
    "small-unchunked.bin": _random(300 * 1024, 1),
    "chunked-random.bin": _random(3 * CHUNK + 12345, 2),
    "exact-multiple.bin": _random(2 * CHUNK, 3),
    "compressible.txt": _text(5 * CHUNK + 7),
    "zeros.img": bytes(CHUNK + 1),
}


# The repository chunks files of 256 KiB and more at 1 MiB; publish stores files below the
# minimum chunk size as one object, and so do grafts.
pytestmark = pytest.mark.stratum0(
    REPO, config={"CVMFS_MAX_CHUNK_SIZE": str(CHUNK), "CVMFS_MIN_CHUNK_SIZE": str(CHUNK // 4)}
)


@pytest.fixture
def lane_factory(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[LaneFactory]:
    """Build lanes grafting files of 256 KiB and more."""
    states: list[State] = []

    def build(extra: str = "") -> Lane:
        path = write_config(
            tmp_path / "cvmfs-syncd.toml",
            state_dir=tmp_path / "state",
            server_command=stratum0.server_command,
            config_dir=stratum0.config_dir,
            repo=REPO,
            staging=staging,
            staging_extra='  graft_threshold = "256KiB"' + extra,
        )
        config = config_mod.load(path)
        state = State(config.daemon.state_dir)
        states.append(state)
        return build_lane(config, config.repositories[0], state, Metrics(), make_server(config))

    yield build
    for state in states:
        state.close()


def _sync(lane: Lane) -> None:
    ok, why = lane.sync_once(60)
    assert ok, why


def _objects(stratum0: FakeStratum0) -> set[str]:
    data = stratum0.storage_dir(REPO) / "data"
    return {f"{p.parent.name}/{p.name}" for p in data.glob("??/*") if p.is_file()}


def test_large_files_are_grafted_and_read_back_identically(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Unchunked, chunked, exact-multiple, compressible and incompressible files all read back."""
    for name, data in FILES.items():
        (staging / name).write_bytes(data)
    (staging / "tiny.txt").write_text("prepared before the transaction")
    lane = lane_factory()
    _sync(lane)
    tree = stratum0.published_tree(REPO)
    for name, data in FILES.items():
        assert tree[name].grafted, name
        assert tree[name].compression == "zlib"
        assert stratum0.read_file(REPO, name) == data, name
    assert tree["tiny.txt"].grafted and not tree["tiny.txt"].chunks
    assert stratum0.read_file(REPO, "tiny.txt") == b"prepared before the transaction"
    assert len(tree["chunked-random.bin"].chunks) == 4
    assert len(tree["exact-multiple.bin"].chunks) == 2
    assert not tree["small-unchunked.bin"].chunks


def test_graft_objects_have_the_names_clients_look_up(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """Each chunk is stored as data/xx/<38 hex>P holding a complete zlib stream of that chunk."""
    data = FILES["chunked-random.bin"]
    (staging / "big.bin").write_bytes(data)
    _sync(lane_factory())
    entry = stratum0.published_tree(REPO)["big.bin"]
    for chunk in entry.chunks:
        stored = stratum0.object_path(REPO, chunk.hash + "P").read_bytes()
        assert hashlib.sha1(stored).hexdigest() == chunk.hash  # noqa: S324 (CVMFS content hash)
        assert zlib.decompress(stored) == data[chunk.offset : chunk.offset + chunk.size]


def test_uncompressed_repository_gets_raw_objects(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """With CVMFS_COMPRESSION_ALGORITHM=none the graft says so and objects hold raw bytes."""
    stratum0.set_config(REPO, "CVMFS_COMPRESSION_ALGORITHM", "none")
    data = FILES["small-unchunked.bin"]
    (staging / "raw.bin").write_bytes(data)
    _sync(lane_factory())
    entry = stratum0.published_tree(REPO)["raw.bin"]
    assert entry.compression == "none"
    assert entry.hash is not None
    assert stratum0.object_path(REPO, entry.hash).read_bytes() == data
    assert stratum0.read_file(REPO, "raw.bin") == data


def test_missing_or_corrupt_object_is_detected(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A corrupted chunk gives EIO to clients; check -i reports it (the fake models both)."""
    (staging / "big.bin").write_bytes(FILES["chunked-random.bin"])
    _sync(lane_factory())
    entry = stratum0.published_tree(REPO)["big.bin"]
    victim = stratum0.object_path(REPO, entry.chunks[1].hash + "P")
    victim.write_bytes(b"corrupt")
    with pytest.raises(OSError) as caught:
        stratum0.read_file(REPO, "big.bin")
    assert caught.value.errno == errno.EIO
    victim.unlink()
    result = stratum0.run("check", REPO)
    assert result.returncode == 1
    assert "missing" in result.stdout + result.stderr


def test_abandoned_batch_leaves_no_orphan_objects(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """When publish rejects the graft, the objects the batch created are deleted again."""
    before = _objects(stratum0)
    (staging / "rejected.bin").write_bytes(FILES["chunked-random.bin"])
    stratum0.inject_fault(
        "publish",
        "exit",
        times=1,
        exit_code=1,
        stderr="Encountered a grafted file (rejected.bin) with invalid grafting information\n",
    )
    lane = lane_factory()
    lane.sync_once(20)
    assert "rejected.bin" not in stratum0.published_tree(REPO)
    assert _objects(stratum0) == before
    assert [p for _, p, _ in lane.state.set_aside_list(REPO)] == ["rejected.bin"]
    assert not stratum0.in_transaction(REPO)


def test_existing_objects_are_reused_and_never_deleted(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A second file with the same content reuses the objects; abandoning it deletes nothing."""
    data = FILES["chunked-random.bin"]
    (staging / "a.bin").write_bytes(data)
    lane = lane_factory()
    _sync(lane)
    objects = _objects(stratum0)
    (staging / "b.bin").write_bytes(data)
    stratum0.inject_fault(
        "publish",
        "exit",
        times=1,
        exit_code=1,
        stderr="Encountered a grafted file (b.bin) with invalid grafting information\n",
    )
    lane.sync_once(20)
    assert _objects(stratum0) == objects
    assert stratum0.read_file(REPO, "a.bin") == data


def test_long_names_are_copied_not_grafted(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A name over 243 bytes cannot carry the .cvmfsgraft- prefix: it is copied instead."""
    name = "n" * 250
    (staging / name).write_bytes(FILES["small-unchunked.bin"])
    lane = lane_factory()
    _sync(lane)
    entry = stratum0.published_tree(REPO)[name]
    assert not entry.grafted
    assert stratum0.read_file(REPO, name) == FILES["small-unchunked.bin"]


@pytest.mark.parametrize(
    ("prepare", "small_kind"), [(True, OpKind.GRAFT), (False, OpKind.COPY_FILE)]
)
def test_graft_ops_are_planned_for_large_files(
    lane_factory: LaneFactory, staging: Path, prepare: bool, small_kind: OpKind
) -> None:
    """Files at or above graft_threshold become GRAFT ops; smaller ones are prepared (GRAFT)
    or, with prepare = false, copied."""
    (staging / "big").write_bytes(bytes(300 * 1024))
    (staging / "small").write_bytes(bytes(10))
    os.utime(staging / "big", (1, 1))
    os.utime(staging / "small", (1, 1))
    lane = lane_factory(f"\n  prepare = {str(prepare).lower()}")
    lane.reconcile(lane.clock())
    ops, _, _ = lane.batches.plan(lane.clock())
    kinds = {op.repo_path: op.kind for op in ops}
    assert kinds == {"big": OpKind.GRAFT, "small": small_kind}


def test_crash_in_the_middle_of_a_graft_leaves_no_orphans(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Objects are journalled as written: after a crash while placing the graft in the
    transaction, recovery aborts it and deletes them."""
    from cvmfs_syncd import fsops

    before = _objects(stratum0)
    (staging / "big.bin").write_bytes(FILES["chunked-random.bin"])

    class Crash(BaseException):
        """Stands in for kill -9: no handler in the daemon catches it."""

    def crash(*_args: object, **_kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(fsops.UnionWriter, "write", crash)
    lane = lane_factory()
    with pytest.raises(Crash):
        lane.sync_once(20)
    lane.lock.release()
    assert len(_objects(stratum0) - before) == 4  # the chunks were written
    assert stratum0.in_transaction(REPO)
    monkeypatch.undo()
    (staging / "big.bin").write_bytes(_random(3 * CHUNK + 12345, 99))  # other objects now
    restarted = lane_factory()
    _sync(restarted)
    entry = stratum0.published_tree(REPO)["big.bin"]
    referenced = {f"{c.hash[:2]}/{c.hash[2:]}P" for c in entry.chunks}
    content = {o for o in _objects(stratum0) - before if not o.endswith(("C", "H", "X", "M"))}
    assert content == referenced
