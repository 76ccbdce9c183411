"""End-to-end tests of the prepare stage: objects written before the transaction opens."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.storage import RecordingSink
from cvmfs_syncd.lane import Lane
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.pipeline.prepare import Preparer, PrepareResult
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "prepare.example.org"

LaneFactory = Callable[[], Lane]

pytestmark = pytest.mark.stratum0(REPO)


@pytest.fixture
def lane_factory(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[LaneFactory]:
    """Build lanes (prepare on, the default) and close their state afterwards."""
    states: list[State] = []

    def build() -> Lane:
        path = write_config(
            tmp_path / "cvmfs-syncd.toml",
            state_dir=tmp_path / "state",
            server_command=stratum0.server_command,
            config_dir=stratum0.config_dir,
            repo=REPO,
            staging=staging,
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


def _content_objects(stratum0: FakeStratum0) -> set[str]:
    """Every data object but catalogs, histories, certificates and meta-info."""
    data = stratum0.storage_dir(REPO) / "data"
    return {
        f"data/{p.parent.name}/{p.name}"
        for p in data.glob("??/*")
        if p.is_file() and not p.name.endswith(("C", "H", "X", "M"))
    }


def _referenced(stratum0: FakeStratum0) -> set[str]:
    """The content objects the latest revision refers to."""
    names = set()
    for entry in stratum0.published_tree(REPO).values():
        if entry.hash:
            names.add(f"data/{entry.hash[:2]}/{entry.hash[2:]}")
        for chunk in entry.chunks:
            names.add(f"data/{chunk.hash[:2]}/{chunk.hash[2:]}P")
    return names


def test_small_files_go_in_as_graft_markers_with_the_objects_publish_would_write(
    lane_factory: LaneFactory, stratum0: FakeStratum0, staging: Path
) -> None:
    """A prepared file has the same object as a copied one (deduplication holds), its mode
    and mtime, and the transaction received no file content."""
    (staging / "a.txt").write_bytes(b"same content\n")
    (staging / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (staging / "tool").chmod(0o755)
    lane = lane_factory()
    _sync(lane)
    tree = stratum0.published_tree(REPO)
    assert tree["a.txt"].grafted and tree["tool"].grafted
    assert tree["tool"].mode & 0o777 == 0o755
    assert stratum0.read_file(REPO, "a.txt") == b"same content\n"
    assert stratum0.read_file(REPO, "tool") == b"#!/bin/sh\necho hi\n"
    # publish itself stores the same bytes under the same name
    stratum0.run("transaction", REPO)
    (stratum0.union_dir(REPO) / "copied.txt").write_bytes(b"same content\n")
    stratum0.run("publish", REPO)
    assert stratum0.published_tree(REPO)["copied.txt"].hash == tree["a.txt"].hash


def test_objects_a_gc_removed_after_preparing_are_written_again(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gc between preparing and the transaction (last_gc moves) deletes a prepared
    object: it is written again before its marker goes in, and the file reads back."""
    (staging / "f.txt").write_bytes(b"content gc will sweep\n")
    real_prepare = Preparer.prepare
    swept: list[str] = []

    def prepare_then_gc(self: Preparer, *args: object, **kwargs: object) -> PrepareResult:
        result = real_prepare(self, *args, **kwargs)  # type: ignore[arg-type]
        if not swept:
            for prepared in result.prepared.values():
                for name in prepared.objects:
                    (stratum0.storage_dir(REPO) / name).unlink()
                    swept.append(name)
            status = stratum0.storage_dir(REPO) / ".cvmfs_status.json"
            status.write_text(json.dumps({"last_gc": "Thu Dec  3 00:00:00 UTC 2026"}))
        return result

    monkeypatch.setattr(Preparer, "prepare", prepare_then_gc)
    lane = lane_factory()
    _sync(lane)
    assert swept
    assert all((stratum0.storage_dir(REPO) / name).is_file() for name in swept)
    assert stratum0.read_file(REPO, "f.txt") == b"content gc will sweep\n"


def test_without_a_gc_prepared_objects_are_not_checked_again(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With last_gc unchanged no object is looked up once the transaction is open (on S3
    that would be a HEAD per object)."""
    (staging / "f.txt").write_bytes(b"x")
    lane = lane_factory()
    assert lane.preparer is not None
    calls: list[str] = []
    real_missing = Preparer.missing

    def counted_missing(self: Preparer, result: PrepareResult) -> list[str]:
        store = self.store
        real_exists = store.exists

        def exists(name: str) -> bool:
            calls.append(name)
            return real_exists(name)

        monkeypatch.setattr(store, "exists", exists)
        try:
            return real_missing(self, result)
        finally:
            monkeypatch.setattr(store, "exists", real_exists)

    monkeypatch.setattr(Preparer, "missing", counted_missing)
    _sync(lane)
    assert calls == []
    assert stratum0.read_file(REPO, "f.txt") == b"x"


def test_crash_while_preparing_leaves_no_unreferenced_object(
    lane_factory: LaneFactory,
    stratum0: FakeStratum0,
    staging: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 in the middle of writing a batch's objects (no transaction open yet): the
    journal names every object written, and recovery deletes those no revision uses."""
    before = _content_objects(stratum0)
    for i in range(40):
        (staging / f"f{i:02d}").write_bytes(f"file number {i}\n".encode())

    class Crash(BaseException):
        """Stands in for kill -9: no handler in the daemon catches it."""

    written: list[str] = []
    real_put = RecordingSink.put

    def put_then_crash(self: RecordingSink, name: str, data: bytes) -> None:
        real_put(self, name, data)
        written.append(name)
        if len(written) == 10:
            raise Crash

    monkeypatch.setattr(RecordingSink, "put", put_then_crash)
    lane = lane_factory()
    with pytest.raises(Crash):
        lane.sync_once(20)
    lane.lock.release()
    assert not stratum0.in_transaction(REPO)
    assert len(_content_objects(stratum0) - before) >= 10
    assert lane.state.unfinished_batch(REPO) is not None
    monkeypatch.undo()
    for i in range(20, 40):
        (staging / f"f{i:02d}").unlink()  # half of the inputs are gone after the restart
    restarted = lane_factory()
    _sync(restarted)
    assert _content_objects(stratum0) - before == _referenced(stratum0) - before
    assert stratum0.read_file(REPO, "f05") == b"file number 5\n"
