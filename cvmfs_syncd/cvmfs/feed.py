"""Feeding a command's stdin while it runs: the byte stream ``ingest`` reads.

:class:`Feed` wraps the command's stdin, counts the bytes written and notes when anything
last happened (input written or output read), which is what an inactivity timeout
measures.  :func:`feed_from` runs the caller's writer; when the writer fails, the command
gets a tar header that promises more data than ever comes before its stdin closes, so that
it reads a truncated archive and fails cleanly instead of publishing what it got so far
(a tar cut at a member boundary can look complete).  :mod:`cvmfs_syncd.cvmfs.server`
starts the command.
"""

from __future__ import annotations

import contextlib
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from cvmfs_syncd.cvmfs.outcomes import CommandResult

POLL_SECONDS = 0.05
"""How often a fed command's exit and idleness are checked."""
_CHUNK = 1 << 16


def _truncation_header() -> bytes:
    """A tar header for a member whose data never comes: what a failed feed ends with."""
    info = tarfile.TarInfo(".cvmfs-syncd-feed-failed")
    info.size = 1 << 20
    header: bytes = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header


_TRUNCATION = _truncation_header()


class Feed:
    """The stdin of a fed command: counts what is written and when anything last happened."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self.fed = 0
        self.last_activity = time.monotonic()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``; :class:`BrokenPipeError` when the command stopped reading."""
        self._pipe.write(data)
        self.fed += len(data)
        self.touch()
        return len(data)

    def touch(self) -> None:
        """Note progress (data written, or output read)."""
        self.last_activity = time.monotonic()

    def close(self, *, truncate: bool) -> None:
        """Close the pipe; first, with ``truncate``, send :data:`_TRUNCATION`."""
        with contextlib.suppress(OSError, ValueError):
            if truncate:
                self._pipe.write(_TRUNCATION)
        with contextlib.suppress(OSError, ValueError):
            self._pipe.close()


@dataclass(frozen=True, slots=True)
class FedResult:
    """What a fed command did, how many bytes it was given, and why feeding stopped early."""

    result: CommandResult
    fed_bytes: int
    feed_error: BaseException | None = None


def drain(pipe: IO[bytes], sink: list[bytes], feed: Feed) -> None:
    """Read ``pipe`` to its end into ``sink``, noting progress on ``feed``."""
    read = getattr(pipe, "read1", pipe.read)
    while chunk := read(_CHUNK):
        sink.append(chunk)
        feed.touch()


def feed_from(feed: Callable[[Feed], object], stream: Feed, failure: list[BaseException]) -> None:
    """Run ``feed`` on ``stream`` and close it; append what ``feed`` raised to ``failure``."""
    truncate = False
    try:
        feed(stream)
    except BrokenPipeError:
        pass
    except BaseException as exc:  # handed to the caller with the result
        failure.append(exc)
        truncate = True
    finally:
        stream.close(truncate=truncate)
