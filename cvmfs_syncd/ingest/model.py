"""The values of tarball ingestion: limits, validated members, manifests, refusals, errors.

Paths are ``str`` the way :mod:`cvmfs_syncd.paths` expects them: ``/``-separated, relative
to the base directory the archive is published under, never empty, ``.`` or ``..`` in any
component, and bytes that are not UTF-8 kept as surrogate escapes (``os.fsdecode``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cvmfs_syncd.errors import SyncdError
from cvmfs_syncd.model import EntryType


class Readable(Protocol):
    """A binary stream read front to back: an open file, a pipe, an S3 response body."""

    def read(self, size: int, /) -> bytes:
        """Return up to ``size`` bytes; ``b""`` only at the end."""
        ...


class Writable(Protocol):
    """Where an emitted tar goes: an open file, a pipe to ``cvmfs_server ingest``."""

    def write(self, data: bytes, /) -> object:
        """Write all of ``data`` or raise."""
        ...


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """What a tarball drop may hold, and which of CernVM-FS's risky names it may use.

    ``max_bytes``: most bytes of file content (the sum of regular members' sizes).
    ``max_members``: most entries of the tar written for ``ingest`` (the archive's members
    and the directories their paths imply); it also bounds the check's memory.
    ``allow_absolute_symlinks``: symlinks may point to absolute paths (which leave the
    base; relative targets must still stay inside it). ``allow_reserved_names``: members
    may be called ``.cvmfscatalog`` and other ``.cvmfs*`` names (as the sources'
    ``allow_reserved_names``).

    Raise ValueError if a maximum is not positive.
    """

    max_bytes: int = 32 * 1024**3
    max_members: int = 250_000
    allow_absolute_symlinks: bool = False
    allow_reserved_names: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}")
        if self.max_members <= 0:
            raise ValueError(f"max_members must be positive, not {self.max_members}")


class MemberKind(enum.StrEnum):
    """What one validated archive member is."""

    FILE = "file"
    DIRECTORY = "dir"
    SYMLINK = "symlink"
    #: A hard link to an earlier regular member; ``ingest`` publishes it as an independent
    #: regular file with the same content (m2_ingest 22-24).
    HARDLINK = "hardlink"

    @property
    def entry_type(self) -> EntryType:
        """Return what the member becomes in the repository (a hard link is a file)."""
        if self is MemberKind.DIRECTORY:
            return EntryType.DIRECTORY
        if self is MemberKind.SYMLINK:
            return EntryType.SYMLINK
        return EntryType.FILE


@dataclass(frozen=True, slots=True)
class Member:
    """One validated archive member, as the emitted tar will carry it.

    ``path``: normalised and relative to the base. ``mode``: the permission bits that are
    published (``mode & 0o777``: setuid, setgid and sticky stripped, as copies are).
    ``size``: content bytes of a regular file, 0 for every other kind. ``mtime``: whole
    seconds. ``link_target``: a symlink's target exactly as archived, or the path of the
    regular member a hard link names; None for files and directories.
    """

    path: str
    kind: MemberKind
    mode: int
    size: int = 0
    mtime: int = 0
    link_target: str | None = None


#: Permission bits of a directory that members imply but the archive does not list.
IMPLIED_DIRECTORY_MODE = 0o755


@dataclass(frozen=True, slots=True)
class OutputStep:
    """One step of writing the tar for ``ingest`` (see :meth:`Manifest.output_plan`).

    ``member``: the entry this step concerns. ``index``: the position in
    :attr:`Manifest.members` of the archive member read at this step, or None when the
    step reads nothing (a directory written ahead of its children). ``write``: whether the
    entry is written now (False for a listed directory already written ahead).
    """

    member: Member
    index: int | None
    write: bool


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a checked archive holds, and what identifies the bytes that were checked.

    ``members``: the validated members in archive order (an entry for the base directory
    itself, ``.`` or ``./``, is not one of them). ``implied_directories``: directories
    that member paths need but the archive does not list, in the order they are first
    needed. ``total_bytes``: the sum of regular members' sizes. ``archive_bytes`` and
    ``digest`` (SHA-256, hex): the stream as read, compressed or not, so that a second read
    can prove it got the same bytes.
    """

    members: tuple[Member, ...]
    implied_directories: tuple[str, ...]
    total_bytes: int
    archive_bytes: int
    digest: str

    @property
    def member_count(self) -> int:
        """Return how many validated members the archive has."""
        return len(self.members)

    def entries(self) -> dict[str, EntryType]:
        """Return every path the archive publishes below the base, with its type."""
        found = {member.path: member.kind.entry_type for member in self.members}
        for path in self.implied_directories:
            found[path] = EntryType.DIRECTORY
        return found

    def output_plan(self) -> Iterator[OutputStep]:
        """Yield the steps of writing this archive's tar for ``ingest``, in order.

        Every member is read once, in archive order. Before a member, each of its parent
        directories not yet written is written: with the archive's own entry for it if the
        archive lists it (even later), else as an implied directory (mode 0755, the mtime
        of the member that first needs it). A listed directory already written that way is
        read but not written again. So the tar lists every directory exactly once, before
        anything inside it.
        """
        listed = {m.path: m for m in self.members if m.kind is MemberKind.DIRECTORY}
        written: set[str] = set()
        for index, member in enumerate(self.members):
            missing: list[str] = []
            parent = member.path
            while (cut := parent.rfind("/")) > 0:
                parent = parent[:cut]
                if parent in written:
                    break  # its own parents were written before it
                missing.append(parent)
            for path in reversed(missing):
                written.add(path)
                directory = listed.get(path) or Member(
                    path, MemberKind.DIRECTORY, IMPLIED_DIRECTORY_MODE, mtime=member.mtime
                )
                yield OutputStep(directory, None, True)
            first = member.path not in written
            if member.kind is MemberKind.DIRECTORY:
                written.add(member.path)
            yield OutputStep(member, index, first)


class RefusalReason(enum.StrEnum):
    """Why an archive is not published (stable codes for logs, metrics and set-aside)."""

    UNREADABLE = "unreadable"
    ABSOLUTE_NAME = "absolute-name"
    DOT_DOT = "dot-dot"
    BAD_NAME = "bad-name"
    RESERVED_NAME = "reserved-name"
    SYMLINK_ABSOLUTE = "symlink-absolute"
    SYMLINK_ESCAPE = "symlink-escape"
    BAD_LINK_TARGET = "bad-link-target"
    HARDLINK_TARGET = "hardlink-target"
    UNSUPPORTED_TYPE = "unsupported-type"
    DUPLICATE = "duplicate"
    NOT_A_DIRECTORY = "not-a-directory"
    TOO_MANY_MEMBERS = "too-many-members"
    TOO_LARGE = "too-large"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an archive was refused: a stable ``reason``, the ``member`` concerned (its name
    as archived, surrogate escapes for bytes that are not UTF-8; "" when no member is
    concerned) and a ``message`` for a human."""

    reason: RefusalReason
    member: str
    message: str

    def __str__(self) -> str:
        where = f" at member {self.member!r}" if self.member else ""
        return f"archive refused ({self.reason.value}){where}: {self.message}"


class IngestError(SyncdError):
    """Tarball ingestion failed for a reason other than a refused archive."""


class ArchiveStreamError(IngestError):
    """Reading the archive's bytes failed (the file, the pipe, the S3 body), so nothing can be
    said about its content; the cause is chained. Retrying may help, refusing would not."""


class ArchiveChanged(IngestError):
    """The archive read while writing the tar for ``ingest`` is not the one that was checked.

    ``member``: the archive member where the difference showed ("" if none). ``detail``:
    what differed. The tar written so far has no end-of-archive marker and cannot be read
    to a clean end.
    """

    def __init__(self, member: str, detail: str) -> None:
        self.member = member
        self.detail = detail
        where = f" at member {member!r}" if member else ""
        super().__init__(f"the archive changed since it was checked{where}: {detail}")
