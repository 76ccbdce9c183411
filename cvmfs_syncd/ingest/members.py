"""One archive member on its own: its normalised path, kind, mode and link target, or why it
is refused. What depends on other members (duplicates, parents, hard-link targets, where
symlinks lead) is decided in :mod:`cvmfs_syncd.ingest.check` and
:mod:`cvmfs_syncd.ingest.links`.

Member names obey the rules of staged file names (:func:`cvmfs_syncd.paths.check_component`
and, unless allowed, :func:`cvmfs_syncd.paths.reserved_name`), so that a name published
from a tarball could also have been published from a staging directory.
"""

from __future__ import annotations

import math

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.ingest.model import IngestLimits, Member, MemberKind, RefusalReason
from cvmfs_syncd.ingest.tarformat import (
    BLKTYPE,
    CHRTYPE,
    FIFOTYPE,
    NAME_ENCODING,
    NAME_ERRORS,
    TarHeader,
)
from cvmfs_syncd.paths import NAME_MAX, RESERVED_PREFIX, check_component, reserved_name

#: Longest member path and symlink target, in bytes (Linux's PATH_MAX less the NUL).
PATH_MAX_BYTES = 4095

#: The name CernVM-FS turns into a nested catalog; ``ingest`` aborts when it is anything
#: but a regular file (``SyncUnionTarball::ProcessArchiveEntry``).
CATALOG_MARKER = ".cvmfscatalog"

# GNU base-256 number fields of 12 bytes hold values below 256**11 in magnitude.
_MTIME_LIMIT = 256**11

_TYPE_NAMES = {
    CHRTYPE: "a character device",
    BLKTYPE: "a block device",
    FIFOTYPE: "a FIFO",
}


class MemberRefused(Exception):
    """A member that makes its archive unpublishable: ``reason`` and a ``message``."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


def _encoded_size(text: str) -> int:
    return len(text.encode(NAME_ENCODING, NAME_ERRORS))


def member_path(name: str, *, allow_reserved_names: bool) -> str:
    """Return the normalised form of archive member name ``name`` ("" for the base itself).

    Empty and ``.`` components are dropped (``./a//b/`` is ``a/b``). Raise
    :class:`MemberRefused` for an absolute name, a ``..`` component (anywhere, even one
    that would stay inside), a component that fails
    :func:`cvmfs_syncd.paths.check_component` (NUL, over 255 bytes, not encodable), a
    reserved component unless ``allow_reserved_names``, or a path over
    :data:`PATH_MAX_BYTES`.
    """
    if name.startswith("/"):
        raise MemberRefused(RefusalReason.ABSOLUTE_NAME, f"{name!r} is an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise MemberRefused(RefusalReason.DOT_DOT, f"{name!r} has a '..' component")
    # A short ASCII name without NUL has no component check_component could refuse, and
    # only a name holding ".cvmfs" can have a reserved component: most names skip both.
    plain = name.isascii() and len(name) <= NAME_MAX and "\0" not in name
    reserved = not allow_reserved_names and RESERVED_PREFIX in name
    for part in parts if not plain or reserved else ():
        try:
            check_component(part)
        except UnsafeName as exc:
            raise MemberRefused(RefusalReason.BAD_NAME, str(exc)) from None
        why = None if allow_reserved_names else reserved_name(part)
        if why is not None:
            raise MemberRefused(RefusalReason.RESERVED_NAME, why)
    path = "/".join(parts)
    size = _encoded_size(path)
    if size > PATH_MAX_BYTES:
        raise MemberRefused(
            RefusalReason.BAD_NAME, f"the path is {size} bytes long; the limit is {PATH_MAX_BYTES}"
        )
    return path


def _kind(info: TarHeader) -> MemberKind:
    if info.isdir():
        return MemberKind.DIRECTORY
    if info.issym():
        return MemberKind.SYMLINK
    if info.islnk():
        return MemberKind.HARDLINK
    if info.isreg():  # also contiguous files and sparse files, read with holes filled in
        return MemberKind.FILE
    what = _TYPE_NAMES.get(info.type, f"of type {info.type!r}")
    raise MemberRefused(RefusalReason.UNSUPPORTED_TYPE, f"the member is {what}")


def _symlink_target(target: str, limits: IngestLimits) -> str:
    if target == "":
        raise MemberRefused(RefusalReason.BAD_LINK_TARGET, "the symlink's target is empty")
    if "\0" in target:
        raise MemberRefused(RefusalReason.BAD_LINK_TARGET, "the symlink's target has a NUL")
    size = _encoded_size(target)
    if size > PATH_MAX_BYTES:
        raise MemberRefused(
            RefusalReason.BAD_LINK_TARGET,
            f"the symlink's target is {size} bytes long; the limit is {PATH_MAX_BYTES}",
        )
    if target.startswith("/") and not limits.allow_absolute_symlinks:
        raise MemberRefused(
            RefusalReason.SYMLINK_ABSOLUTE, f"the symlink's target {target!r} is absolute"
        )
    return target


def _hardlink_target(target: str) -> str:
    try:
        path = member_path(target, allow_reserved_names=True)
    except MemberRefused as exc:
        raise MemberRefused(
            RefusalReason.HARDLINK_TARGET, f"the hard link names {target!r}: {exc.message}"
        ) from None
    if path == "":
        raise MemberRefused(RefusalReason.HARDLINK_TARGET, "the hard link names the base itself")
    return path


def classify(info: TarHeader, limits: IngestLimits) -> Member | None:
    """Return the validated :class:`Member` for tar header ``info``, or None for an entry
    that names the base directory itself (``.``, ``./``), which is not published.

    Raise :class:`MemberRefused` for a name :func:`member_path` refuses; a device, FIFO or
    other type that is no regular file, directory, symlink or hard link; a base entry that
    is no directory; a symlink target that is empty, has a NUL, is over
    :data:`PATH_MAX_BYTES` or, unless ``limits.allow_absolute_symlinks``, is absolute; a
    hard-link target that is no safe member path; a ``.cvmfscatalog`` that is no regular
    file (a member below one makes it a directory); or header numbers no tar can carry (a
    negative size, an mtime that is not a finite number within range).
    """
    path = member_path(info.name, allow_reserved_names=limits.allow_reserved_names)
    kind = _kind(info)
    if path == "":
        if kind is MemberKind.DIRECTORY:
            return None
        raise MemberRefused(
            RefusalReason.NOT_A_DIRECTORY, f"the entry for the base directory itself is a {kind}"
        )
    *parents, last = path.split("/")
    if CATALOG_MARKER in parents or (last == CATALOG_MARKER and kind is not MemberKind.FILE):
        raise MemberRefused(
            RefusalReason.RESERVED_NAME,
            f"{CATALOG_MARKER!r} would not be a regular file, the only kind CVMFS accepts",
        )
    if not math.isfinite(info.mtime) or abs(info.mtime) >= _MTIME_LIMIT:
        raise MemberRefused(RefusalReason.UNREADABLE, f"the mtime {info.mtime!r} is out of range")
    if info.size < 0:
        raise MemberRefused(RefusalReason.UNREADABLE, f"the size {info.size} is negative")
    target: str | None = None
    if kind is MemberKind.SYMLINK:
        target = _symlink_target(info.linkname, limits)
    elif kind is MemberKind.HARDLINK:
        target = _hardlink_target(info.linkname)
    return Member(
        path=path,
        kind=kind,
        mode=info.mode & 0o777,
        size=info.size if kind is MemberKind.FILE else 0,
        mtime=math.floor(info.mtime),
        link_target=target,
    )
