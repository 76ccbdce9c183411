"""What the staging source hands on: bulk index look-ups for one planning round, and a
staged file opened for preparing."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cvmfs_syncd import fsops
from cvmfs_syncd.model import Fingerprint
from cvmfs_syncd.state import PublishedEntry


@dataclass(frozen=True, slots=True)
class Lookup:
    """Index and set-aside records of one planning round, fetched in bulk."""

    live: dict[str, PublishedEntry]
    aside: dict[str, tuple[str, Fingerprint | None]]


class StagedContent:
    """A staged file opened for preparing: its bytes and whether it changed meanwhile."""

    def __init__(self, fd: int, expected: Fingerprint) -> None:
        self._file = os.fdopen(fd, "rb", closefd=True)
        self._expected = expected
        self.mode = expected.mode & 0o777
        self.mtime_ns = expected.mtime_ns

    def read(self, size: int = -1, /) -> bytes:
        return self._file.read(size)

    def unchanged(self, size: int) -> bool:
        return size == self._expected.size and fsops.still_matches(
            self._file.fileno(), self._expected
        )

    def close(self) -> None:
        self._file.close()
