"""The stored listing of each S3 source: key, size, ETag, LastModified, when first seen,
and whether it is stable."""

from __future__ import annotations

from collections.abc import Iterable

from cvmfs_syncd.model import ListedObject
from cvmfs_syncd.state.database import Database


class S3Listing(Database):
    """The S3 listing part of ``State``: table ``s3_objects``."""

    def s3_listing(self, source: str) -> dict[str, ListedObject]:
        """Return the stored listing of a source, by key."""
        rows = self._query(
            "SELECT key, size, etag, last_modified, first_seen, stable FROM s3_objects"
            " WHERE source = ?",
            (source,),
        )
        return {
            str(k): ListedObject(
                str(k), int(str(s)), str(e), str(m), float(str(f)), bool(int(str(st)))
            )
            for k, s, e, m, f, st in rows
        }

    def save_s3_listing(self, source: str, objects: Iterable[ListedObject]) -> None:
        """Replace the stored listing of a source."""
        with self._tx() as db:
            db.execute("DELETE FROM s3_objects WHERE source = ?", (source,))
            db.executemany(
                "INSERT INTO s3_objects(source, key, size, etag, last_modified, first_seen,"
                " stable) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [_s3_row(source, o) for o in objects],
            )

    def update_s3_listing(
        self, source: str, changed: Iterable[ListedObject], removed: Iterable[str]
    ) -> None:
        """Upsert the ``changed`` objects and drop the ``removed`` keys of a source's listing.

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
                [_s3_row(source, o) for o in changed],
            )


def _s3_row(source: str, obj: ListedObject) -> tuple[str, str, int, str, str, float, int]:
    """The ``s3_objects`` row of one listed object."""
    return (source, obj.key, obj.size, obj.etag, obj.last_modified, obj.first_seen, int(obj.stable))
