"""What a lane needs from an input source, and pure planning policy shared by sources.

A source turns pending paths into ops (:class:`Plan`); the lane runs them. The decisions
here — cutting ops to the batch caps, the mass-deletion guard — are pure functions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.model import Dirty, HoldReason, Op, OpKind, SetAside

if TYPE_CHECKING:
    from cvmfs_syncd.pipeline.prepare import Content


class ApplyOutcome(enum.Enum):
    """What happened when the lane applied one op inside the transaction."""

    APPLIED = "applied"
    CHANGED = "changed"  # the input changed or was replaced while copying: re-queued
    VANISHED = "vanished"  # the input disappeared: re-queued (a delete may follow)
    REFUSED = "refused"  # unreadable or refused: set aside with a reason


@dataclass(frozen=True)
class Applied:
    """The outcome of applying one op, with a reason for an operator when refused."""

    outcome: ApplyOutcome
    reason: str = ""
    created_objects: tuple[str, ...] = ()


@dataclass
class Plan:
    """A source's answer for a set of pending paths."""

    ops: list[Op] = field(default_factory=list)
    #: repo path -> the pending entry it came from (to put back if it cannot be published)
    origin: dict[str, Pending] = field(default_factory=dict)
    #: entries not ready yet (settling, still being written): put back as they are
    deferred: list[Pending] = field(default_factory=list)
    #: entries held until a ready marker appears
    waiting_for_marker: list[Pending] = field(default_factory=list)
    #: deletions withheld by the mass-deletion guard, and why
    guarded: list[Op] = field(default_factory=list)
    guard_reason: str = ""
    #: what kind of hold the guard decided (a mass deletion, a missing staging path)
    guard_kind: HoldReason | None = None
    set_aside: list[SetAside] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, path)
    #: repo paths that must be published together, whatever the caps (ready-marker dirs)
    atomic_groups: list[list[str]] = field(default_factory=list)


class Input(Protocol):
    """An input source of one repository (a staging directory, an S3 prefix)."""

    name: str

    def start(self, submit: Callable[[Dirty], None]) -> None:
        """Start watching; report hints through ``submit`` (called from any thread)."""

    def stop(self) -> None:
        """Stop watching."""

    def health(self) -> tuple[bool, str]:
        """Return (up, detail)."""

    def alive(self) -> bool:
        """Return False only if the source's own thread (watcher, poller) died."""

    def reconcile(self, now: float) -> list[Dirty]:
        """Compare the whole input with what is live; return a hint for every difference."""

    def plan(self, entries: Sequence[Pending], now: float) -> Plan:
        """Turn pending paths into ops (or defer, hold, refuse them)."""

    def open_content(self, op: Op) -> Content | Applied:
        """Open a file op's input for preparing (GRAFT ops), or say why it cannot be."""

    def still_current(self, op: Op) -> bool:
        """Return True if the input is still the version planned (checked before placing)."""

    def apply(self, op: Op, union_dir: Path) -> Applied:
        """Carry out one op that needs no prepared objects inside the open transaction."""

    def published(self, ops: Sequence[Op]) -> None:
        """Called once the ops are live (inbox mode removes its inputs here)."""

    def is_drop(self, rel_path: str) -> bool:
        """Return whether ``rel_path`` names a tarball drop this source has ingested."""


def op_weight(op: Op) -> int:
    """Return the bytes an op adds to a batch."""
    if op.kind in (OpKind.COPY_FILE, OpKind.GRAFT) and op.fingerprint is not None:
        return op.fingerprint.size
    return 0


def order_ops(ops: Sequence[Op]) -> list[Op]:
    """Return ops in a safe order: deletions deepest first, then directories top-down, then
    files and links. A type change thus deletes before it creates: what was live below a
    directory goes before the file or link that replaces it, a file before the directory
    that replaces it (which its content then fills)."""
    deletes = sorted(
        (o for o in ops if o.kind is OpKind.DELETE),
        key=lambda o: (-o.repo_path.count("/"), o.repo_path),
    )
    dirs = sorted(
        (o for o in ops if o.kind is OpKind.MAKE_DIR),
        key=lambda o: (o.repo_path.count("/"), o.repo_path),
    )
    rest = sorted(
        (o for o in ops if o.kind not in (OpKind.DELETE, OpKind.MAKE_DIR)),
        key=lambda o: o.repo_path,
    )
    return deletes + dirs + rest


def cut_to_caps(
    ops: Sequence[Op],
    atomic_groups: Sequence[Sequence[str]],
    max_files: int,
    max_bytes: int,
    fits: Callable[[int, int], bool] | None = None,
) -> tuple[list[Op], list[Op]]:
    """Split ops into (this batch, later) under the file-count and byte caps, and within
    ``fits(count, bytes)`` when given (a gateway lease's time budget).

    Atomic groups (a ready-marker directory; a replacement with what it deletes and, for a
    new directory, its content) go whole into this batch, even above the caps, so that no
    revision shows one without the other; at least one op is always taken, so a single
    huge file still publishes.
    """
    grouped = {path for group in atomic_groups for path in group}
    taken: list[Op] = [o for o in ops if o.repo_path in grouped]
    count = len(taken)
    size = sum(op_weight(o) for o in taken)
    later: list[Op] = []
    for op in order_ops([o for o in ops if o.repo_path not in grouped]):
        weight = op_weight(op)
        over = count + 1 > max_files or size + weight > max_bytes
        if taken and (over or (fits is not None and not fits(count + 1, size + weight))):
            later.append(op)
            continue
        taken.append(op)
        count += 1
        size += weight
    return order_ops(taken), later


def deletion_guard(deletes: int, live: int, max_share: float, min_entries: int = 10) -> str:
    """Return why a batch's deletions must be held, or "" if they may go ahead.

    ``deletes`` counts live paths the batch would remove (a directory counts with its
    contents), ``live`` the paths the source has live. Small deletions (fewer than
    ``min_entries``) always pass, so removing a handful of files never needs an operator.
    """
    if deletes < min_entries or live == 0:
        return ""
    share = deletes / live
    if share > max_share:
        return (
            f"batch would delete {deletes} of {live} live paths ({share:.0%} > "
            f"{max_share:.0%}); run 'cvmfs-syncd release' to confirm"
        )
    return ""
