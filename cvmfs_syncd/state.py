"""SQLite state in ``state_dir``: the batch journal, the index of what is live, S3 listings,
maintenance records.

One database (WAL mode) shared by the daemon's lanes and the one-shot CLI commands. Paths
are stored as bytes (``os.fsencode``) so that names which are not UTF-8 survive unchanged.
The journal row that says a transaction is being opened is committed *before* the command
runs: after a crash, an open transaction is ours exactly when the journal says so.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cvmfs_syncd.errors import StateError
from cvmfs_syncd.model import EntryType, Fingerprint, JournalStage, Op, OpKind

#: The schema every database of version 1 has (and a new database starts from); later
#: versions are reached by the migrations in ``_MIGRATIONS``.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS batches(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    base_revision INTEGER,
    revision INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS batches_open ON batches(repo, stage);
CREATE TABLE IF NOT EXISTS batch_ops(
    batch_id INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    repo_path BLOB NOT NULL,
    source TEXT NOT NULL,
    source_path BLOB NOT NULL,
    fingerprint TEXT,
    first_seen_at REAL NOT NULL DEFAULT 0,
    applied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(batch_id, seq)
);
CREATE TABLE IF NOT EXISTS published(
    repo TEXT NOT NULL,
    path BLOB NOT NULL,
    source TEXT NOT NULL,
    source_path BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    revision INTEGER,
    published_at REAL NOT NULL,
    PRIMARY KEY(repo, path)
);
CREATE INDEX IF NOT EXISTS published_by_source ON published(source, source_path);
CREATE TABLE IF NOT EXISTS created_objects(
    batch_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY(batch_id, name)
);
CREATE TABLE IF NOT EXISTS set_aside(
    repo TEXT NOT NULL,
    source TEXT NOT NULL,
    path BLOB NOT NULL,
    reason TEXT NOT NULL,
    fingerprint TEXT,
    at REAL NOT NULL,
    PRIMARY KEY(repo, source, path)
);
CREATE TABLE IF NOT EXISTS releases(repo TEXT PRIMARY KEY, requested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS s3_objects(
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    first_seen REAL NOT NULL,
    stable INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(source, key)
);
"""

_META = "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)"

