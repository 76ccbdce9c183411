"""``cvmfs-syncd sync --dry-run``: the plan of every repository, and nothing else.

The same observe and plan code as a real ``sync`` runs, against a snapshot of the state
database in a temporary directory: no transaction is opened, no object written, no
repository lock taken, nothing written under ``state_dir``, nothing deleted from a bucket.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cvmfs_syncd.batching import BatchPolicy, PendingChanges
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.errors import RepositoryConfigError, SourceError, StateError
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import OpKind
from cvmfs_syncd.planner import cut_to_caps, op_weight
from cvmfs_syncd.state import State


@dataclass
class TargetPlan:
    """What one source would do below its target."""

    source: str
    ops: dict[str, int] = field(default_factory=dict)
    bytes_to_prepare: int = 0
    bytes_to_copy: int = 0
    deferred: list[str] = field(default_factory=list)
    waiting_for_marker: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    held_reason: str = ""


@dataclass
class RepositoryPlan:
    """The plan of one repository: per source, and the revisions the caps cut it into."""

    repository: str
    sources: list[TargetPlan] = field(default_factory=list)
    revisions: list[int] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "repository": self.repository,
            "error": self.error or None,
            "revisions": self.revisions,
            "sources": [
                {
                    "source": t.source,
                    "ops": t.ops,
                    "bytes_to_prepare": t.bytes_to_prepare,
                    "bytes_to_copy": t.bytes_to_copy,
                    "deferred": t.deferred,
                    "waiting_for_marker": t.waiting_for_marker,
                    "refused": [{"path": p, "reason": r} for p, r in t.refused],
                    "held": t.held,
                    "held_reason": t.held_reason or None,
                }
                for t in self.sources
            ],
        }

    def text(self) -> str:
        """Return a human-readable summary."""
        if self.error:
            return f"{self.repository}: cannot plan: {self.error}"
        lines = [f"{self.repository}: {len(self.revisions)} revision(s) {self.revisions or ''}"]
        for t in self.sources:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(t.ops.items())) or "nothing to do"
            lines.append(f"  {t.source}: {counts}")
            if t.bytes_to_prepare or t.bytes_to_copy:
                lines.append(
                    f"    {t.bytes_to_prepare} bytes to prepare before the transaction, "
                    f"{t.bytes_to_copy} to copy into it"
                )
            for label, paths in (
                ("deferred (settling or being written)", t.deferred),
                ("waiting for the ready marker", t.waiting_for_marker),
                ("held by the deletion guard", t.held),
            ):
                if paths:
                    lines.append(f"    {len(paths)} {label}: {_sample(paths)}")
            if t.held_reason:
                lines.append(f"    held: {t.held_reason}")
            for path, reason in t.refused:
                lines.append(f"    refused {path}: {reason}")
        return "\n".join(lines)


def _sample(paths: list[str], most: int = 5) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f", … ({len(paths) - most} more)" if len(paths) > most else "")


def snapshot_state(state_dir: Path, into: Path) -> None:
    """Copy the state database (a consistent snapshot, read-only) into ``into``.

    With no write-ahead log beside it (no daemon has it open) the file is read as
    immutable, which creates nothing beside it; while a daemon runs, a read-only reader
    shares the daemon's ``-shm`` index to read a consistent snapshot.
    """
    source = state_dir / "state.sqlite"
    if not source.exists():
        return
    live = (state_dir / "state.sqlite-wal").exists()
    mode = "mode=ro" if live else "mode=ro&immutable=1"
    try:
        reader = sqlite3.connect(f"file:{quote(str(source))}?{mode}", uri=True)
        try:
            writer = sqlite3.connect(into / "state.sqlite")
            try:
                reader.backup(writer)
            finally:
                writer.close()
        finally:
            reader.close()
    except sqlite3.Error as exc:
        raise StateError(f"cannot read the state database {source}: {exc}") from exc


def dry_run(config: Config, repositories: Iterable[RepositoryConfig]) -> list[RepositoryPlan]:
    """Plan every repository as a ``sync`` would, without changing anything."""
    from cvmfs_syncd.service import build_lane, make_server

    plans: list[RepositoryPlan] = []
    with tempfile.TemporaryDirectory(prefix="cvmfs-syncd-dry-run-") as tmp:
        scratch = Path(tmp)
        snapshot_state(config.daemon.state_dir, scratch)
        scratch_config = replace(config, daemon=replace(config.daemon, state_dir=scratch))
        state = State(scratch)
        try:
            for repo in repositories:
                try:
                    lane = build_lane(
                        scratch_config, repo, state, Metrics(), make_server(scratch_config)
                    )
                except RepositoryConfigError as exc:
                    plans.append(RepositoryPlan(repo.name, error=str(exc)))
                    continue
                plans.append(plan_repository(lane, time.time()))
        finally:
            state.close()
    return plans


def plan_repository(lane: Any, now: float) -> RepositoryPlan:
    """Observe and plan every input of ``lane`` (a :class:`~cvmfs_syncd.lane.Lane`)."""
    repo: RepositoryConfig = lane.repo
    result = RepositoryPlan(repo.name)
    pending = PendingChanges(
        BatchPolicy(repo.quiet_seconds, repo.max_batch_seconds, 1 << 62, 1 << 62)
    )
    everything = []
    groups: list[list[str]] = []
    for source in lane.inputs:
        if hasattr(source, "read_only"):
            source.read_only = True
        target = TargetPlan(source.name)
        result.sources.append(target)
        try:
            hints = source.reconcile(now)
        except (OSError, SourceError) as exc:
            result.error = f"{source.name}: {exc}"
            continue
        for hint in hints:
            pending.add(hint)
        plan = source.plan(pending.take(), now)
        for op in plan.ops:
            target.ops[op.kind.value] = target.ops.get(op.kind.value, 0) + 1
            if op.kind is OpKind.GRAFT:
                target.bytes_to_prepare += op_weight(op)
            else:
                target.bytes_to_copy += op_weight(op)
        target.deferred = sorted(e.rel_path for e in plan.deferred)
        target.waiting_for_marker = sorted(e.rel_path for e in plan.waiting_for_marker)
        target.refused = [(a.rel_path, a.reason) for a in plan.set_aside]
        target.refused += [(path, reason) for reason, path in plan.skipped]
        target.held = sorted(o.repo_path for o in plan.guarded)
        target.held_reason = plan.guard_reason
        everything += plan.ops
        groups += plan.atomic_groups
    later = everything
    while later:
        taken, later = cut_to_caps(later, groups, repo.max_batch_files, repo.max_batch_bytes)
        groups = []
        result.revisions.append(len(taken))
    return result
