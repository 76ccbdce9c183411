"""Tarball drops, pure: which names are drops, checking an archive, writing the tar for
``cvmfs_server ingest``, and planning the replacement of a base's previous content.

Nothing here touches the file system or runs a command: archives are read from and tars
written to file objects the caller opens (a staged file, an S3 body, a pipe to
``ingest``). Read an archive twice: :func:`check_archive` validates every member and
returns a :class:`Manifest` (or a :class:`Refusal`); :func:`emit_plain_tar` reads it again,
compares it with the Manifest and writes the only tar ``ingest`` ever reads.
"""

from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.emit import emit_plain_tar
from cvmfs_syncd.ingest.model import (
    ArchiveChanged,
    ArchiveStreamError,
    IngestError,
    IngestLimits,
    Manifest,
    Member,
    MemberKind,
    OutputStep,
    Refusal,
    RefusalReason,
)
from cvmfs_syncd.ingest.names import (
    ARCHIVE_SUFFIXES,
    Compression,
    DropRefusal,
    RefusedDrop,
    find_drops,
    tarball_base,
    tarball_compression,
)
from cvmfs_syncd.ingest.replace import (
    CATALOG_MARKER,
    ReplacePlan,
    already_live,
    ingest_argument_safe,
    live_types,
    plan_replacement,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CATALOG_MARKER",
    "ArchiveChanged",
    "ArchiveStreamError",
    "Compression",
    "DropRefusal",
    "IngestError",
    "IngestLimits",
    "Manifest",
    "Member",
    "MemberKind",
    "OutputStep",
    "Refusal",
    "RefusalReason",
    "RefusedDrop",
    "ReplacePlan",
    "already_live",
    "check_archive",
    "emit_plain_tar",
    "find_drops",
    "ingest_argument_safe",
    "live_types",
    "plan_replacement",
    "tarball_base",
    "tarball_compression",
]
