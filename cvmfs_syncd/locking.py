"""Host-wide per-repository locks (``flock``) shared by the daemon and the one-shot CLI."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from cvmfs_syncd.errors import StateError


class RepositoryLock:
    """An exclusive ``flock`` on ``<state_dir>/locks/<repo>.lock``.

    Taken for each write operation (a batch's transaction → publish, a gc) and released
    between operations, so that a second daemon or a CLI command waits instead of colliding.
    """

    def __init__(self, state_dir: Path, repo: str, *, name: str = "") -> None:
        self.path = state_dir / "locks" / f"{repo}{'.' + name if name else ''}.lock"
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (forever if None).

        Return False if the time ran out or ``stop`` was set first. Raise StateError if
        the lock file cannot be opened.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise StateError(f"cannot open lock file {self.path}: {exc}") from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                if stop is not None and stop.wait(delay):
                    os.close(fd)
                    return False
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def release(self) -> None:
        """Release the lock (no-op if not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