#: ``published.scan_key`` in SQL: a compact text that is equal for two fingerprints only
#: if the reconciliation scan would find them equal, computed by SQLite from the stored
#: JSON whenever a row is written (so it can never be stale). NULL where no compact form
#: is defined (symlinks, anything unusual): the scan then compares the full fingerprints.
#: :func:`scan_key` is its twin in Python.
_SCAN_KEY_SQL = """CASE json_extract(fingerprint, '$.type')
    WHEN 'dir' THEN 'd' || json_extract(fingerprint, '$.mode')
    WHEN 'file' THEN CASE
        WHEN json_extract(fingerprint, '$.target') = ''
            AND json_extract(fingerprint, '$.etag') = ''
        THEN 'f' || json_extract(fingerprint, '$.mode')
            || ' ' || json_extract(fingerprint, '$.size')
            || ' ' || json_extract(fingerprint, '$.mtime_ns')
            || ' ' || json_extract(fingerprint, '$.inode')
        END
    END"""


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Add ``published.scan_key`` (stored, generated) and an index that covers a scan.

    SQLite adds only virtual generated columns in place, so the table is rebuilt; its
    rows are kept exactly.
    """
    db.execute(
        f"""CREATE TABLE published_new(
    repo TEXT NOT NULL,
    path BLOB NOT NULL,
    source TEXT NOT NULL,
    source_path BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    revision INTEGER,
    published_at REAL NOT NULL,
    scan_key TEXT GENERATED ALWAYS AS ({_SCAN_KEY_SQL}) STORED,
    PRIMARY KEY(repo, path)
)"""
    )
    db.execute(
        "INSERT INTO published_new(repo, path, source, source_path, fingerprint, revision,"
        " published_at) SELECT repo, path, source, source_path, fingerprint, revision,"
        " published_at FROM published ORDER BY repo, path"
    )
    db.execute("DROP TABLE published")
    db.execute("ALTER TABLE published_new RENAME TO published")
    db.execute("CREATE INDEX published_by_source ON published(source, source_path)")
    db.execute(
        "CREATE INDEX published_scan ON published(repo, source, source_path, path, scan_key)"
    )


def _migrate_add_maintenance_runs(db: sqlite3.Connection) -> None:
    """Add ``maintenance_runs`` and import the JSON records it replaces.

    Up to this version every repository's maintenance records were kept in
    ``<state_dir>/maintenance/<repo>.json``; they are copied once, so that last successes
    (and what the alerts compare them with) carry over. The files are left in place and
    no longer read. Safe to run twice: the table is created if missing, rows that exist
    are kept.
    """
    db.execute(
        """CREATE TABLE IF NOT EXISTS maintenance_runs(
    repo TEXT NOT NULL,
    task TEXT NOT NULL,
    last_success REAL NOT NULL DEFAULT 0,
    last_attempt REAL NOT NULL DEFAULT 0,
    last_outcome TEXT NOT NULL DEFAULT '',
    last_message TEXT NOT NULL DEFAULT '',
    enabled_since REAL NOT NULL DEFAULT 0,
    PRIMARY KEY(repo, task)
)"""
    )
    database = next(str(row[2]) for row in db.execute("PRAGMA database_list") if row[1] == "main")
    if not database:
        return  # a temporary database has no state directory
    for path in sorted((Path(database).parent / "maintenance").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = data.items() if isinstance(data, dict) else ()
        db.executemany(
            "INSERT OR IGNORE INTO maintenance_runs(repo, task, last_success, last_attempt,"
            " last_outcome, last_message, enabled_since) VALUES(?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    path.stem,
                    str(task),
                    _number(entry.get("last_success")),
                    _number(entry.get("last_attempt")),
                    str(entry.get("last_outcome") or ""),
                    str(entry.get("last_message") or ""),
                    _number(entry.get("enabled_since")),
                )
                for task, entry in entries
                if isinstance(entry, dict)
            ],
        )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


#: Forward migrations in order: ``_MIGRATIONS[n - 1]`` turns version ``n`` into ``n + 1``.
#: Append only; never change one that has been released.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_1_to_2,
    _migrate_add_maintenance_runs,
)

#: The schema version this code reads and writes (stored in ``meta`` under ``schema``).
SCHEMA_VERSION = 1 + len(_MIGRATIONS)


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def _stored_version(db: sqlite3.Connection, path: Path) -> int:
    """Return the database's schema version; raise StateError if this code cannot use it."""
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        return 1  # a new database, or one written before the version was recorded
    try:
        version = int(str(row[0]))
    except ValueError:
        version = 0
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state database {path} has schema version {version}, newer than the"
            f" {SCHEMA_VERSION} this cvmfs-syncd knows: it was written by a later"
            " release; run that release (or restore a backup) instead"
        )
    if version < 1:
        raise StateError(f"state database {path} has an invalid schema version {row[0]!r}")
    return version


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database to :data:`SCHEMA_VERSION` in one transaction, or refuse it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_META)
        version = _stored_version(db, path)
        if version == 1:
            for statement in _statements(_SCHEMA_1):
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
            if "pgid" not in columns:  # early version 1 databases lack them
                db.execute("ALTER TABLE batches ADD COLUMN pgid INTEGER")
                db.execute("ALTER TABLE batches ADD COLUMN boot_id TEXT")
        for migration in _MIGRATIONS[version - 1 :]:
            migration(db)
        db.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),)
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


#: Journal stages in order; a batch moves forward only.
STAGES = tuple(s for s in JournalStage if s not in (JournalStage.ABORTED, JournalStage.FAILED))
FINAL_STAGES = tuple(s for s in JournalStage if s.final)


#: Paths per ``IN (…)`` query (SQLite allows 32 766 parameters; smaller keeps each fast).
_IN_CHUNK = 500


def encode_path(path: str) -> bytes:
    """Return the bytes of a path string (surrogate escapes restored)."""
    return os.fsencode(path)


def decode_path(data: bytes | str) -> str:
    """Return the path string of stored bytes."""
    return data if isinstance(data, str) else os.fsdecode(data)


@dataclass(frozen=True)
class JournalBatch:
    """A batch as the journal records it."""

    id: int
    repo: str
    stage: JournalStage
    reason: str
    summary: str
    created_at: float
    base_revision: int | None
    revision: int | None
    attempts: int
    error: str
    pgid: int | None = None
    boot_id: str = ""


