"""place: what happens to one batch's ops around its transaction.

Before it opens, the GRAFT ops are prepared (:mod:`cvmfs_syncd.pipeline.prepare`); an
input that changed goes back to pending, a refused one is set aside, one whose objects
this host cannot store is copied instead. Inside it, deletions, directories, symlinks and
copies are applied through the sources, then the placeholder and graft marker of every
prepared file are written (:class:`cvmfs_syncd.fsops.UnionWriter`) — no file content is
copied except for inputs that could not be prepared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from cvmfs_syncd import fsops
from cvmfs_syncd.config import Config, RepositoryConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.errors import RepositoryConfigError, UnsafeName
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import JournalStage as Stage
from cvmfs_syncd.model import Op, OpKind
from cvmfs_syncd.pipeline.prepare import Content, Preparer, PrepareResult, marker_path
from cvmfs_syncd.planner import Applied, ApplyOutcome, Input
from cvmfs_syncd.state import State


class WorkControl(Protocol):
    """What a batch's work needs from its lane."""

    repo: RepositoryConfig
    config: Config
    layout: RepositoryLayout
    state: State
    metrics: Metrics
    log: Any
    preparer: Preparer | None

    def set_status(self, **changes: Any) -> None:
        """Update the lane's status."""

    def heartbeat(self) -> None:
        """Record progress."""

    def source_of(self, op: Op) -> Input | None:
        """The input an op came from (None if it was removed by a reload)."""


