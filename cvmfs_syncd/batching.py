"""Pure batching policy: pending changes, when to cut a batch, when a file has settled.

No threads, no sleeps, no I/O: every decision takes ``now`` from the caller, so the policy
is tested with an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from cvmfs_syncd.model import Dirty, Fingerprint


@dataclass(frozen=True, slots=True)
class Pending:
    """A path that may need publishing, with what the sources said about it."""

    source: str
    rel_path: str
    first_at: float
    last_at: float
    writing: bool = False
    rescan: bool = False
    from_scan: bool = False
    not_before: float = 0.0
    held: bool = False
    #: a tarball drop (published in a revision of its own: no reason to wait for others)
    drop: bool = False

    def deferred_until(self, at: float) -> Pending:
        """Return this entry, to be looked at again no earlier than ``at``."""
        return replace(self, rescan=False, held=False, not_before=at)

    def below(self, rel: str) -> Pending:
        """Return the entry of a path found below this one by a rescan (same times)."""
        return Pending(self.source, rel, self.first_at, self.last_at, from_scan=self.from_scan)

    @property
    def key(self) -> tuple[str, str]:
        """The identity of a pending path: (source, path relative to the source)."""
        return (self.source, self.rel_path)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to cut: quiet period, maximum age of the oldest change, size caps."""

    quiet_seconds: float
    max_batch_seconds: float
    max_batch_files: int
    max_batch_bytes: int


class PendingChanges:
    """The set of pending paths of one repository (owned by that repository's lane).

    ``is_drop(source, rel_path)`` says which paths are tarball drops: each is published by
    ``ingest`` in a revision of its own, so when nothing but complete drops is pending
    there is nothing to wait for and the batch is cut at once (reason ``drop``) instead of
    after the quiet period.
    """

    def __init__(
        self, policy: BatchPolicy, *, is_drop: Callable[[str, str], bool] | None = None
    ) -> None:
        self.policy = policy
        self._is_drop = is_drop
        self._items: dict[tuple[str, str], Pending] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def items(self) -> list[Pending]:
        """Return the pending entries (a copy)."""
        return list(self._items.values())

    def add(self, dirty: Dirty) -> Pending:
        """Merge a source's hint into the pending set; return the merged entry.

        A close-after-write or move-in clears the "still being written" state; any other
        event from a watcher sets it. Any hint releases a hold (it is checked again at
        planning); a watcher event also cancels a settle delay.
        """
        key = (dirty.source, dirty.rel_path)
        old = self._items.get(key)
        writing = not dirty.closed and not dirty.from_scan
        if old is None:
            entry = Pending(
                source=dirty.source,
                rel_path=dirty.rel_path,
                first_at=dirty.at,
                last_at=dirty.at,
                writing=writing,
                rescan=dirty.rescan,
                from_scan=dirty.from_scan,
                drop=self._is_drop is not None and self._is_drop(dirty.source, dirty.rel_path),
            )
        else:
            entry = replace(
                old,
                last_at=max(old.last_at, dirty.at) if not dirty.from_scan else old.last_at,
                writing=(old.writing and dirty.from_scan) or writing,
                rescan=old.rescan or dirty.rescan,
                from_scan=old.from_scan and dirty.from_scan,
                not_before=0.0 if not dirty.from_scan else old.not_before,
                held=False,  # any hint re-checks a hold (the marker may be there now)
            )
        self._items[key] = entry
        return entry

    def put_back(self, entry: Pending) -> None:
        """Return an entry taken for planning (deferred, held or failed) to the set.

        If a newer hint arrived meanwhile, that one is kept and merged.
        """
        current = self._items.get(entry.key)
        if current is None:
            self._items[entry.key] = entry
        else:
            self._items[entry.key] = replace(
                current, first_at=min(current.first_at, entry.first_at)
            )

    def take(self, keys: Iterable[tuple[str, str]] | None = None) -> list[Pending]:
        """Remove and return entries (all of them by default) for planning."""
        if keys is None:
            taken = list(self._items.values())
            self._items.clear()
            return taken
        return [self._items.pop(k) for k in list(keys) if k in self._items]

    def _active(self, now: float) -> list[Pending]:
        return [p for p in self._items.values() if not p.held and p.not_before <= now]

    def due(self, now: float) -> str | None:
        """Return why a batch should be cut now (``drop``, ``quiet``, ``max-age``,
        ``max-files``), or None."""
        active = self._active(now)
        if not active:
            return None
        if _only_drops(active):
            return "drop"
        if len(active) >= self.policy.max_batch_files:
            return "max-files"
        oldest = min(p.first_at for p in active)
        if now - oldest >= self.policy.max_batch_seconds:
            return "max-age"
        newest = max(max(p.last_at, p.not_before) for p in active)
        if now - newest >= self.policy.quiet_seconds:
            return "quiet"
        return None

    def next_deadline(self, now: float) -> float | None:
        """Return the earliest time at which :meth:`due` may change, or None if never."""
        candidates: list[float] = []
        active = self._active(now)
        if active and _only_drops(active):
            return now
        if active:
            oldest = min(p.first_at for p in active)
            newest = max(max(p.last_at, p.not_before) for p in active)
            candidates += [
                oldest + self.policy.max_batch_seconds,
                newest + self.policy.quiet_seconds,
            ]
        candidates += [
            p.not_before for p in self._items.values() if not p.held and p.not_before > now
        ]
        return min(candidates) if candidates else None


def _only_drops(active: list[Pending]) -> bool:
    """Whether every entry is a tarball drop no watcher saw still being written, but for
    the source's top directory (``""``: every drop arriving changes it)."""
    entries = [p for p in active if p.rel_path]
    return bool(entries) and all(p.drop and not p.writing for p in entries)


class Settler:
    """Decides when a file is complete: its fingerprint unchanged for ``settle_seconds``."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[Fingerprint, float]] = {}

    def observe(
        self, key: tuple[str, str], fingerprint: Fingerprint, now: float, settle_seconds: float
    ) -> float:
        """Record an observation; return 0.0 if settled, else the time to look again.

        A version is settled once ``settle_seconds`` have passed since the earlier of its
        modification time and the first time it was seen with this exact fingerprint:
        a file moved in with an old mtime is taken at once, a file still growing never.
        """
        seen = self._seen.get(key)
        if (
            seen is None
            or not seen[0].same_content(fingerprint)
            or seen[0].inode != fingerprint.inode
        ):
            self._seen[key] = (fingerprint, now)
            first = now
        else:
            first = seen[1]
        ready_at = min(first, fingerprint.mtime_ns / 1e9) + settle_seconds
        return 0.0 if now >= ready_at else ready_at

    def forget(self, key: tuple[str, str]) -> None:
        """Drop what is known of a path (published, deleted, refused)."""
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
