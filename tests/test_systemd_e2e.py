"""End-to-end: the daemon process speaks the notify protocol to a real datagram socket."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import REPO, DaemonUnderTest
from tests.support import wait_for

pytestmark = pytest.mark.slow


class NotifyListener:
    """Collects the datagrams the daemon sends to $NOTIFY_SOCKET, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def with_key(self, key: str, since: float = 0.0) -> list[dict[str, str]]:
        """Messages carrying ``key`` that arrived after ``since``."""
        with self._lock:
            return [m for at, m in self.messages if key in m and at >= since]

    def pings(self, since: float, until: float) -> int:
        """How many WATCHDOG=1 arrived in [since, until)."""
        with self._lock:
            return sum(1 for at, m in self.messages if "WATCHDOG" in m and since <= at < until)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    """A listening notify socket."""
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _start(tmp_path: Path, notify: NotifyListener, **config: str) -> DaemonUnderTest:
    daemon = DaemonUnderTest(tmp_path, **config)
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    return daemon


def test_ready_status_and_watchdog_pings(tmp_path: Path, notify: NotifyListener) -> None:
    """READY comes with a STATUS; the watchdog is pinged while the daemon is healthy."""
    daemon = _start(tmp_path, notify)
    try:
        ready = wait_for(lambda: notify.with_key("READY"), 30, "READY=1")
        assert "changes pending" in ready[0]["STATUS"]
        start = time.monotonic()
        wait_for(lambda: notify.pings(start, time.monotonic()) >= 3, 30, "three pings")
        (daemon.staging / "a").write_text("a")
        daemon.wait_converged()
        wait_for(
            lambda: any("last publish" in m["STATUS"] for m in notify.with_key("STATUS")),
            30,
            "a STATUS naming the last publish",
        )
    finally:
        daemon.stop()


def test_reload_with_valid_and_broken_config(tmp_path: Path, notify: NotifyListener) -> None:
    """SIGHUP: RELOADING (with MONOTONIC_USEC) then READY; a broken file keeps the old config."""
    daemon = _start(tmp_path, notify)
    try:
        wait_for(lambda: notify.with_key("READY"), 30, "READY=1")
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace("quiet_seconds = 0.2", "quiet_seconds = 0.3"))
        before = time.monotonic()
        daemon.signal(signal.SIGHUP)
        reloading = wait_for(lambda: notify.with_key("RELOADING", before), 30, "RELOADING=1")
        assert int(reloading[0]["MONOTONIC_USEC"]) > 0
        wait_for(lambda: notify.with_key("READY", before), 30, "READY after reload")
        wait_for(lambda: "configuration reloaded" in daemon.log(), 30, "the reload")
        daemon.config_path.write_text("[daemon\nbroken")
        before = time.monotonic()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: notify.with_key("READY", before), 30, "READY after a refused reload")
        assert "reload refused" in daemon.log()
        (daemon.staging / "still").write_text("publishing")
        daemon.wait_converged()
    finally:
        daemon.stop()


def test_stalled_lane_stops_the_pings(tmp_path: Path, notify: NotifyListener) -> None:
    """A publish that hangs past stall_seconds stops the watchdog pings."""
    daemon = _start(tmp_path, notify, daemon_extra="stall_seconds = 2")
    try:
        wait_for(lambda: notify.with_key("READY"), 30, "READY=1")
        daemon.stratum0.inject_fault("publish", "hang", times=1)
        (daemon.staging / "a").write_text("a")
        wait_for(lambda: "unhealthy; watchdog pings stop" in daemon.log(), 30, "the stall")
        quiet_from = time.monotonic()
        wait_for(lambda: time.monotonic() - quiet_from > 3, 10, "a three-second window")
        assert notify.pings(quiet_from, time.monotonic()) == 0
    finally:
        daemon.kill()


def test_sigterm_sends_stopping(tmp_path: Path, notify: NotifyListener) -> None:
    """SIGTERM: STOPPING=1 is sent and the daemon exits 0."""
    daemon = _start(tmp_path, notify)
    wait_for(lambda: notify.with_key("READY"), 30, "READY=1")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert notify.with_key("STOPPING")
    assert REPO in daemon.log()


def test_reload_during_a_slow_publish_keeps_pinging(tmp_path: Path, notify: NotifyListener) -> None:
    """A reload that replaces a busy lane does not block the main loop (pings go on)."""
    daemon = _start(tmp_path, notify)
    try:
        wait_for(lambda: notify.with_key("READY"), 30, "READY=1")
        daemon.stratum0.inject_fault("publish", "delay", at="before_sync", delay=4.0, times=1)
        (daemon.staging / "a").write_text("a")
        wait_for(lambda: daemon.stratum0.state(REPO)["is_publishing_lock"], 30, "the slow publish")
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace("quiet_seconds = 0.2", "quiet_seconds = 0.3"))
        sent = time.monotonic()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: notify.with_key("READY", sent), 30, "READY after the reload")
        wait_for(
            lambda: "repository lane stopped by reload" in daemon.log(), 30, "the old lane to exit"
        )
        stopped = time.monotonic()
        assert stopped - sent > 2  # the old lane finished its publish first
        assert notify.pings(sent, stopped) >= 2
        (daemon.staging / "b").write_text("b")
        daemon.wait_converged()
    finally:
        daemon.stop()
