"""Shared fixtures: leak checks, a fake stratum 0, daemon configurations."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest


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
