"""The first read of a tarball drop: validate every member, return a Manifest or a Refusal.

The check reads the whole stream once, front to back, in bounded memory: member data is
skipped (never kept), and what is kept per member is its :class:`Member` and its path in a
few sets, limited by ``max_members``. Besides each member on its own
(:mod:`cvmfs_syncd.ingest.members`), it refuses an archive where

* two members have the same normalised path (``a`` and ``./a`` too);
* a path is a regular file, symlink or hard link and also the parent of other members
  (in either order), so nothing is ever placed through a symlink;
* a hard link names a member that is not an earlier regular file (missing, later, a
  directory, a symlink, another hard link);
* the content (sum of regular members' sizes) exceeds ``max_bytes``, or the members and
  the directories they imply exceed ``max_members``;
* a symlink leads out of the base directory (:mod:`cvmfs_syncd.ingest.links`);
* the stream is not a complete archive: not a tar (after decompression), a damaged or
  truncated compressed stream, a damaged header, no end-of-archive marker, or data after
  it (:mod:`cvmfs_syncd.ingest.streams`). Extended attributes and ACLs in PAX records are
  not published, and owners never are.
"""

from __future__ import annotations

from cvmfs_syncd.ingest.links import SymlinkTree
from cvmfs_syncd.ingest.members import MemberRefused, classify
from cvmfs_syncd.ingest.model import (
    IngestLimits,
    Manifest,
    Member,
    MemberKind,
    Readable,
    Refusal,
    RefusalReason,
)
from cvmfs_syncd.ingest.names import Compression
from cvmfs_syncd.ingest.streams import (
    DamagedArchive,
    DigestReader,
    finish_archive,
    open_archive,
)
from cvmfs_syncd.ingest.tarformat import TarHeader


class _Builder:
    """The members validated so far and what the next one is checked against."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.members: list[Member] = []
        self.kinds: dict[str, MemberKind] = {}
        #: listed and implied directories; always holds the parents of what it holds
        self.directories: set[str] = set()
        self.implied: dict[str, None] = {}  # ordered: first needed first
        self.symlinks: list[tuple[str, Member]] = []
        self.tree = SymlinkTree()
        self.total_bytes = 0
        self.headers = 0
        self.current = ""

    def add(self, info: TarHeader) -> None:
        """Validate ``info`` against the members before it; raise MemberRefused."""
        self.current = info.name
        self.headers += 1
        if self.headers > self.limits.max_members:
            raise MemberRefused(
                RefusalReason.TOO_MANY_MEMBERS, f"more than {self.limits.max_members} members"
            )
        member = classify(info, self.limits)
        if member is None:
            return
        path, kind = member.path, member.kind
        if path in self.kinds:
            raise MemberRefused(RefusalReason.DUPLICATE, f"{path!r} appears twice")
        if path in self.directories and kind is not MemberKind.DIRECTORY:
            raise MemberRefused(
                RefusalReason.NOT_A_DIRECTORY,
                f"{path!r} is a {kind}, yet earlier members are inside it",
            )
        missing: list[str] = []
        parent = path
        while (cut := parent.rfind("/")) > 0:
            parent = parent[:cut]
            if parent in self.directories:
                break
            if parent in self.kinds:
                raise MemberRefused(
                    RefusalReason.NOT_A_DIRECTORY,
                    f"{parent!r} is a {self.kinds[parent]}, yet {path!r} is inside it",
                )
            missing.append(parent)
        if kind is MemberKind.HARDLINK:
            target = member.link_target
            found = None if target is None else self.kinds.get(target)
            if found is not MemberKind.FILE:
                what = "no earlier member" if found is None else f"a {found}"
                raise MemberRefused(
                    RefusalReason.HARDLINK_TARGET,
                    f"the hard link names {target!r}, which is {what}, not an earlier regular file",
                )
        if kind is MemberKind.FILE:
            self.total_bytes += member.size
            if self.total_bytes > self.limits.max_bytes:
                raise MemberRefused(
                    RefusalReason.TOO_LARGE,
                    f"the content exceeds {self.limits.max_bytes} bytes",
                )
        entries = len(self.members) + len(self.implied) + len(missing)
        if path not in self.implied:
            entries += 1
        if entries > self.limits.max_members:
            raise MemberRefused(
                RefusalReason.TOO_MANY_MEMBERS,
                f"more than {self.limits.max_members} entries with the directories members imply",
            )
        for directory in reversed(missing):
            self.directories.add(directory)
            self.implied[directory] = None
        if kind is MemberKind.DIRECTORY:
            self.directories.add(path)
            self.implied.pop(path, None)
        elif kind is MemberKind.SYMLINK and member.link_target is not None:
            self.tree.add(path, member.link_target)
            self.symlinks.append((info.name, member))
        self.kinds[path] = kind
        self.members.append(member)

    def finish(self, raw: DigestReader) -> Manifest | Refusal:
        """Check the symlinks against each other; return the Manifest or the Refusal."""
        for name, member in self.symlinks:
            target = member.link_target or ""
            refused = self.tree.refusal(
                member.path, target, allow_absolute=self.limits.allow_absolute_symlinks
            )
            if refused is not None:
                reason, message = refused
                return Refusal(reason, name, message)
        return Manifest(
            members=tuple(self.members),
            implied_directories=tuple(self.implied),
            total_bytes=self.total_bytes,
            archive_bytes=raw.count,
            digest=raw.hexdigest(),
        )


def describe_unreadable(exc: DamagedArchive, raw: DigestReader) -> str:
    """Return a sentence about why a stream could not be read as an archive."""
    return "the archive is empty (0 bytes)" if raw.count == 0 else str(exc)


def check_archive(
    stream: Readable,
    limits: IngestLimits | None = None,
    *,
    compression: Compression | None = None,
) -> Manifest | Refusal:
    """Read archive ``stream`` once and return its :class:`Manifest`, or why it is refused.

    ``compression``: how the stream is compressed (what the name's suffix says, see
    :func:`cvmfs_syncd.ingest.names.tarball_compression`); None to go by its first bytes.
    ``limits``: :class:`IngestLimits` (the defaults when None).

    A refused archive is a :class:`Refusal` (``member``: the archived name of the member
    concerned, or for an unreadable stream the last member read before the failure), read
    only as far as needed. Raise :class:`ArchiveStreamError` if reading the stream itself
    fails: that says nothing about the archive.
    """
    limits = limits or IngestLimits()
    raw = DigestReader(stream)
    builder = _Builder(limits)
    try:
        with open_archive(raw, compression) as tar:
            for info in tar:
                builder.add(info)
            finish_archive(tar, raw)
    except MemberRefused as refused:
        return Refusal(refused.reason, builder.current, refused.message)
    except DamagedArchive as exc:
        return Refusal(RefusalReason.UNREADABLE, builder.current, describe_unreadable(exc, raw))
    return builder.finish(raw)