class BatchWork:
    """Prepare and place one batch's ops; ``requeue`` sends ops back to pending."""

    def __init__(self, lane: WorkControl, requeue: Callable[[Sequence[Op]], None]) -> None:
        self.lane = lane
        self.requeue = requeue
        #: inputs that failed with an error (not a change): the lane backs off on repeats
        self.errors = 0
        self.timings: dict[str, float] = {}

    def prepare(self, batch_id: int, ops: list[Op]) -> tuple[list[Op], PrepareResult]:
        """Write the objects of the batch's GRAFT ops, before the transaction opens.

        Returns the ops still in the batch (an op whose input changed goes back to
        pending, a refused one is set aside, one this host cannot store is copied) and
        what was prepared.
        """
        grafts = [op for op in ops if op.kind is OpKind.GRAFT]
        if not grafts or self.lane.preparer is None:
            result = PrepareResult()
            return [self._as_copy(op) for op in ops], result
        self.lane.state.set_stage(batch_id, Stage.PREPARING)
        self.lane.set_status(state="preparing objects")
        phase = time.monotonic()
        result = self.lane.preparer.prepare(
            batch_id, grafts, self._open_content, heartbeat=self.lane.heartbeat
        )
        self.timings["prepare"] = time.monotonic() - phase
        self.errors += result.errors
        dropped = {op.repo_path for op, _ in result.failed}
        for op, outcome in result.failed:
            self._not_applied(op, outcome)
        fallback = {op.repo_path for op in result.fallback}
        kept: list[Op] = []
        for op in ops:
            if op.repo_path in dropped:
                continue
            if op.repo_path in fallback:
                kept.append(self._as_copy(op))
                continue
            if op.kind is OpKind.GRAFT:
                source = self.lane.source_of(op)
                if source is None or not source.still_current(op):
                    # Changed after it was read: the newer version goes in a later batch.
                    self.requeue([op])
                    continue
            kept.append(op)
        self.lane.log.info(
            "objects prepared",
            batch=batch_id,
            files=len(result.prepared),
            created=len(result.created),
            reused=len(result.reused),
            bytes=result.bytes,
            seconds=round(result.seconds, 3),
        )
        return kept, result

    @staticmethod
    def _as_copy(op: Op) -> Op:
        return replace(op, kind=OpKind.COPY_FILE) if op.kind is OpKind.GRAFT else op

    def _open_content(self, op: Op) -> Content | Applied:
        source = self.lane.source_of(op)
        if source is None:
            return Applied(ApplyOutcome.VANISHED)
        return source.open_content(op)

    def place(self, batch_id: int, ops: Sequence[Op], prepared: PrepareResult) -> list[Op]:
        """Inside the transaction: deletions, directories, links and copies, then the
        placeholder and graft marker of every prepared file. No file content is copied
        here except for inputs that could not be prepared."""
        self.lane.set_status(state="placing changes")
        grafts = [op for op in ops if op.kind is OpKind.GRAFT]
        if grafts and self.lane.preparer is not None:
            grafts = self._objects_still_there(batch_id, grafts, prepared)
        applied = self._apply([op for op in ops if op.kind is not OpKind.GRAFT])
        placed: list[Op] = []
        try:
            with fsops.UnionWriter(self.lane.layout.union_dir) as writer:
                for op in grafts:
                    item = prepared.prepared[op.repo_path]
                    writer.write(marker_path(op.repo_path), item.graft.encode(), mode=0o644)
                    writer.write(op.repo_path, b"", mode=item.mode, mtime_ns=item.mtime_ns)
                    placed.append(op)
        except (OSError, UnsafeName) as exc:
            self.lane.log.warning("placing grafts failed", error=str(exc))
            self.errors += 1
            self.requeue([op for op in grafts if op not in placed])
        return applied + placed

    def _objects_still_there(
        self, batch_id: int, grafts: list[Op], prepared: PrepareResult
    ) -> list[Op]:
        """Write again what a gc removed since preparing; drop what cannot be."""
        assert self.lane.preparer is not None  # noqa: S101 (checked by the caller)
        if self.lane.preparer.settings_changed(self._current_layout()):
            self.lane.log.warning("server.conf changed since the objects were prepared; re-queued")
            self.requeue(grafts)
            return []
        gone = set(self.lane.preparer.missing(prepared))
        if not gone:
            return grafts
        again = self.lane.preparer.prepare(
            batch_id, [op for op in grafts if op.repo_path in gone], self._open_content
        )
        prepared.prepared.update(again.prepared)
        kept = [op for op in grafts if op.repo_path not in gone or op.repo_path in again.prepared]
        self.requeue([op for op in grafts if op not in kept])
        return kept

    def _current_layout(self) -> RepositoryLayout:
        try:
            return load_layout(self.lane.config.cvmfs.config_dir, self.lane.repo.name)
        except RepositoryConfigError:
            return self.lane.layout

    def _apply(self, ops: Sequence[Op]) -> list[Op]:
        applied: list[Op] = []
        union = self.lane.layout.union_dir
        for op in ops:
            self.lane.heartbeat()
            source = self.lane.source_of(op)
            if source is None:
                continue
            try:
                result = source.apply(op, union)
            except OSError as exc:
                self.lane.log.warning("applying a change failed", path=op.repo_path, error=str(exc))
                self.errors += 1
                self.requeue([op])
                continue
            except UnsafeName as exc:
                # An unsafe name that slipped past planning: refuse it, keep the batch.
                self._not_applied(op, Applied(ApplyOutcome.REFUSED, f"unsafe: {exc}"))
                continue
            except Exception:
                # One input must not take the lane (and its open transaction) down.
                self.lane.log.exception("applying a change failed unexpectedly", path=op.repo_path)
                self.errors += 1
                self.requeue([op])
                continue
            if result.outcome is ApplyOutcome.APPLIED:
                applied.append(op)
            else:
                self._not_applied(op, result)
        return applied

    def _not_applied(self, op: Op, result: Applied) -> None:
        """Set aside a refused input; re-queue one that changed or vanished."""
        if result.outcome is ApplyOutcome.REFUSED:
            self.lane.state.set_aside(
                self.lane.repo.name, op.source, op.source_path, result.reason, op.fingerprint
            )
            self.lane.metrics.skipped.labels(self.lane.repo.name, op.source, "refused").inc()
            self.lane.log.warning("input refused", path=op.source_path, reason=result.reason)
            return
        self.lane.log.info(
            "input changed while being read; re-queued",
            path=op.source_path,
            outcome=result.outcome.value,
            reason=result.reason or None,
        )
        self.requeue([op])
