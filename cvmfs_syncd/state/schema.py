"""The schema of the state database: the tables of version 1, the forward-only migrations
to :data:`SCHEMA_VERSION`, and the version check that refuses a newer database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from cvmfs_syncd.errors import StateError

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
#: :func:`cvmfs_syncd.state.published.scan_key` is its twin in Python.
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


def migrate(db: sqlite3.Connection, path: Path) -> None:
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
