"""Several cvmfs-syncd publishers of one repository behind the repository gateway, end to end
against the fake gateway (tests/fake_cvmfs/gateway.py: one storage, one gateway, a host per
publisher), each publisher a ``cvmfs-syncd sync`` process of its own host."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_syncd.pipeline.confirm import BATCH_WORD
from tests.fake_cvmfs.gateway import FakeGateway
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import config_head, wait_for

REPO = "pub.gw.local"
SYNC_TIMEOUT = 120


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    with FakeGateway(tmp_path / "gw", REPO, publishers=("p1", "p2", "p3")) as served:
        yield served


class Publisher:
    """One publishing host's daemon: its staging directory, configuration and sync runs."""

    def __init__(self, tmp_path: Path, host: FakeStratum0, name: str, target: str) -> None:
        self.host = host
        self.dir = tmp_path / name
        self.staging = self.dir / "staging"
        self.staging.mkdir(parents=True)
        self.log = self.dir / "sync.log"
        self.config = self.dir / "cvmfs-syncd.toml"
        self.config.write_text(
            config_head(
                state_dir=self.dir / "state",
                server_command=host.server_command,
                config_dir=host.config_dir,
                repo=REPO,
                metrics_address="",
            )
            + f'\n  [[repository.staging]]\n  path = "{self.staging}"\n'
            f'  target = "{target}"\n  settle_seconds = 0.1\n'
        )

    def start_sync(self) -> subprocess.Popen[bytes]:
        """Start ``cvmfs-syncd sync`` (its output goes to ``self.log``)."""
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cvmfs_syncd",
                    "sync",
                    "-c",
                    str(self.config),
                    "--timeout",
                    str(SYNC_TIMEOUT),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def logged(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _finish(process: subprocess.Popen[bytes], publisher: Publisher) -> None:
    try:
        code = process.wait(timeout=SYNC_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert code == 0, publisher.logged()[-4000:]


def _history(gateway: FakeGateway) -> list[str]:
    """The descriptions of the repository's automatic tags (what each publish said)."""
    listing = gateway.publisher("p1").check_run("tag", "-lx", REPO).stdout
    return [line for line in listing.splitlines() if line.startswith("generic")]


def _live(gateway: FakeGateway) -> dict[str, str]:
    tree = gateway.publisher("p1").published_tree(REPO)
    return {path: entry.type for path, entry in tree.items()}


def test_two_publishers_of_disjoint_targets_both_publish_once(
    tmp_path: Path, gateway: FakeGateway
) -> None:
    """Two hosts at once, targets sw/a and sw/b that do not exist yet: every file goes live
    once, each batch has its own revision in the history, and no lease is left."""
    a = Publisher(tmp_path, gateway.publisher("p1"), "a", "/sw/a")
    b = Publisher(tmp_path, gateway.publisher("p2"), "b", "/sw/b")
    for i in range(5):
        (a.staging / f"a{i}.txt").write_text(f"a{i}")
        (b.staging / f"b{i}.txt").write_text(f"b{i}")
    runs = [(a.start_sync(), a), (b.start_sync(), b)]
    for process, publisher in runs:
        _finish(process, publisher)
    live = _live(gateway)
    for i in range(5):
        assert live[f"sw/a/a{i}.txt"] == "file"
        assert live[f"sw/b/b{i}.txt"] == "file"
    batches = [line for line in _history(gateway) if BATCH_WORD in line]
    assert len(batches) == 2, _history(gateway)
    assert gateway.leases() == {}


def test_a_publisher_of_a_containing_target_waits_for_the_inner_lease(
    tmp_path: Path, gateway: FakeGateway
) -> None:
    """While one host holds sw/a (a slow publish), a host whose target is sw waits for the
    lease (busy is not a failure) and publishes after it."""
    gateway.publisher("p1").check_run("transaction", REPO)
    (gateway.publisher("p1").union_dir(REPO) / "sw" / "a").mkdir(parents=True)
    gateway.publisher("p1").check_run("publish", REPO)
    inner = Publisher(tmp_path, gateway.publisher("p1"), "inner", "/sw/a")
    outer = Publisher(tmp_path, gateway.publisher("p3"), "outer", "/sw")
    (inner.staging / "inner.txt").write_text("inner")
    (outer.staging / "outer.txt").write_text("outer")
    gateway.publisher("p1").inject_fault("publish", "delay", at="before_sync", delay=3.0, times=1)
    first = inner.start_sync()
    wait_for(lambda: f"{REPO}/sw/a" in gateway.leases(), 60, "the inner lease")
    second = outer.start_sync()
    _finish(first, inner)
    _finish(second, outer)
    assert "gateway lease path busy; waiting" in outer.logged()
    live = _live(gateway)
    assert live["sw/a/inner.txt"] == "file"
    assert live["sw/outer.txt"] == "file"
    assert gateway.leases() == {}


def test_a_gateway_stopped_mid_run_loses_nothing(tmp_path: Path, gateway: FakeGateway) -> None:
    """Gateway down: opening fails fast and is retried; once it is back the batch goes live."""
    publisher = Publisher(tmp_path, gateway.publisher("p2"), "p", "/")
    (publisher.staging / "f.txt").write_text("f")
    gateway.stop()
    process = publisher.start_sync()
    try:
        wait_for(
            lambda: "opening a transaction failed" in publisher.logged(), 60, "a failed attempt"
        )
    finally:
        gateway.start()
    _finish(process, publisher)
    assert _live(gateway)["f.txt"] == "file"
    assert gateway.leases() == {}


def test_a_lease_that_expires_mid_batch_loses_nothing(tmp_path: Path, gateway: FakeGateway) -> None:
    """A publish slower than the lease fails with "invalid lease": the daemon aborts with
    -f, takes a fresh lease and publishes the batch once."""
    gateway.set_max_lease_time(2)
    publisher = Publisher(tmp_path, gateway.publisher("p2"), "p", "/")
    (publisher.staging / "f.txt").write_text("f")
    gateway.publisher("p2").inject_fault("publish", "delay", at="before_sync", delay=3.0, times=1)
    _finish(publisher.start_sync(), publisher)
    assert "gateway lease expired" in publisher.logged()
    assert _live(gateway)["f.txt"] == "file"
    batches = [line for line in _history(gateway) if BATCH_WORD in line]
    assert len(batches) == 1
    assert gateway.leases() == {}


def _journal_stages(publisher: Publisher) -> list[str]:
    """The journal's stages so far; [] while the database is being created or migrated."""
    path = publisher.dir / "state" / "state.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=5)
    try:
        return [str(row[0]) for row in db.execute("SELECT stage FROM batches ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # no table yet: the run is still setting its state up
    finally:
        db.close()


@pytest.mark.parametrize(
    ("command", "point", "stage"),
    [
        ("transaction", "after_lock", "opening"),
        ("publish", "after_upload", "publishing"),
        ("publish", "end", "publishing"),
    ],
)
def test_kill_9_of_a_publisher_leaves_no_lease_and_loses_nothing(
    tmp_path: Path, gateway: FakeGateway, command: str, point: str, stage: str
) -> None:
    """kill -9 while the tool hangs holding a lease; the next run stops the leftover command,
    recovers (abort -f drops the lease, or the publish is found in the history) and the file
    is live once."""
    host = gateway.publisher("p2")
    publisher = Publisher(tmp_path, host, "p", "/")
    (publisher.staging / "f.txt").write_text("f")
    host.inject_fault(command, "hang", at=point, times=1)
    first = publisher.start_sync()
    try:
        wait_for(
            lambda: _journal_stages(publisher)[-1:] == [stage] and host.faults() == [],
            60,
            f"the run to hang at {command}/{point}",
        )
    finally:
        first.kill()
        first.wait()
    _finish(publisher.start_sync(), publisher)
    assert _live(gateway)["f.txt"] == "file"
    assert len([line for line in _history(gateway) if BATCH_WORD in line]) == 1
    assert gateway.leases() == {}
    assert not host.orphans()
