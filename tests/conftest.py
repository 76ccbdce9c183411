"""Shared fixtures: leak checks (threads, child processes, inotify instances) and an S3
endpoint."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running after it finished."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10.0
    leaked: list[threading.Thread] = []
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        leaked[0].join(timeout=0.1)
    pytest.fail(f"threads leaked by the test: {[t.name for t in leaked]}")


#: How often the leak checks look again, until their deadline.
_POLL_SECONDS = 0.05


def _children() -> set[int]:
    """Live (not zombie) child processes of this test process."""
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
    return found


def _inotify_instances() -> int:
    """inotify instances this process holds (a watchdog observer not stopped keeps one)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                count += 1
        except OSError:
            continue
    return count


@pytest.fixture(autouse=True)
def no_leaked_processes_or_watches() -> Iterator[None]:
    """Fail a test that leaves child processes running or inotify instances open."""
    children = _children()
    watches = _inotify_instances()
    yield
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        left = _children() - children
        extra = _inotify_instances() - watches
        if not left and extra <= 0:
            return
        time.sleep(_POLL_SECONDS)
    problems = []
    if left:
        problems.append(f"child processes still running: {sorted(left)}")
    if extra > 0:
        problems.append(f"{extra} inotify instance(s) left open (a watcher not stopped)")
    pytest.fail("; ".join(problems))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    """A moto S3 server over real HTTP on a free port of 127.0.0.1 (host, port)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()
