"""faults.md F7-F9: commands a killed daemon left running are found by their tag and
stopped before recovery does anything; recovery never runs beside a live one."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.cvmfs.procs import COMMAND_TAG_VARIABLE, stop_tagged, tagged_processes
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Op, OpKind
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import wait_for, write_config

REPO = "orphans.example.org"


def _spawn(tag: str | None, script: str) -> subprocess.Popen[bytes]:
    """A process in a session of its own (as publish's children can be, F8)."""
    env = dict(os.environ)
    if tag is not None:
        env[COMMAND_TAG_VARIABLE] = tag
    return subprocess.Popen(["/bin/sh", "-c", script], env=env, start_new_session=True)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever is left is killed and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_every_tagged_process_is_stopped_and_nothing_else(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """A tagged process in its own session, and one ignoring SIGTERM, are stopped; an
    untagged one and one with another tag are left alone."""
    tagged = _spawn("d1:7", "exec sleep 60")
    stubborn = _spawn("d1:7", "trap '' TERM; while :; do sleep 0.1; done")
    other = _spawn("d1:8", "exec sleep 60")
    plain = _spawn(None, "exec sleep 60")
    processes += [tagged, stubborn, other, plain]
    wait_for(lambda: len(tagged_processes("d1:7")) >= 2, 10, "the tagged processes")
    assert stop_tagged("d1:7", term_seconds=0.5, kill_seconds=5) == []
    assert tagged.wait(timeout=10) == -signal.SIGTERM
    assert stubborn.wait(timeout=10) == -signal.SIGKILL
    assert other.poll() is None and plain.poll() is None
    assert tagged_processes("d1:7") == []


@pytest.mark.stratum0(REPO)
def test_recovery_stops_a_leftover_publish_before_acting(
    tmp_path: Path,
    stratum0: FakeStratum0,
    staging: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """A batch left at `publishing` with its publish still running (orphaned, own session):
    recovery stops it first, then publishes the open transaction itself."""
    (staging / "a").write_text("a")
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
    try:
        lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
        # What a killed daemon left: the journal at `publishing`, the transaction open with
        # the op in it, and its publish command still alive.
        stratum0.run("transaction", REPO)
        (stratum0.union_dir(REPO) / "a").write_text("a")
        fp = None
        batch = state.create_batch(
            REPO, [Op(OpKind.COPY_FILE, "a", lane.inputs[0].name, "a", fp)], reason="t", summary="t"
        )
        state.set_stage(batch, "opening", base_revision=stratum0.revision(REPO))
        state.mark_applied(batch, [0])
        state.set_stage(batch, "publishing")
        leftover = _spawn(lane.command_tag(batch), "exec sleep 60")
        processes.append(leftover)
        wait_for(lambda: tagged_processes(lane.command_tag(batch)), 10, "the leftover")
        lane.recovery.recover()
        assert leftover.wait(timeout=10) == -signal.SIGTERM
        assert not stratum0.in_transaction(REPO)
        assert state.recent_batches(REPO)[0].stage == "done"
        assert lane.status().held == ""
    finally:
        state.close()
