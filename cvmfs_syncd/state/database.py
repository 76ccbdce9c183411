"""The one connection to the state database that every part of ``State`` shares: opening
(and migrating) it, the lock, the transaction helper, and how paths are stored in it."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cvmfs_syncd.errors import StateError
from cvmfs_syncd.state.schema import migrate


def encode_path(path: str) -> bytes:
    """Return the bytes of a path string (surrogate escapes restored)."""
    return os.fsencode(path)


def decode_path(data: bytes | str) -> str:
    """Return the path string of stored bytes."""
    return data if isinstance(data, str) else os.fsdecode(data)


class Database:
    """The state database's connection, guarded by a lock (thread-safe), and the
    transaction helper; the base of every part of ``State``."""

    def __init__(self, state_dir: Path) -> None:
        """Open (creating if needed) ``state_dir/state.sqlite``; raise StateError.

        An older database is migrated to :data:`SCHEMA_VERSION` in one transaction; a
        newer one (written by a later release) is refused.
        """
        self.path = state_dir / "state.sqlite"
        self._lock = threading.RLock()
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db, self.path)
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        except StateError:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())
