"""The index of what is live: each repository path as last published, read one path, many
paths, a subtree, or a whole source in the order of a reconciliation scan; scan keys."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

from cvmfs_syncd.model import EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.state.database import Database, decode_path, encode_path

#: Paths per ``IN (…)`` query (SQLite allows 32 766 parameters; smaller keeps each fast).
_IN_CHUNK = 500


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


class PublishedIndex(Database):
    """The index part of ``State``: table ``published``."""

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

    def apply_ingested(self, repo: str, op: Op, paths: Iterable[str], revision: int | None) -> None:
        """Record what an ingest published under the base ``op.repo_path``: whatever the
        index had at and below it is replaced by a row for the base and one for each of
        ``paths`` (relative to the base), every one with the tarball (``op.source_path``,
        ``op.fingerprint``) as its input."""
        if op.fingerprint is None:
            raise ValueError("an ingest is recorded with its tarball's fingerprint")
        now = time.time()
        base = encode_path(op.repo_path)
        fingerprint = json.dumps(op.fingerprint.to_json())
        source_path = encode_path(op.source_path)
        rows = (
            (
                repo,
                encode_path(f"{op.repo_path}/{path}") if path else base,
                op.source,
                source_path,
                fingerprint,
                revision,
                now,
            )
            for path in ("", *paths)
        )
        with self._tx() as db:
            db.execute("DELETE FROM published WHERE repo = ? AND path = ?", (repo, base))
            db.execute(
                "DELETE FROM published WHERE repo = ? AND path >= ? AND path < ?",
                (repo, *_subtree_range(base)),
            )
            db.executemany(
                "INSERT OR REPLACE INTO published(repo, path, source, source_path,"
                " fingerprint, revision, published_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def count_under(self, repo: str, path: str, source: str) -> int:
        """Return how many live paths of ``source`` are at or below the repository ``path``."""
        key = encode_path(path)
        rows = self._query(
            "SELECT count(*) FROM published WHERE repo = ? AND source = ?"
            " AND (path = ? OR (path >= ? AND path < ?))",
            (repo, source, key, *_subtree_range(key)),
        )
        return int(str(rows[0][0]))

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

    def scan_pages(
        self, repo: str, source: str, under: str = "", *, page: int = 20000
    ) -> Iterator[bytes]:
        """Yield the rows :meth:`scan_published` reads, a page of compact records at a time.

        A page is one bytes value holding, for each row in bytewise order of
        ``(source_path, path)``, its ``source_path``, a NUL, its ``scan_key`` (``-`` where
        it is NULL, which equals no key of :func:`fsops.scan_staging_runs`) and a NUL: the
        records :func:`fsops.scan_staging_runs` makes of entries equal to their rows, so
        that a run of them is settled by comparing bytes. SQLite builds each page in one
        step (no Python object per row, and the GIL released meanwhile). Unlike
        :meth:`scan_published`, two rows with one ``source_path`` both come (adjacent,
        the one that method keeps last); they are never split between two pages.
        """
        key = encode_path(under)
        inner = (
            "SELECT source_path AS s, source_path || x'00' || coalesce(scan_key, '-') || x'00'"
            " AS r FROM published INDEXED BY published_scan"
            " WHERE repo = ? AND source = ? AND source_path >= ?"
        )
        bounds: tuple[object, ...] = ()
        if key:
            inner += " AND (path = ? OR (path >= ? AND path < ?))"
            bounds = (key, *_subtree_range(key))
        # The aggregate takes the rows of the ordered, limited subquery in its order.
        sql = (
            "SELECT CAST(group_concat(r, '') AS BLOB), count(*), max(s)"  # noqa: S608
            f" FROM ({inner} ORDER BY source_path, path LIMIT ?)"
        )
        start, limit = b"", page
        while True:
            row = self._query(sql, (repo, source, start, *bounds, limit))[0]
            records, count, last = cast(tuple[bytes | None, int, bytes | None], row)
            if count < limit:
                if records:
                    yield records
                return
            # More rows may have the page's last source_path: they all come with the next.
            records, last = cast(bytes, records), cast(bytes, last)
            cut = _start_of_last(records, last)
            if cut == 0:
                limit *= 2  # a page of one source_path: read more at once
                continue
            yield records[:cut]
            start, limit = last, page

    def scan_entry(
        self, repo: str, source: str, source_path: bytes, under: str = ""
    ) -> PublishedEntry | None:
        """Return the row :meth:`scan_published` yields for ``source_path``, if any, in full."""
        key = encode_path(under)
        sql = (
            "SELECT repo, path, source, source_path, fingerprint, revision, published_at"
            " FROM published WHERE repo = ? AND source = ? AND source_path = ?"
        )
        args: tuple[object, ...] = (repo, source, source_path)
        if key:
            sql += " AND (path = ? OR (path >= ? AND path < ?))"
            args += (key, *_subtree_range(key))
        rows = self._query(sql + " ORDER BY path DESC LIMIT 1", args)
        return _entry(rows[0]) if rows else None

    def count_published(self, repo: str, source: str) -> int:
        """Return how many live paths a source has in a repository."""
        rows = self._query(
            "SELECT count(*) FROM published WHERE repo = ? AND source = ?", (repo, source)
        )
        return int(str(rows[0][0]))


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
    """Return :func:`scan_key` of a staged regular file, from its stat fields (the key of
    its record in :func:`fsops.scan_staging_runs`)."""
    return f"f{mode} {size} {mtime_ns} {inode}"


def dir_scan_key(mode: int) -> str:
    """Return :func:`scan_key` of a staged directory, from its permission bits."""
    return f"d{mode}"


def _start_of_last(records: bytes, last: bytes) -> int:
    """Return where the records of ``last``, the last source path of a page of
    :meth:`State.scan_pages`, begin (parsed backwards: neither field holds a NUL)."""
    end = len(records)
    while end:
        key_start = records.rfind(b"\0", 0, end - 1) + 1
        path_start = records.rfind(b"\0", 0, key_start - 1) + 1
        if records[path_start : key_start - 1] != last:
            break
        end = path_start
    return end


def _subtree_range(key: bytes) -> tuple[bytes, bytes]:
    """Return [low, high) bounds of every path below ``key``: the index answers a range
    (paths are BLOBs compared bytewise, and "0" follows "/"), where a prefix test would
    scan the whole repository."""
    return key + b"/", key + b"0"


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
