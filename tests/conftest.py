"""Shared fixtures: leak checks, a fake stratum 0, daemon configurations."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    """A moto S3 server over real HTTP on a free port of 127.0.0.1 (host, port)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()
