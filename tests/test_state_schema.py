"""Schema versions of the state database: forward migrations, refusing newer databases."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cvmfs_syncd.state
from cvmfs_syncd.errors import StateError
from cvmfs_syncd.model import EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.state import SCHEMA_VERSION, MaintenanceRecord, State, scan_key
from cvmfs_syncd.state.schema import _SCAN_KEY_SQL, _migrate_add_maintenance_runs

# The schema of release databases before versions were migrated (version 1), verbatim in
# what matters here: ``published`` without ``scan_key``, ``batches`` without pgid/boot_id.
_OLD_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE batches(
    id INTEGER PRIMARY KEY AUTOINCREMENT, repo TEXT NOT NULL, stage TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', summary TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, base_revision INTEGER,
    revision INTEGER, attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX batches_open ON batches(repo, stage);
CREATE TABLE published(
    repo TEXT NOT NULL, path BLOB NOT NULL, source TEXT NOT NULL, source_path BLOB NOT NULL,
    fingerprint TEXT NOT NULL, revision INTEGER, published_at REAL NOT NULL,
    PRIMARY KEY(repo, path)
);
CREATE INDEX published_by_source ON published(source, source_path);
"""

_FILE = Fingerprint(EntryType.FILE, 0o644, 3, 1_700_000_000_123_456_789, 42)
_DIR = Fingerprint(EntryType.DIRECTORY, 0o2755, 0, 5, 7)
_LINK = Fingerprint(EntryType.SYMLINK, 0o777, 4, 9, 8, target="../x")


def _old_database(state_dir: Path, *, version: str | None) -> None:
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / "state.sqlite")
    db.executescript(_OLD_SCHEMA)
    if version is not None:
        db.execute("INSERT INTO meta VALUES('schema', ?)", (version,))
    db.execute("INSERT INTO batches(repo, stage, created_at, updated_at) VALUES('r', 'open', 1, 1)")
    rows = [
        ("sw/a", "a", _FILE),
        ("sw/d", "d", _DIR),
        ("sw/d/l", "d/l", _LINK),
        (os.fsdecode(b"sw/caf\xe9"), os.fsdecode(b"caf\xe9"), _FILE),
    ]
    db.executemany(
        "INSERT INTO published VALUES('r', ?, 's', ?, ?, 3, 10.0)",
        [(os.fsencode(p), os.fsencode(s), json.dumps(f.to_json())) for p, s, f in rows],
    )
    db.commit()
    db.close()


