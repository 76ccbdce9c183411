"""Tests for cvmfs_syncd.systemd against a real unix datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_syncd.systemd import Notifier

RECEIVE_TIMEOUT_SECONDS = 5.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """Yield a bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes; keep the test portable
        pytest.skip(f"temporary path too long for a unix socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """Yield a datagram socket bound in the abstract namespace, and its '@' address."""
    name = f"cvmfs-syncd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    """Return the next datagram on ``sock`` as a dict of its KEY=value lines."""
    data = sock.recv(4096).decode("utf-8")
    return dict(line.split("=", 1) for line in data.split("\n"))


def assert_nothing_queued(sock: socket.socket) -> None:
    """Fail if a datagram is waiting (unix datagrams are queued when sendto returns)."""
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_ready_sends_ready_and_status(receiver: tuple[socket.socket, str]) -> None:
    """ready() sends READY=1 together with the status line in a single datagram."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        assert notifier.ready("watching 2 sources")
    assert receive(sock) == {"READY": "1", "STATUS": "watching 2 sources"}


def test_ready_without_status_sends_only_ready(receiver: tuple[socket.socket, str]) -> None:
    """ready() with no status sends exactly READY=1."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_status_is_flattened_to_one_line(receiver: tuple[socket.socket, str]) -> None:
    """status() replaces line breaks so the text cannot inject further assignments."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.status("publishing\nREADY=1")
    assert sock.recv(4096) == b"STATUS=publishing READY=1"


def test_reloading_carries_monotonic_timestamp(receiver: tuple[socket.socket, str]) -> None:
    """reloading() sends RELOADING=1 and MONOTONIC_USEC read from CLOCK_MONOTONIC."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = receive(sock)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_stopping_and_extend_timeout(receiver: tuple[socket.socket, str]) -> None:
    """stopping() sends STOPPING=1 and extend_timeout() sends the extension in µs."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.stopping()
        assert notifier.extend_timeout(90)
    assert sock.recv(4096) == b"STOPPING=1"
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"


def test_watchdog_pings_and_interval_is_half_the_timeout(
    receiver: tuple[socket.socket, str],
) -> None:
    """With WATCHDOG_USEC for this pid, the interval is half the timeout and pings go out."""
    sock, address = receiver
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier.from_environment(env) as notifier:
        assert notifier.watchdog_interval() == 30.0
        assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_watchdog_without_pid_applies_to_this_process(
    receiver: tuple[socket.socket, str],
) -> None:
    """A WATCHDOG_USEC without WATCHDOG_PID enables the watchdog for this process."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}) as n:
        assert n.watchdog_interval() == 1.5
        assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_ignored(receiver: tuple[socket.socket, str]) -> None:
    """A watchdog addressed to another pid is disabled: no interval and no ping is sent."""
    sock, address = receiver
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}
    with Notifier.from_environment(env, pid=4242) as notifier:
        assert notifier.watchdog_interval() is None
        assert not notifier.watchdog()
    assert_nothing_queued(sock)


@pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
def test_unusable_watchdog_usec_disables_watchdog(
    receiver: tuple[socket.socket, str], value: str
) -> None:
    """An empty, zero, negative or non-numeric WATCHDOG_USEC means no watchdog."""
    sock, address = receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": value}) as n:
        assert n.watchdog_interval() is None
        assert not n.watchdog()
    assert_nothing_queued(sock)


def test_abstract_namespace_socket(abstract_receiver: tuple[socket.socket, str]) -> None:
    """An '@' NOTIFY_SOCKET is reached in the abstract namespace."""
    sock, address = abstract_receiver
    with Notifier.from_environment({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.ready("up")
    assert receive(sock)["READY"] == "1"


def test_without_notify_socket_everything_is_a_noop() -> None:
    """Outside systemd every call does nothing and reports that nothing was sent."""
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "60000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    notifier.close()


def test_relative_notify_socket_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A NOTIFY_SOCKET that is neither absolute nor abstract disables the notifier."""
    with caplog.at_level(logging.WARNING, logger="cvmfs_syncd.systemd"):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled
    assert "relative/notify" in caplog.text


def test_unset_removes_variables_from_environment(receiver: tuple[socket.socket, str]) -> None:
    """unset=True strips the variables so child processes do not inherit the socket."""
    sock, address = receiver
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin"}
    with Notifier.from_environment(env, unset=True) as notifier:
        assert env == {"PATH": "/usr/bin"}
        assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_missing_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sending to a socket that does not exist returns False and logs one warning."""
    address = str(tmp_path / "gone")
    with (
        caplog.at_level(logging.WARNING, logger="cvmfs_syncd.systemd"),
        Notifier.from_environment({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000"}) as n,
    ):
        assert not n.ready()
        assert not n.watchdog()
        assert not n.status("still failing")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert address in warnings[0].getMessage()


def test_delivery_recovers_after_receiver_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed send, a receiver that appears later gets the next message."""
    path = tmp_path / "notify"
    with Notifier.from_environment({"NOTIFY_SOCKET": str(path)}) as notifier:
        assert not notifier.status("nobody listens")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
            sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
            with caplog.at_level(logging.INFO, logger="cvmfs_syncd.systemd"):
                assert notifier.status("listening now")
            assert sock.recv(4096) == b"STATUS=listening now"
        finally:
            sock.close()
    assert "works again" in caplog.text
