"""Reading the index of what is live for a reconciliation scan: pages of compact records
(``path NUL key NUL``) read ahead in a helper thread, consumed a run or a row at a time."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import cast

_DONE = object()


def read_ahead(pages: Iterator[bytes], depth: int = 2) -> Generator[bytes, None, None]:
    """Yield ``pages``, read by a helper thread up to ``depth`` pages ahead.

    SQLite builds a page in one step with the GIL released, so the index is read while
    the tree is walked. An error reading comes out here; when the consumer stops early
    (an error walking the tree), the helper stops after the page it is reading.
    """
    pipe: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in pages:
                if stop.is_set():
                    break
                pipe.put(page)
        except BaseException as exc:  # handed to the consumer
            pipe.put(exc)
        finally:
            pipe.put(_DONE)

    helper = threading.Thread(target=read, name="scan-index", daemon=True)
    helper.start()
    done = False
    try:
        while (item := pipe.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield cast(bytes, item)
        done = True
    finally:
        if not done:
            stop.set()
            while pipe.get() is not _DONE:
                pass
        helper.join()


class IndexRecords:
    """The index side of :meth:`StagingInput.reconcile`: the records of
    :meth:`State.scan_pages`, consumed a run or a row at a time."""

    def __init__(self, pages: Iterator[bytes]) -> None:
        self._pages = pages
        self._buffer = b""
        self._pos = 0

    def settles(self, records: bytes) -> bool:
        """Consume the next records and return True if they are exactly ``records`` and no
        further row has the last one's source path (the rows of one source path, such as
        every path an ingest wrote for its tarball, are consumed together or not at all,
        as :meth:`pop` does)."""
        key_start = records.rfind(b"\0", 0, len(records) - 1) + 1
        last = records[records.rfind(b"\0", 0, key_start - 1) + 1 : key_start]  # path + NUL
        needed = len(records) + len(last)
        if len(self._buffer) - self._pos < needed:
            self._read(needed)
        if not self._buffer.startswith(records, self._pos):
            return False
        if self._buffer.startswith(last, self._pos + len(records)):
            return False  # more rows of that source path: merged a row at a time
        self._pos += len(records)
        return True

    def head(self) -> bytes | None:
        """Return the source path of the next row (None at the end)."""
        if self._pos == len(self._buffer) and not self._read(1):
            return None
        return self._buffer[self._pos : self._buffer.index(b"\0", self._pos)]

    def pop(self, path: bytes) -> bytes:
        """Consume the rows of the next source path, ``path`` (from :meth:`head`); return
        the key of the last one (the row :meth:`State.scan_published` keeps)."""
        while True:
            key_start = self._pos + len(path) + 1
            end = self._buffer.index(b"\0", key_start)
            key = self._buffer[key_start:end]
            self._pos = end + 1
            if self.head() != path:
                return key

    def rest(self) -> Iterator[bytes]:
        """Consume and yield the source paths of every row left."""
        while (path := self.head()) is not None:
            self.pop(path)
            yield path

    def _read(self, size: int) -> bool:
        """Read pages until ``size`` bytes are buffered; return False if none was left."""
        parts = [self._buffer[self._pos :]]
        have = len(parts[0])
        while have < size:
            page = next(self._pages, None)
            if page is None:
                break
            parts.append(page)
            have += len(page)
        if len(parts) == 1:
            return False
        self._buffer, self._pos = b"".join(parts), 0
        return True