@dataclass(frozen=True)
class PublishedEntry:
    """One live path of a repository, as last published by the daemon."""

    repo: str
    path: str
    source: str
    source_path: str
    fingerprint: Fingerprint
    revision: int | None
    published_at: float


@dataclass(frozen=True)
class MaintenanceRecord:
    """What is kept of one maintenance task of a repository (UNIX seconds; 0 = never)."""

    last_success: float = 0.0
    last_attempt: float = 0.0
    last_outcome: str = ""
    last_message: str = ""
    enabled_since: float = 0.0


class State:
    """The state database. Thread-safe: one connection guarded by a lock."""

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
            _migrate(self._db, self.path)
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

    # -- journal -----------------------------------------------------------------------

    def create_batch(
        self,
        repo: str,
        ops: Iterable[Op],
        *,
        reason: str,
        summary: str,
        first_seen: dict[str, float] | None = None,
    ) -> int:
        """Record a planned batch and its ops; return the batch id."""
        now = time.time()
        first_seen = first_seen or {}
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO batches(repo, stage, reason, summary, created_at, updated_at)"
                " VALUES(?, 'planned', ?, ?, ?, ?)",
                (repo, reason, summary, now, now),
            )
            batch_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO batch_ops(batch_id, seq, kind, repo_path, source, source_path,"
                " fingerprint, first_seen_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        batch_id,
                        seq,
                        op.kind.value,
                        encode_path(op.repo_path),
                        op.source,
                        encode_path(op.source_path),
                        json.dumps(op.fingerprint.to_json()) if op.fingerprint else None,
                        first_seen.get(op.repo_path, now),
                    )
                    for seq, op in enumerate(ops)
                ],
            )
        return batch_id

    def set_stage(
        self,
        batch_id: int,
        stage: JournalStage | str,
        *,
        error: str | None = None,
        base_revision: int | None = None,
        revision: int | None = None,
        attempt: bool = False,
    ) -> None:
        """Move a batch to ``stage`` (committed before returning).

        A plain string is accepted if it is the value of a :class:`JournalStage`; anything
        else raises ValueError before the journal is touched.
        """
        sets = ["stage = ?", "updated_at = ?"]
        args: list[object] = [JournalStage(stage).value, time.time()]
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        if base_revision is not None:
            sets.append("base_revision = ?")
            args.append(base_revision)
        if revision is not None:
            sets.append("revision = ?")
            args.append(revision)
        if attempt:
            sets.append("attempts = attempts + 1")
        args.append(batch_id)
        with self._tx() as db:
            db.execute(f"UPDATE batches SET {', '.join(sets)} WHERE id = ?", args)  # noqa: S608 (fixed column names)

    def record_command(self, batch_id: int, pgid: int, boot_id: str) -> None:
        """Record the process group of the command a batch is running (committed at once)."""
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET pgid = ?, boot_id = ? WHERE id = ?", (pgid, boot_id, batch_id)
            )

    def mark_applied(self, batch_id: int, seqs: Iterable[int]) -> None:
        """Record which ops (by position) are in the transaction and move to ``applied``."""
        with self._tx() as db:
            db.executemany(
                "UPDATE batch_ops SET applied = 1 WHERE batch_id = ? AND seq = ?",
                [(batch_id, seq) for seq in seqs],
            )
            db.execute(
                "UPDATE batches SET stage = 'applied', updated_at = ? WHERE id = ?",
                (time.time(), batch_id),
            )

    def unfinished_batch(self, repo: str) -> JournalBatch | None:
        """Return the repository's batch that has not reached a final stage, if any."""
        rows = self._query(
            "SELECT id, repo, stage, reason, summary, created_at, base_revision, revision,"
            " attempts, error, pgid, boot_id FROM batches"
            " WHERE repo = ? AND stage NOT IN ('done', 'aborted', 'failed')"
            " ORDER BY id DESC LIMIT 1",
            (repo,),
        )
        return _batch(rows[0]) if rows else None

    def batch(self, batch_id: int) -> JournalBatch:
        """Return one batch; raise StateError if unknown."""
        rows = self._query(
            "SELECT id, repo, stage, reason, summary, created_at, base_revision, revision,"
            " attempts, error, pgid, boot_id FROM batches WHERE id = ?",
            (batch_id,),
        )
        if not rows:
            raise StateError(f"no batch {batch_id} in the journal")
        return _batch(rows[0])

    def last_publish(self, repo: str) -> tuple[float, int | None] | None:
        """Return (when, revision) of the repository's last published batch, or None."""
        rows = self._query(
            "SELECT updated_at, revision FROM batches WHERE repo = ? AND stage = 'done'"
            " ORDER BY id DESC LIMIT 1",
            (repo,),
        )
        if not rows:
            return None
        when, revision = rows[0]
        return float(str(when)), int(str(revision)) if revision is not None else None

    def recent_batches(self, repo: str, limit: int = 10) -> list[JournalBatch]:
        """Return the newest batches of a repository, newest first."""
        rows = self._query(
            "SELECT id, repo, stage, reason, summary, created_at, base_revision, revision,"
            " attempts, error, pgid, boot_id FROM batches WHERE repo = ? ORDER BY id DESC LIMIT ?",
            (repo, limit),
        )
        return [_batch(r) for r in rows]

    def batch_ops(self, batch_id: int, *, applied_only: bool = False) -> list[tuple[Op, float]]:
        """Return a batch's ops in order, each with the time its change was first seen."""
        sql = (
            "SELECT kind, repo_path, source, source_path, fingerprint, first_seen_at"
            " FROM batch_ops WHERE batch_id = ?"
        )
        if applied_only:
            sql += " AND applied = 1"
        rows = self._query(sql + " ORDER BY seq", (batch_id,))
        result = []
        for kind, repo_path, source, source_path, fp, first in rows:
            fingerprint = Fingerprint.from_json(json.loads(str(fp))) if fp else None
            op = Op(
                kind=OpKind(str(kind)),
                repo_path=decode_path(repo_path),  # type: ignore[arg-type]
                source=str(source),
                source_path=decode_path(source_path),  # type: ignore[arg-type]
                fingerprint=fingerprint,
            )
            result.append((op, float(first)))  # type: ignore[arg-type]
        return result

    # -- created objects (grafts) -----------------------------------------------------

    def record_created_objects(self, batch_id: int, names: Iterable[str]) -> None:
        """Record data objects a batch created (so an abandoned batch can delete them)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO created_objects(batch_id, name) VALUES(?, ?)",
                [(batch_id, n) for n in names],
            )

    def created_objects(self, batch_id: int) -> list[str]:
        """Return the data objects a batch created."""
        rows = self._query(
            "SELECT name FROM created_objects WHERE batch_id = ? ORDER BY name", (batch_id,)
        )
        return [str(r[0]) for r in rows]

    def forget_objects(self, batch_id: int, names: Iterable[str]) -> None:
        """Drop some names from a batch's record (journalled first, then found reused)."""
        with self._tx() as db:
            db.executemany(
                "DELETE FROM created_objects WHERE batch_id = ? AND name = ?",
                [(batch_id, n) for n in names],
            )

    def forget_created_objects(self, batch_id: int) -> None:
        """Drop the record of a batch's objects (published, or deleted)."""
        with self._tx() as db:
            db.execute("DELETE FROM created_objects WHERE batch_id = ?", (batch_id,))

    # -- the published index ----------------------------------------------------------

    def apply_published(self, repo: str, ops: Iterable[Op], revision: int | None) -> None:
        """Update the index after a publish: upserts recorded, deletes (and subtrees) removed."""
        now = time.time()
        with self._tx() as db:
            for op in ops:
                key = encode_path(op.repo_path)
                if op.kind is OpKind.DELETE:
                    db.execute("DELETE FROM published WHERE repo = ? AND path = ?", (repo, key))
                    db.execute(
                        "DELETE FROM published WHERE repo = ? AND path >= ? AND path < ?",
                        (repo, *_subtree_range(key)),
                    )
                elif op.fingerprint is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO published(repo, path, source, source_path,"
                        " fingerprint, revision, published_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (
                            repo,
                            key,
                            op.source,
                            encode_path(op.source_path),
                            json.dumps(op.fingerprint.to_json()),
                            revision,
                            now,
                        ),
                    )

    def published_entry(self, repo: str, path: str) -> PublishedEntry | None:
        """Return the index entry of one repository path, if it is live."""
        rows = self._query(
            "SELECT repo, path, source, source_path, fingerprint, revision, published_at"
            " FROM published WHERE repo = ? AND path = ?",
            (repo, encode_path(path)),
        )
        return _entry(rows[0]) if rows else None

    def published_entries(self, repo: str, paths: Iterable[str]) -> dict[str, PublishedEntry]:
        """Return the index entries of many paths at once (those that are live)."""
        found: dict[str, PublishedEntry] = {}
        keys = [encode_path(p) for p in paths]
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            columns = "repo, path, source, source_path, fingerprint, revision, published_at"
            where = f"repo = ? AND path IN ({marks})"  # only "?" placeholders
            sql = f"SELECT {columns} FROM published WHERE {where}"  # noqa: S608
            rows = self._query(sql, (repo, *chunk))
            for row in rows:
                entry = _entry(row)
                found[entry.path] = entry
        return found

    def set_aside_entries(
        self, repo: str, source: str
    ) -> dict[str, tuple[str, Fingerprint | None]]:
        """Return every input of a source that is set aside: path -> (reason, fingerprint)."""
        rows = self._query(
            "SELECT path, reason, fingerprint FROM set_aside WHERE repo = ? AND source = ?",
            (repo, source),
        )
        return {
            decode_path(bytes(path) if isinstance(path, bytes) else str(path)): (
                str(reason),
                Fingerprint.from_json(json.loads(str(fp))) if fp else None,
            )
            for path, reason, fp in rows
        }

    def published_under(
        self, repo: str, path: str, source: str | None = None
    ) -> list[PublishedEntry]:
        """Return the index entries at or below a repository path ("" = everything)."""
        key = encode_path(path)
        sql = (
            "SELECT repo, path, source, source_path, fingerprint, revision, published_at"
            " FROM published WHERE repo = ?"
        )
        args: list[object] = [repo]
        if key:
            sql += " AND (path = ? OR (path >= ? AND path < ?))"
            args += [key, *_subtree_range(key)]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        return [_entry(r) for r in self._query(sql + " ORDER BY path", tuple(args))]

    def scan_published(
        self, repo: str, source: str, under: str = "", *, page: int = 5000
    ) -> Iterator[tuple[bytes, bytes, str | None]]:
        """Yield ``(source_path, path, scan_key)`` of a source's live entries at or below the
        repository path ``under``, in bytewise order of ``source_path``.

        For a reconciliation scan: rows are read a page at a time (keyset pagination on
        the covering index ``published_scan``), so memory does not grow with the index, and
        the lock is held only while a page is read. Writes between pages are seen or not,
        as for any scan that races with a publish. Should two rows have the same
        ``source_path`` (the target was changed), only the one with the greatest ``path``
        is yielded, as :meth:`published_under` keyed by ``source_path`` would keep.
        ``scan_key`` is :func:`scan_key` of the row's fingerprint (None: compare the full
        fingerprint, :meth:`published_entry`).
        """
        key = encode_path(under)
        sql = (
            # INDEXED BY: the planner would otherwise take the (repo, path) key for the
            # target range and sort every row of the source for each page.
            "SELECT source_path, path, scan_key FROM published INDEXED BY published_scan"
            " WHERE repo = ? AND source = ? AND (source_path, path) > (?, ?)"
        )
        bounds: tuple[object, ...] = ()
        if key:
            sql += " AND (path = ? OR (path >= ? AND path < ?))"
            bounds = (key, *_subtree_range(key))
        sql += " ORDER BY source_path, path LIMIT ?"
        held: tuple[bytes, bytes, str | None] | None = None
        after: tuple[bytes, bytes] = (b"", b"")
        while True:
            # BLOBs come back as bytes, scan_key as str or None: rows are yielded as read.
            rows = cast(
                list[tuple[bytes, bytes, str | None]],
                self._query(sql, (repo, source, *after, *bounds, page)),
            )
            for row in rows:
                if held is not None and held[0] != row[0]:
                    yield held
                held = row
            if len(rows) < page:
                break
            after = rows[-1][0], rows[-1][1]
        if held is not None:
            yield held

    def count_published(self, repo: str, source: str) -> int:
        """Return how many live paths a source has in a repository."""
        rows = self._query(
            "SELECT count(*) FROM published WHERE repo = ? AND source = ?", (repo, source)
        )
        return int(str(rows[0][0]))

    # -- set-aside inputs ---------------------------------------------------------------

    def set_aside(
        self, repo: str, source: str, path: str, reason: str, fingerprint: Fingerprint | None
    ) -> None:
        """Record an input that was refused, with its reason."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO set_aside(repo, source, path, reason, fingerprint, at)"
                " VALUES(?, ?, ?, ?, ?, ?)",
                (
                    repo,
                    source,
                    encode_path(path),
                    reason,
                    json.dumps(fingerprint.to_json()) if fingerprint else None,
                    time.time(),
                ),
            )

    def set_aside_entry(
        self, repo: str, source: str, path: str
    ) -> tuple[str, Fingerprint | None] | None:
        """Return (reason, fingerprint) if the input is set aside."""
        rows = self._query(
            "SELECT reason, fingerprint FROM set_aside WHERE repo = ? AND source = ? AND path = ?",
            (repo, source, encode_path(path)),
        )
        if not rows:
            return None
        reason, fp = rows[0]
        return str(reason), Fingerprint.from_json(json.loads(str(fp))) if fp else None

    def clear_set_aside(self, repo: str, source: str, path: str) -> None:
        """Forget that an input was set aside."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM set_aside WHERE repo = ? AND source = ? AND path = ?",
                (repo, source, encode_path(path)),
            )

    def set_aside_list(self, repo: str) -> list[tuple[str, str, str]]:
        """Return (source, path, reason) of every set-aside input of a repository."""
        rows = self._query(
            "SELECT source, path, reason FROM set_aside WHERE repo = ? ORDER BY path", (repo,)
        )
        return [(str(s), decode_path(p), str(r)) for s, p, r in rows]  # type: ignore[arg-type]

    # -- operator releases of held batches ----------------------------------------------

    def request_release(self, repo: str) -> None:
        """Record an operator's confirmation that a held batch of ``repo`` may go ahead."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO releases(repo, requested_at) VALUES(?, ?)",
                (repo, time.time()),
            )

    def take_release(self, repo: str) -> bool:
        """Consume a pending release for ``repo``; return True if there was one."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM releases WHERE repo = ?", (repo,))
            return cur.rowcount > 0

    # -- maintenance records ------------------------------------------------------------

    def maintenance_records(self, repo: str) -> dict[str, MaintenanceRecord]:
        """Return the maintenance record of every task of ``repo`` that has one."""
        rows = self._query(
            "SELECT task, last_success, last_attempt, last_outcome, last_message, enabled_since"
            " FROM maintenance_runs WHERE repo = ?",
            (repo,),
        )
        return {
            str(task): MaintenanceRecord(
                float(str(success)),
                float(str(attempt)),
                str(outcome),
                str(message),
                float(str(since)),
            )
            for task, success, attempt, outcome, message, since in rows
        }

    def record_maintenance_run(
        self, repo: str, task: str, *, at: float, outcome: str, message: str, success: bool
    ) -> None:
        """Record a run of a task at ``at``; a successful one is also its last success."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO maintenance_runs(repo, task, last_attempt, last_outcome,"
                " last_message, last_success) VALUES(?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(repo, task) DO UPDATE SET last_attempt = excluded.last_attempt,"
                " last_outcome = excluded.last_outcome, last_message = excluded.last_message,"
                " last_success = CASE WHEN ? THEN excluded.last_success ELSE last_success END",
                (repo, task, at, outcome, message, at if success else 0.0, success),
            )

    def record_maintenance_enabled(self, repo: str, task: str, since: float) -> None:
        """Record since when the daemon runs a task (0: it does not)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO maintenance_runs(repo, task, enabled_since) VALUES(?, ?, ?)"
                " ON CONFLICT(repo, task) DO UPDATE SET enabled_since = excluded.enabled_since",
                (repo, task, since),
            )

    # -- S3 listing state --------------------------------------------------------------

    def s3_listing(self, source: str) -> dict[str, tuple[int, str, str, float, int]]:
        """Return key -> (size, etag, last_modified, first_seen, stable) for a source."""
        rows = self._query(
            "SELECT key, size, etag, last_modified, first_seen, stable FROM s3_objects"
            " WHERE source = ?",
            (source,),
        )
        return {
            str(k): (int(str(s)), str(e), str(m), float(str(f)), int(str(st)))
            for k, s, e, m, f, st in rows
        }

    def save_s3_listing(
        self, source: str, objects: dict[str, tuple[int, str, str, float, int]]
    ) -> None:
        """Replace the stored listing of a source."""
        with self._tx() as db:
            db.execute("DELETE FROM s3_objects WHERE source = ?", (source,))
            db.executemany(
                "INSERT INTO s3_objects(source, key, size, etag, last_modified, first_seen,"
                " stable) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [(source, k, *v) for k, v in objects.items()],
            )

    def update_s3_listing(
        self,
        source: str,
        changed: dict[str, tuple[int, str, str, float, int]],
        removed: Iterable[str],
    ) -> None:
        """Upsert the ``changed`` keys and drop the ``removed`` keys of a source's listing.

        One commit; writes only what differs, so a large prefix that barely changes costs
        little per poll (:meth:`save_s3_listing` rewrites every row).
        """
        with self._tx() as db:
            db.executemany(
                "DELETE FROM s3_objects WHERE source = ? AND key = ?",
                [(source, k) for k in removed],
            )
            db.executemany(
                "INSERT OR REPLACE INTO s3_objects(source, key, size, etag, last_modified,"
                " first_seen, stable) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [(source, k, *v) for k, v in changed.items()],
            )