def _stored_version(state_dir: Path) -> str:
    db = sqlite3.connect(state_dir / "state.sqlite")
    try:
        return str(db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("version", ["1", None])
def test_an_old_database_is_migrated_without_loss(tmp_path: Path, version: str | None) -> None:
    """Version 1 (recorded or not) becomes the current version, every row intact."""
    state_dir = tmp_path / "state"
    _old_database(state_dir, version=version)
    state = State(state_dir)
    assert _stored_version(state_dir) == str(SCHEMA_VERSION)
    batch = state.unfinished_batch("r")
    assert batch is not None
    assert (batch.stage, batch.pgid) == ("open", None)
    entries = {e.path: e for e in state.published_under("r", "")}
    assert entries["sw/a"].fingerprint == _FILE
    assert entries["sw/d"].fingerprint == _DIR
    assert entries["sw/d/l"].fingerprint == _LINK
    assert entries[os.fsdecode(b"sw/caf\xe9")].source_path == os.fsdecode(b"caf\xe9")
    assert (entries["sw/a"].revision, entries["sw/a"].published_at) == (3, 10.0)
    keys = {s: k for s, _, k in state.scan_published("r", "s")}
    assert keys == {
        b"a": scan_key(_FILE),
        b"caf\xe9": scan_key(_FILE),
        b"d": scan_key(_DIR),
        b"d/l": None,
    }
    state.close()
    State(state_dir).close()  # opening a current database again changes nothing
    assert _stored_version(state_dir) == str(SCHEMA_VERSION)


def test_a_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    """A database from a later release is not opened, and not changed."""
    state_dir = tmp_path / "state"
    _old_database(state_dir, version=str(SCHEMA_VERSION + 1))
    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        State(state_dir)
    assert _stored_version(state_dir) == str(SCHEMA_VERSION + 1)
    db = sqlite3.connect(state_dir / "state.sqlite")
    columns = {row[1] for row in db.execute("PRAGMA table_info(published)")}
    db.close()
    assert "scan_key" not in columns


def test_an_unreadable_version_is_refused(tmp_path: Path) -> None:
    """A version that is not a positive number is an error, not version 1."""
    state_dir = tmp_path / "state"
    _old_database(state_dir, version="two")
    with pytest.raises(StateError, match="invalid schema version 'two'"):
        State(state_dir)


def test_a_new_database_starts_at_the_current_version(tmp_path: Path) -> None:
    """A fresh database records the version this code writes."""
    State(tmp_path / "state").close()
    assert _stored_version(tmp_path / "state") == str(SCHEMA_VERSION)


def test_the_package_description_names_the_current_schema(tmp_path: Path) -> None:
    """The state package's docstring names the schema version this code writes and every
    table a new database has, so that a migration cannot leave it behind."""
    State(tmp_path / "state").close()
    db = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    try:
        tables = {
            str(row[0])
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
    finally:
        db.close()
    description = cvmfs_syncd.state.__doc__ or ""
    assert f"Schema version {SCHEMA_VERSION} " in description
    assert {t for t in tables if f"``{t}``" not in description} == set()


def test_maintenance_records_of_the_json_files_are_imported_once(tmp_path: Path) -> None:
    """The JSON records of earlier releases become rows at the upgrade, last successes and
    all; afterwards the database alone is read and written, and importing again (the
    migration run twice) changes nothing."""
    state_dir = tmp_path / "state"
    _old_database(state_dir, version="1")
    records = state_dir / "maintenance"
    records.mkdir()
    (records / "a.example.org.json").write_text(
        json.dumps(
            {
                "gc": {
                    "last_attempt": 1700000100.5,
                    "last_outcome": "ok",
                    "last_message": "garbage collected",
                    "last_success": 1700000100.5,
                    "enabled_since": 1690000000.0,
                },
                "check": {"last_attempt": 1700000200, "last_outcome": "check_failed"},
                "resign": {"enabled_since": 1690000000.0},
                "broken": "not a record",
            }
        )
    )
    (records / "b.example.org.json").write_text("{not json")
    state = State(state_dir)
    imported = state.maintenance_records("a.example.org")
    assert imported == {
        "gc": MaintenanceRecord(1700000100.5, 1700000100.5, "ok", "garbage collected", 1.69e9),
        "check": MaintenanceRecord(0.0, 1700000200.0, "check_failed", "", 0.0),
        "resign": MaintenanceRecord(enabled_since=1.69e9),
    }
    assert state.maintenance_records("b.example.org") == {}

    state.record_maintenance_run(
        "a.example.org", "gc", at=1700000300.0, outcome="error", message="x", success=False
    )
    state.record_maintenance_enabled("a.example.org", "check", 1700000250.0)
    state.record_maintenance_run(
        "a.example.org", "check", at=1700000400.0, outcome="ok", message="fine", success=True
    )
    after = state.maintenance_records("a.example.org")
    assert after["gc"] == MaintenanceRecord(1700000100.5, 1700000300.0, "error", "x", 1.69e9)
    assert after["check"] == MaintenanceRecord(
        1700000400.0, 1700000400.0, "ok", "fine", 1.70000025e9
    )
    state.close()

    state = State(state_dir)
    assert state.maintenance_records("a.example.org") == after
    state.close()
    db = sqlite3.connect(state_dir / "state.sqlite", isolation_level=None)
    _migrate_add_maintenance_runs(db)
    db.close()
    state = State(state_dir)
    assert state.maintenance_records("a.example.org") == after
    state.close()


_fingerprints = st.builds(
    Fingerprint,
    type=st.sampled_from(list(EntryType)),
    mode=st.integers(0, 0o7777),
    size=st.integers(0, 2**63 - 1),
    mtime_ns=st.integers(-(2**63), 2**63 - 1),
    inode=st.integers(0, 2**64 - 1),
    target=st.sampled_from(["", "x", os.fsdecode(b"\xff/y")]),
    etag=st.sampled_from(["", '"abc"']),
)


@given(fp=_fingerprints)
def test_the_stored_scan_key_is_the_python_one(fp: Fingerprint) -> None:
    """SQLite computes published.scan_key from the JSON exactly as scan_key() does, or
    leaves it NULL (inodes beyond a signed 64-bit integer)."""
    db = sqlite3.connect(":memory:")

    stored = db.execute(
        f"SELECT {_SCAN_KEY_SQL} FROM (SELECT ? AS fingerprint)",  # noqa: S608 (constant SQL)
        (json.dumps(fp.to_json()),),
    ).fetchone()[0]
    db.close()
    if fp.inode >= 2**63 and scan_key(fp) is not None and fp.type is EntryType.FILE:
        assert stored != scan_key(fp)  # never equal by accident: a full comparison follows
    else:
        assert stored == scan_key(fp)


def test_scan_published_pages_in_byte_order_and_keeps_one_row_per_source_path(
    tmp_path: Path,
) -> None:
    """Rows come in memcmp order of source_path across pages, only below the target and
    only of the source; of two rows with one source_path the greatest path wins."""
    state = State(tmp_path)
    names = ["a", "a.b", "a/b", "a-b", "a0", os.fsdecode(b"\xff"), "b/c/d", "\u00e9"]
    ops = [Op(OpKind.COPY_FILE, f"t/{n}", "s", n, _FILE) for n in names]
    ops.append(Op(OpKind.COPY_FILE, "t/other", "s2", "other", _FILE))
    ops.append(Op(OpKind.COPY_FILE, "elsewhere", "s", "elsewhere", _FILE))
    ops.append(Op(OpKind.COPY_FILE, "t/old/a", "s", "a", _DIR))  # the same source path
    state.apply_published("r", ops, 1)
    state.apply_published("r2", [Op(OpKind.COPY_FILE, "t/zz", "s", "zz", _FILE)], 1)
    for page in (1, 2, 3, 5000):
        rows = list(state.scan_published("r", "s", "t", page=page))
        expected = sorted(os.fsencode(n) for n in names)
        assert [r[0] for r in rows] == expected
        assert rows[0] == (b"a", b"t/old/a", scan_key(_DIR))
    assert b"elsewhere" in [r[0] for r in state.scan_published("r", "s")]


def _rows_of_pages(pages: list[bytes]) -> list[tuple[bytes, bytes]]:
    rows: list[tuple[bytes, bytes]] = []
    for page in pages:
        assert page.endswith(b"\0")
        fields = page.split(b"\0")[:-1]
        rows += list(zip(fields[0::2], fields[1::2], strict=True))
    return rows


def test_scan_pages_hold_the_rows_of_scan_published_and_never_split_a_source_path(
    tmp_path: Path,
) -> None:
    """Pages of (source_path, key) records in byte order, every row (both rows of one
    source_path, the one scan_published keeps last) and no source_path in two pages."""
    state = State(tmp_path)
    names = ["a", "a.b", "a/b", "a-b", "a0", os.fsdecode(b"\xff"), "b/c/d", "\u00e9", "l"]
    ops = [Op(OpKind.COPY_FILE, f"t/{n}", "s", n, _LINK if n == "l" else _FILE) for n in names]
    ops.append(Op(OpKind.COPY_FILE, "t/other", "s2", "other", _FILE))
    ops.append(Op(OpKind.COPY_FILE, "elsewhere", "s", "elsewhere", _FILE))
    ops.append(Op(OpKind.COPY_FILE, "t/old/a", "s", "a", _DIR))  # the same source path
    ops.append(Op(OpKind.COPY_FILE, "t/old/b", "s", "a0", _DIR))  # at a page's end
    state.apply_published("r", ops, 1)
    state.apply_published("r2", [Op(OpKind.COPY_FILE, "t/zz", "s", "zz", _FILE)], 1)
    kept = [(s, k or "-") for s, _, k in state.scan_published("r", "s", "t")]
    for page in (1, 2, 3, 4, 5000):
        pages = list(state.scan_pages("r", "s", "t", page=page))
        rows = _rows_of_pages(pages)
        firsts = [_rows_of_pages([p])[0][0] for p in pages]
        lasts = [_rows_of_pages([p])[-1][0] for p in pages]
        assert all(last < first for last, first in zip(lasts, firsts[1:], strict=False))
        assert [s for s, _ in rows] == sorted(s for s, _ in rows)
        assert sorted({s for s, _ in rows}) == [s for s, _ in kept]
        last_of_each = {s: k.decode() for s, k in rows}  # the later row of a source_path wins
        assert list(last_of_each.items()) == kept
        assert [k for s, k in rows if s == b"a"] == [
            str(scan_key(f)).encode() for f in (_FILE, _DIR)
        ]
    assert b"elsewhere" in [s for s, _ in _rows_of_pages(list(state.scan_pages("r", "s")))]
    assert list(state.scan_pages("r", "none")) == []
    state.close()


def test_scan_entry_is_the_row_scan_published_keeps(tmp_path: Path) -> None:
    """Of two rows with one source_path below the target, the greatest path, in full."""
    state = State(tmp_path)
    ops = [
        Op(OpKind.COPY_FILE, "t/a", "s", "a", _FILE),
        Op(OpKind.COPY_FILE, "t/old/a", "s", "a", _DIR),
        Op(OpKind.COPY_FILE, "u/a", "s", "a", _LINK),
    ]
    state.apply_published("r", ops, 1)
    entry = state.scan_entry("r", "s", b"a", "t")
    assert entry is not None
    assert (entry.path, entry.fingerprint) == ("t/old/a", _DIR)
    everywhere = state.scan_entry("r", "s", b"a")
    assert everywhere is not None
    assert everywhere.path == "u/a"
    assert state.scan_entry("r", "s", b"b", "t") is None
    state.close()
