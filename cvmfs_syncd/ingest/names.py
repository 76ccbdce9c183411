"""Which top-level names are tarball drops, under which base each is published, and which are
refused because their base is unsafe or taken.

A drop ``foo.tar.gz`` found at the top level of a staging directory or S3 prefix is
published as the directory ``<target>/foo``. Suffixes are matched case-sensitively (like
every name rule of CernVM-FS): ``FOO.TGZ`` is an ordinary file.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.paths import check_component, reserved_name


class Compression(enum.StrEnum):
    """How an archive's bytes are compressed around the tar stream."""

    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    BZIP2 = "bzip2"


#: The one table of tarball suffixes. A new format (``.tar.zst`` once a zstd decompressor
#: is available) is one row here plus its opener in :mod:`cvmfs_syncd.ingest.streams`.
ARCHIVE_SUFFIXES: tuple[tuple[str, Compression], ...] = (
    (".tar", Compression.NONE),
    (".tar.gz", Compression.GZIP),
    (".tgz", Compression.GZIP),
    (".tar.xz", Compression.XZ),
    (".tar.bz2", Compression.BZIP2),
)

# Longest first, so that ".tar.gz" is not taken for a file "x.tar" plus ".gz".
_BY_LENGTH = sorted(ARCHIVE_SUFFIXES, key=lambda row: len(row[0]), reverse=True)


def _split(name: str) -> tuple[str, Compression] | None:
    for suffix, compression in _BY_LENGTH:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], compression
    return None


def tarball_base(name: str) -> str | None:
    """Return the base name of tarball ``name`` (``foo`` for ``foo.tar.gz``), or None if
    ``name`` has no tarball suffix or nothing before it (``.tar`` is an ordinary file).

    The base is not checked here: :func:`find_drops` refuses one that is unsafe.
    """
    found = _split(name)
    return None if found is None else found[0]


def tarball_compression(name: str) -> Compression | None:
    """Return the compression the suffix of ``name`` means, or None if it is no tarball."""
    found = _split(name)
    return None if found is None else found[1]


class DropRefusal(enum.StrEnum):
    """Why a top-level tarball is not published."""

    #: Another tarball has the same base (``foo.tgz`` beside ``foo.tar.gz``).
    SAME_BASE = "same-base"
    #: A top-level entry that is no tarball already has the base's name (``foo/`` or a
    #: file ``foo`` beside ``foo.tgz``); that entry is published as before.
    BASE_TAKEN = "base-taken"
    #: The base is not a name that may be published (``..tar``, ``.cvmfscatalog.tgz``, a
    #: name that is too long).
    UNSAFE_BASE = "unsafe-base"


@dataclass(frozen=True, slots=True)
class RefusedDrop:
    """A top-level tarball that is not published: ``name`` as found, ``reason``, ``detail``
    for a human."""

    name: str
    reason: DropRefusal
    detail: str


def find_drops(
    names: Iterable[str],
    directories: Collection[str] = (),
    *,
    allow_reserved_names: bool = False,
) -> tuple[dict[str, str], list[RefusedDrop]]:
    """Sort the top-level names of a source into tarball drops and refused tarballs.

    ``names``: every top-level entry (files, directories, symlinks, objects; duplicates
    count once). ``directories``: those of them that are directories, which are never
    tarballs whatever their name. Return ``(drops, refused)``: ``drops`` maps each tarball
    to publish to its base; ``refused`` lists the others, sorted by name. Names that are
    no tarball appear in neither.

    The result depends only on the set of names, never on their order: every tarball of a
    base shared by several is refused (none is preferred), and a tarball whose base is
    the name of a top-level entry that is no tarball is refused while that entry stays
    what it was. A base must pass :func:`cvmfs_syncd.paths.check_component` and, unless
    ``allow_reserved_names``, must not be a CernVM-FS reserved name.
    """
    unique = set(names)
    plain: set[str] = set()
    by_base: dict[str, list[str]] = {}
    for name in sorted(unique):
        base = None if name in directories else tarball_base(name)
        if base is None:
            plain.add(name)
        else:
            by_base.setdefault(base, []).append(name)

    drops: dict[str, str] = {}
    refused: list[RefusedDrop] = []
    for base, tarballs in by_base.items():
        problem = _unsafe_base(base, allow_reserved_names)
        for name in tarballs:
            if problem is not None:
                refused.append(RefusedDrop(name, DropRefusal.UNSAFE_BASE, problem))
            elif base in plain:
                detail = f"the top-level entry {base!r} is published under the same name"
                refused.append(RefusedDrop(name, DropRefusal.BASE_TAKEN, detail))
            elif len(tarballs) > 1:
                others = ", ".join(repr(other) for other in tarballs if other != name)
                detail = f"{others} would be published under the same base {base!r}"
                refused.append(RefusedDrop(name, DropRefusal.SAME_BASE, detail))
            else:
                drops[name] = base
    refused.sort(key=lambda drop: drop.name)
    return drops, refused


def _unsafe_base(base: str, allow_reserved_names: bool) -> str | None:
    try:
        check_component(base)
    except UnsafeName as exc:
        return f"base {base!r}: {exc}"
    why = None if allow_reserved_names else reserved_name(base)
    return None if why is None else f"base {base!r}: {why}"