def scan_key(fingerprint: Fingerprint) -> str | None:
    """Return the compact comparison key the index stores as ``published.scan_key``.

    Two fingerprints with equal keys are the same version for the reconciliation scan
    (directories: type and mode; files: mode, size, mtime and inode). None where there is
    no compact form (symlinks, or a fingerprint carrying a target or ETag).
    """
    if fingerprint.type is EntryType.DIRECTORY:
        return dir_scan_key(fingerprint.mode)
    if fingerprint.type is EntryType.FILE and not fingerprint.target and not fingerprint.etag:
        return file_scan_key(
            fingerprint.mode, fingerprint.size, fingerprint.mtime_ns, fingerprint.inode
        )
    return None


def file_scan_key(mode: int, size: int, mtime_ns: int, inode: int) -> str:
    """Return :func:`scan_key` of a staged regular file, from its stat fields."""
    return f"f{mode} {size} {mtime_ns} {inode}"


def dir_scan_key(mode: int) -> str:
    """Return :func:`scan_key` of a staged directory, from its permission bits."""
    return f"d{mode}"


def _subtree_range(key: bytes) -> tuple[bytes, bytes]:
    """Return [low, high) bounds of every path below ``key``: the index answers a range
    (paths are BLOBs compared bytewise, and "0" follows "/"), where a prefix test would
    scan the whole repository."""
    return key + b"/", key + b"0"


def _batch(row: tuple[object, ...]) -> JournalBatch:
    bid, repo, stage, reason, summary, created, base, rev, attempts, error, pgid, boot = row
    return JournalBatch(
        id=int(str(bid)),
        repo=str(repo),
        stage=JournalStage(str(stage)),
        reason=str(reason),
        summary=str(summary),
        created_at=float(str(created)),
        base_revision=int(str(base)) if base is not None else None,
        revision=int(str(rev)) if rev is not None else None,
        attempts=int(str(attempts)),
        error=str(error),
        pgid=int(str(pgid)) if pgid is not None else None,
        boot_id=str(boot or ""),
    )


def _entry(row: tuple[object, ...]) -> PublishedEntry:
    repo, path, source, source_path, fp, rev, at = row
    return PublishedEntry(
        repo=str(repo),
        path=decode_path(path),  # type: ignore[arg-type]
        source=str(source),
        source_path=decode_path(source_path),  # type: ignore[arg-type]
        fingerprint=Fingerprint.from_json(json.loads(str(fp))),
        revision=int(str(rev)) if rev is not None else None,
        published_at=float(str(at)),
    )
