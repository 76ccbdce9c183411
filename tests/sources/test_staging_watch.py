"""The staging source with real inotify, reconciliation, and fuzzed names."""

from __future__ import annotations

import os
import queue
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import StagingConfig
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, OpKind
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import wait_for, write_config


@pytest.fixture
def source(staging: Path, state: State) -> Iterator[tuple[StagingInput, queue.Queue[Dirty], Path]]:
    """A started staging source whose hints land in a queue."""
    hints: queue.Queue[Dirty] = queue.Queue()
    source = StagingInput("r", StagingConfig(path=staging, target="/sw"), state, Metrics())
    source.start(hints.put)
    yield source, hints, staging
    source.stop()


def _collect(hints: queue.Queue[Dirty]) -> list[Dirty]:
    found = []
    while True:
        try:
            found.append(hints.get_nowait())
        except queue.Empty:
            return found


def test_watch_events_become_hints(
    source: tuple[StagingInput, queue.Queue[Dirty], Path], tmp_path: Path
) -> None:
    """Writes, closes, renames, moves in from outside, new directories, deletes: all hinted."""
    _, hints, staging = source
    seen: list[Dirty] = []

    def has(rel: str, closed: bool) -> bool:
        seen.extend(_collect(hints))
        return any(d.rel_path == rel and d.closed == closed for d in seen)

    with (staging / "written").open("w") as handle:
        handle.write("x")
        handle.flush()
        wait_for(lambda: has("written", False), 10, "the modify event")
    wait_for(lambda: has("written", True), 10, "the close-after-write event")
    os.rename(staging / "written", staging / "renamed")
    wait_for(lambda: has("renamed", True), 10, "the rename's destination, complete")
    wait_for(lambda: has("written", True), 10, "the rename's source")
    outside = tmp_path / "outside"
    outside.write_text("y")
    os.rename(outside, staging / "moved")
    wait_for(lambda: has("moved", False), 10, "the move-in (reported as a creation)")
    (staging / "sub").mkdir()
    wait_for(
        lambda: any(d.rel_path == "sub" and d.rescan for d in seen) or has("sub", False),
        10,
        "the new directory",
    )
    seen.clear()
    (staging / "renamed").unlink()
    wait_for(lambda: has("renamed", True), 10, "the delete event")


def test_writer_check_decides_unclosed_files(staging: Path, state: State) -> None:
    """A file seen without its close is published once no process has it open for writing."""
    (staging / "f").write_text("data")
    os.utime(staging / "f", (1, 1))
    source = StagingInput("r", StagingConfig(path=staging), state, Metrics())
    entry = Pending(source.name, "f", 0.0, 99.0, writing=True)
    with (staging / "f").open("a"):
        held = source.plan([entry], 100.0)
    assert not held.ops
    assert [d.rel_path for d in held.deferred] == ["f"]
    free = source.plan([entry], 100.0)
    assert [op.repo_path for op in free.ops] == ["f"]


@pytest.mark.stratum0("r.org")
def test_reconciliation_counts_what_the_watcher_missed(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """A file that appeared without a watch event is found by the next scan and counted."""
    config = config_mod.load(
        write_config(
            tmp_path / "c.toml",
            state_dir=tmp_path / "state",
            server_command=stratum0.server_command,
            config_dir=stratum0.config_dir,
            repo="r.org",
            staging=staging,
        )
    )
    state = State(config.daemon.state_dir)
    metrics = Metrics()
    lane = build_lane(config, config.repositories[0], state, metrics, make_server(config))
    source = lane.inputs[0]
    lane.reconcile(1000.0)  # the start-up scan is not "missed"
    (staging / "missed").write_text("m")
    lane.reconcile(1400.0)
    value = metrics.registry.get_sample_value(
        "cvmfs_syncd_reconciliation_changes_total", {"repository": "r.org", "source": source.name}
    )
    assert value == 1
    assert (source.name, "missed") in lane.pending
    state.close()


_NAME_BYTES = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(_NAME_BYTES, min_size=1, max_size=5, unique=True))
def test_any_name_maps_inside_the_target_or_is_refused(names: list[bytes]) -> None:
    """Whatever the names, every planned op stays inside the target; none is lost silently."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staging = root / "staging"
        staging.mkdir()
        for name in names:
            with open(os.path.join(os.fsencode(staging), name), "wb") as handle:
                handle.write(b"data")
            os.utime(os.path.join(os.fsencode(staging), name), (1, 1))
        state = State(root / "state")
        try:
            config = StagingConfig(path=staging, target="/ci/drop", settle_seconds=0)
            source = StagingInput("r", config, state, Metrics())
            entries = [
                Pending(source.name, os.fsdecode(n), 0.0, 0.0, from_scan=True) for n in names
            ]
            plan = source.plan(entries, 100.0)
        finally:
            state.close()
        accounted = {op.source_path for op in plan.ops}
        accounted |= {a.rel_path for a in plan.set_aside}
        for op in plan.ops:
            assert op.kind is OpKind.COPY_FILE
            path = PurePosixPath("/" + op.repo_path)
            assert PurePosixPath("/ci/drop") in path.parents
            assert ".." not in path.parts
            assert op.repo_path == "ci/drop/" + op.source_path
        ignored = {os.fsdecode(n) for n in names} - accounted
        from cvmfs_syncd.config import DEFAULT_IGNORE
        from cvmfs_syncd.paths import is_ignored

        assert all(is_ignored(n, DEFAULT_IGNORE) for n in ignored)
