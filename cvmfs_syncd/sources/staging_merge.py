"""The reconciliation scan of a staging directory: the tree merged with the index.

A merge of two streams in bytewise path order, the tree (:func:`fsops.scan_staging_runs`)
and the source's rows of the index (:meth:`State.scan_pages`), so that memory does not grow
with the number of live entries.  :class:`~cvmfs_syncd.sources.staging.StagingInput`
runs one :class:`StagingMerge` per scan.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog

from cvmfs_syncd import fsops
from cvmfs_syncd.model import Dirty, Fingerprint
from cvmfs_syncd.paths import is_ignored
from cvmfs_syncd.pipeline.plan import same_staged as _same
from cvmfs_syncd.sources.index_records import IndexRecords
from cvmfs_syncd.state import PublishedEntry

if TYPE_CHECKING:
    from cvmfs_syncd.sources.staging import StagingInput

log = structlog.get_logger(__name__)


class StagingMerge:
    """One reconciliation scan of ``source`` below the repository path ``target``."""

    def __init__(self, source: StagingInput, target: str, now: float) -> None:
        self.source = source
        self.target = target
        self.now = now

    def merge(self, index: IndexRecords, mirror: bool) -> list[Dirty]:
        """Return the hints of one scan of the tree against ``index``; none if the scan fails."""
        source, now = self.source, self.now
        if not source.root.is_dir():
            if not mirror:
                return []
            return [
                Dirty(source.name, os.fsdecode(p), now, from_scan=True) for p in index.rest() if p
            ]
        hints: list[Dirty] = []
        gone: list[Dirty] | None = [] if mirror else None
        try:
            for records, found in fsops.scan_staging_runs(source.root):
                if not index.settles(records):
                    self._merge_run(records, found, index, hints, gone)
            for path in index.rest():
                if gone is not None and path:
                    gone.append(Dirty(source.name, os.fsdecode(path), now, from_scan=True))
        except OSError as exc:
            log.warning("reconciliation scan failed", source=source.name, error=str(exc))
            return []
        return hints + (gone or [])

    def _merge_run(
        self,
        records: bytes,
        found: dict[bytes, fsops.ScanFound],
        index: IndexRecords,
        hints: list[Dirty],
        gone: list[Dirty] | None,
    ) -> None:
        """Merge a run of the tree with the index an entry at a time (it differs somewhere)."""
        source, now = self.source, self.now
        fields = records.split(b"\0")
        for i in range(0, len(fields) - 1, 2):
            rel_b, key = fields[i], fields[i + 1]
            head = index.head()
            while head is not None and head < rel_b:
                if gone is not None and head:
                    gone.append(Dirty(source.name, os.fsdecode(head), now, from_scan=True))
                index.pop(head)
                head = index.head()
            live_key = index.pop(rel_b) if head == rel_b else None
            if key and key == live_key:
                continue  # no other rule can add a hint for what is live
            live = None
            if live_key is not None:
                live = source.state.scan_entry(source.repo, source.name, rel_b, self.target)
            entry = found.get(rel_b)
            if entry is None:
                fingerprint: Fingerprint | fsops.Skipped = fsops.file_fingerprint(key)
            elif isinstance(entry, os.stat_result):
                fingerprint = fsops.fingerprint_of(entry)
            else:
                fingerprint = entry
            rel = os.fsdecode(rel_b)
            if self.differs(rel, fingerprint, live):
                hints.append(Dirty(source.name, rel, now, from_scan=True))

    def differs(
        self, rel: str, found: Fingerprint | fsops.Skipped, live: PublishedEntry | None
    ) -> bool:
        """Return True if a scanned entry needs planning (new, changed, not yet reported)."""
        source = self.source
        if is_ignored(rel.rsplit("/", 1)[-1], source.config.ignore):
            return False
        marker = source.config.ready_marker
        if marker and rel.count("/") == 1 and rel.endswith("/" + marker):
            return False  # the marker itself is never published
        if rel in source.reported:
            return False  # refused or skipped already; a watch event brings it back
        if not isinstance(found, Fingerprint):
            return True
        if live is not None and _same(found, live.fingerprint):
            return False
        aside = source.state.set_aside_entry(source.repo, source.name, rel)
        return not (aside is not None and aside[1] is not None and _same(found, aside[1]))
