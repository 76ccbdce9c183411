"""Fixtures shared by the suite, and the leak check every test passes through.

Leak check (autouse): a test fails when, ``LEAK_DEADLINE_SECONDS`` after it finished, it
still leaves behind threads, live child processes, inotify instances (a watcher not
stopped) or other open file descriptors that were not there when it started.

Fixtures:

- ``stratum0``: a fake stratum 0 (tests/fake_cvmfs) with one repository, made as the
  ``stratum0`` marker of the test or of its module says; fake commands it leaves running
  fail the test (and are killed).
- ``staging``: an empty staging directory, ``tmp_path/staging``.
- ``state``: a state journal in ``tmp_path/state``, closed afterwards.
- ``moto_endpoint``: a moto S3 server over real HTTP, one per module.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import wait_for

#: How long a finished test's threads, processes and descriptors get to go away.
LEAK_DEADLINE_SECONDS = 10.0

_INOTIFY = "anon_inode:inotify"


@dataclass(frozen=True)
class Holdings:
    """What this process holds at one moment: threads, live children, descriptors."""

    threads: frozenset[threading.Thread]
    children: frozenset[int]
    #: Open file descriptor -> what it refers to (the link in /proc/self/fd).
    descriptors: dict[int, str]

    @classmethod
    def now(cls) -> Holdings:
        """Look at the process as it is."""
        return cls(frozenset(threading.enumerate()), _children(), _descriptors())

    def inotify(self) -> int:
        """inotify instances (a watchdog observer not stopped keeps one)."""
        return sum(1 for target in self.descriptors.values() if target == _INOTIFY)

    def other_descriptors(self) -> int:
        """Open descriptors that are not inotify instances."""
        return len(self.descriptors) - self.inotify()


def _children() -> frozenset[int]:
    """Live (not zombie) child processes of this process."""
    own = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == own and fields[0] != "Z":
            found.add(int(entry))
    return frozenset(found)


def _descriptors() -> dict[int, str]:
    """This process's open file descriptors and their targets."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since the listing, like the listing's own descriptor
            continue
    return found


def leaks(before: Holdings) -> list[str]:
    """What the process holds now beyond ``before``, one line per kind (empty: nothing)."""
    now = Holdings.now()
    problems = []
    threads = sorted(t.name for t in now.threads - before.threads if t.is_alive())
    if threads:
        problems.append(f"threads still running: {threads}")
    children = sorted(now.children - before.children)
    if children:
        problems.append(f"child processes still running: {children}")
    inotify = now.inotify() - before.inotify()
    if inotify > 0:
        problems.append(f"{inotify} inotify instance(s) left open (a watcher not stopped)")
    extra = now.other_descriptors() - before.other_descriptors()
    if extra > 0:
        new = {
            fd: target
            for fd, target in now.descriptors.items()
            if target != _INOTIFY and before.descriptors.get(fd) != target
        }
        problems.append(f"{extra} file descriptor(s) left open, among {new}")
    return problems


def _released(before: Holdings) -> bool:
    """True when nothing is left beyond ``before``. While something is, the garbage
    collector runs first: objects in unreachable reference cycles close their descriptors
    only when collected."""
    if not leaks(before):
        return True
    gc.collect()
    return not leaks(before)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads, child processes, inotify instances or file
    descriptors behind once ``LEAK_DEADLINE_SECONDS`` have passed after it."""
    before = Holdings.now()
    yield
    try:
        wait_for(lambda: _released(before), LEAK_DEADLINE_SECONDS, "the test's leftovers to go")
    except AssertionError:
        problems = leaks(before)
    else:
        return
    pytest.fail("; ".join(problems))


@pytest.fixture
def stratum0(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeStratum0]:
    """A fake stratum 0 below ``tmp_path/root`` with the repository that the closest
    ``stratum0`` marker names: ``@pytest.mark.stratum0(repo, gc=False, config={})``
    (``gc``: made with ``mkfs -z``; ``config``: server.conf keys set after mkfs).

    Afterwards the fake's clock is the real one again; fake commands still running below
    its root ``LEAK_DEADLINE_SECONDS`` later are killed and fail the test.
    """
    marker = request.node.get_closest_marker("stratum0")
    if marker is None or len(marker.args) != 1 or set(marker.kwargs) - {"gc", "config"}:
        pytest.fail("the stratum0 fixture needs @pytest.mark.stratum0(repo, gc=..., config=...)")
    repo: str = marker.args[0]
    fake = FakeStratum0(tmp_path / "root")
    fake.mkfs(repo, gc=marker.kwargs.get("gc", False))
    for key, value in marker.kwargs.get("config", {}).items():
        fake.set_config(repo, key, value)
    yield fake
    fake.set_clock(None)
    try:
        wait_for(lambda: not fake.orphans(), LEAK_DEADLINE_SECONDS, "the fake's commands to end")
    except AssertionError:
        left = fake.orphans()
    else:
        return
    fake.kill_orphans()
    pytest.fail(f"fake cvmfs_server commands still running after the test: {left}")


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """An empty staging directory, ``tmp_path/staging``."""
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    """A fresh state journal in ``tmp_path/state``, closed afterwards."""
    journal = State(tmp_path / "state")
    yield journal
    journal.close()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    """A moto S3 server over real HTTP on a free port of 127.0.0.1 (host, port)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()
