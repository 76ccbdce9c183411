"""Records of maintenance runs: the last attempt, outcome and success of each task of each
repository, and since when the daemon runs it."""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_syncd.state.database import Database


@dataclass(frozen=True)
class MaintenanceRecord:
    """What is kept of one maintenance task of a repository (UNIX seconds; 0 = never)."""

    last_success: float = 0.0
    last_attempt: float = 0.0
    last_outcome: str = ""
    last_message: str = ""
    enabled_since: float = 0.0


class MaintenanceRuns(Database):
    """The maintenance part of ``State``: table ``maintenance_runs``."""

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
