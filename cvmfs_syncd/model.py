"""Value types that flow between sources, the batcher, the planner and the lanes: frozen,
except :class:`LaneStatus`, which a lane updates and copies out for its readers."""

from __future__ import annotations

import calendar
import enum
from dataclasses import dataclass, field
from datetime import datetime

#: Mode of every file published from S3 (objects carry no permissions).
S3_FILE_MODE = 0o644


class EntryType(enum.StrEnum):
    """What kind of file-system object an input path is."""

    FILE = "file"
    DIRECTORY = "dir"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What identifies one version of an input, cheaply, without reading its bytes.

    For staged files: type, permission bits, size, modification time in nanoseconds and
    inode; for symlinks the target; for S3 objects the ETag stands in ``etag``.
    """

    type: EntryType
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    target: str = ""
    etag: str = ""

    def same_content(self, other: Fingerprint | None) -> bool:
        """Return True if ``other`` describes the same published content (inode aside)."""
        if other is None:
            return False
        return (
            self.type == other.type
            and self.mode == other.mode
            and self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.target == other.target
            and self.etag == other.etag
        )

    def to_json(self) -> dict[str, object]:
        """Return a JSON-serialisable dict of the fingerprint."""
        return {
            "type": self.type.value,
            "mode": self.mode,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "inode": self.inode,
            "target": self.target,
            "etag": self.etag,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Fingerprint:
        """Build a fingerprint from :meth:`to_json` output."""
        return cls(
            type=EntryType(str(data["type"])),
            mode=int(str(data.get("mode", 0))),
            size=int(str(data.get("size", 0))),
            mtime_ns=int(str(data.get("mtime_ns", 0))),
            inode=int(str(data.get("inode", 0))),
            target=str(data.get("target", "")),
            etag=str(data.get("etag", "")),
        )


@dataclass(frozen=True, slots=True)
class ListedObject:
    """One S3 object as a listing of its prefix showed it.

    ``last_modified`` is the listing's timestamp in ISO 8601 (kept as text in the state
    database); ``stable`` is True once the same size and ETag were seen in two listings at
    least ``poll_seconds`` apart.
    """

    key: str
    size: int
    etag: str
    last_modified: str
    first_seen: float
    stable: bool

    @property
    def mtime_ns(self) -> int:
        """``last_modified`` in nanoseconds since the epoch (the published mtime)."""
        moment = datetime.fromisoformat(self.last_modified)
        return calendar.timegm(moment.utctimetuple()) * 10**9 + moment.microsecond * 1000

    def fingerprint(self) -> Fingerprint:
        """The fingerprint the index records for this version of the object."""
        return Fingerprint(EntryType.FILE, S3_FILE_MODE, self.size, self.mtime_ns, etag=self.etag)

    def same_version(self, other: ListedObject | None) -> bool:
        """True if ``other`` is the same version in the same readiness state."""
        return other is not None and (
            self.size,
            self.etag,
            self.last_modified,
            self.stable,
        ) == (other.size, other.etag, other.last_modified, other.stable)


class HoldReason(enum.StrEnum):
    """Why a lane holds publishing; the values are the ``kind`` label of ``cvmfs_syncd_held``."""

    MASS_DELETE = "mass-delete"
    STAGING_MISSING = "staging-missing"
    ABORT_FAILED = "abort-failed"
    WHITELIST_EXPIRED = "whitelist-expired"
    ORPHANED_COMMAND = "orphaned-command"


class JournalStage(enum.StrEnum):
    """Where a batch is in the journal; the values are the strings stored in the database.

    A batch moves forward through the stages in the order listed here and ends in one of
    ``DONE``, ``ABORTED`` or ``FAILED``.
    """

    PLANNED = "planned"
    PREPARING = "preparing"
    OPENING = "opening"
    OPEN = "open"
    APPLIED = "applied"
    PUBLISHING = "publishing"
    #: A tarball drop is being published by ``cvmfs_server ingest``, which opens and
    #: publishes its own transaction (set before the command runs).
    INGESTING = "ingesting"
    PUBLISHED = "published"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """Return True for the stages a batch never leaves."""
        return self in (JournalStage.DONE, JournalStage.ABORTED, JournalStage.FAILED)


class OpKind(enum.StrEnum):
    """What the lane does to one path inside the repository."""

    COPY_FILE = "copy"
    MAKE_DIR = "mkdir"
    MAKE_SYMLINK = "symlink"
    DELETE = "delete"
    GRAFT = "graft"
    #: A tarball drop: ``repo_path`` is the directory it is published as (its base),
    #: ``source_path`` and ``fingerprint`` are the tarball's.
    INGEST = "ingest"


@dataclass(frozen=True, slots=True)
class Op:
    """One step of a batch, planned from the inputs and the published index.

    ``repo_path`` is relative to the repository root (no leading slash, ``/``-separated,
    never ``..``); ``source_path`` is the absolute input path (staging) or key (S3).
    """

    kind: OpKind
    repo_path: str
    source: str = ""
    source_path: str = ""
    fingerprint: Fingerprint | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A set of ops published together in one revision."""

    repo: str
    ops: tuple[Op, ...]
    reason: str
    first_change_at: float = 0.0
    changes: int = 0
    bytes: int = 0

    def summary(self) -> str:
        """Return the one-line publish message for this batch."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind.value] = counts.get(op.kind.value, 0) + 1
        parts = [f"{n} {k}" for k, n in sorted(counts.items())]
        return f"cvmfs-syncd {self.reason}: {', '.join(parts) or 'no changes'}"


@dataclass(frozen=True, slots=True)
class Dirty:
    """A hint from a source that a path may have changed; the truth is re-read later.

    ``closed`` is True when the source saw the writer finish (close-after-write, move in);
    ``rescan`` asks for the whole subtree below ``rel_path`` to be re-read.
    """

    source: str
    rel_path: str
    at: float
    closed: bool = False
    rescan: bool = False
    from_scan: bool = False


@dataclass(frozen=True, slots=True)
class SetAside:
    """An input that was refused, with the reason an operator reads."""

    source: str
    rel_path: str
    reason: str
    detail: str = ""
    #: For a refused tarball: the refusal's code (the ``reason`` label of
    #: ``cvmfs_syncd_ingest_refused_total``); "" for any other input.
    refusal: str = ""


@dataclass(slots=True)
class LaneStatus:
    """What a lane is doing now; copied out for /status and systemd STATUS."""

    repo: str
    state: str = "starting"
    pending: int = 0
    held: str = ""
    last_publish_at: float | None = None
    last_revision: int | None = None
    last_error: str = ""
    transaction_open: bool = False
    foreign_transaction: bool = False
    progress_at: float = 0.0
    busy_since: float | None = None
    #: Behind a gateway, the lease our open transaction holds: path and expiry (epoch s).
    lease: dict[str, object] | None = None
    #: The tarball being ingested ("" when none), its members and content bytes, and the
    #: bytes of the checked tar written to ``ingest`` so far.
    ingesting: str = ""
    ingest_members: int = 0
    ingest_content_bytes: int = 0
    ingest_fed_bytes: int = 0
    details: dict[str, object] = field(default_factory=dict)
