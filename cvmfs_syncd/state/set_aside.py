"""What is kept from publishing until something changes: inputs set aside (until they
change) and operator releases of batches the guard held (mass deletion, a missing staging
path)."""

from __future__ import annotations

import json
import time

from cvmfs_syncd.model import Fingerprint
from cvmfs_syncd.state.database import Database, decode_path, encode_path


class SetAside(Database):
    """The set-aside part of ``State``: tables ``set_aside`` and ``releases``."""

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
