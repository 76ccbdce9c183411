"""The batch journal: batches, their ops and stages, the command a batch runs, and the data
objects it created (so that an abandoned batch can delete them)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cvmfs_syncd.errors import StateError
from cvmfs_syncd.model import Fingerprint, JournalStage, Op, OpKind
from cvmfs_syncd.state.database import Database, decode_path, encode_path

#: Journal stages in order; a batch moves forward only.
STAGES = tuple(s for s in JournalStage if s not in (JournalStage.ABORTED, JournalStage.FAILED))
FINAL_STAGES = tuple(s for s in JournalStage if s.final)


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


class Journal(Database):
    """The journal part of ``State``: tables ``batches``, ``batch_ops``, ``created_objects``."""

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
