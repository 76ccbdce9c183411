"""How a new version of a tarball replaces the old one under its base: what to delete, and
whether one ``cvmfs_server ingest`` call can do it at all.

``ingest`` merges into an existing base (gateway.md surprise 22), so what the new archive
no longer has must be named with ``--delete``. Three things it cannot do, each a reason
to fall back to a transaction:

* a path whose type changes (file, directory, symlink) between the versions;
* an argument the ``cvmfs_server`` script would garble: it re-reads the values of ``-b``
  and ``-d`` through a shell unquoted (its ``ingest`` function builds one command string),
  so only names of :data:`ARGUMENT_SAFE` characters pass through unchanged, and one
  version joins several ``-d`` values with ``:``;
* on a gateway repository, deletions together with an archive, or more than one
  deletion: the script refuses both (``Could not delete and add a file in the same
  transaction while using gateway``).

The last two are read in the script's source (cvmfs/server/cvmfs_server_ingest.sh), not
recorded.

:func:`already_live` tells whether what is live under the base is the archive already (a
run after a crash must not publish it a second time), and :func:`live_types` turns what is
live into the ``live`` argument of :func:`plan_replacement`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cvmfs_syncd.ingest.model import Manifest, MemberKind
from cvmfs_syncd.model import EntryType, Fingerprint

#: The empty file that marks a nested catalog: ``ingest -c`` leaves it at the base
#: (m2_ingest 11), and a transaction makes the catalog by writing it.
CATALOG_MARKER = ".cvmfscatalog"

#: Characters of a repository path that pass through the script's unquoted shell word
#: unchanged (no globbing, splitting, expansion, quoting or escapes; no ``:``).
ARGUMENT_SAFE = r"A-Za-z0-9._+@%=,/-"
_ARGUMENT = re.compile(f"[{ARGUMENT_SAFE}]+")


def ingest_argument_safe(path: str) -> bool:
    """Return True if repository path ``path`` can be given to ``ingest -b`` or ``-d`` as is."""
    return _ARGUMENT.fullmatch(path) is not None and "//" not in path


@dataclass(frozen=True, slots=True)
class ReplacePlan:
    """What replacing a base's content with a new archive takes (repository paths, sorted).

    ``deletes``: the ``--delete`` arguments, live paths the new archive does not have,
    top-most only (what is below a deleted directory goes with it). ``type_changes``:
    paths whose type differs between what is live and the new archive. ``unsafe_arguments``:
    the base and deletions that cannot be passed to ``ingest`` on its command line.
    """

    deletes: tuple[str, ...]
    type_changes: tuple[str, ...]
    unsafe_arguments: tuple[str, ...]

    @property
    def needs_transaction(self) -> bool:
        """Return True if no ``ingest`` call can make this replacement: publish it in a
        transaction instead."""
        return bool(self.type_changes or self.unsafe_arguments)

    def fits_one_ingest(self, *, gateway: bool) -> bool:
        """Return True if one ``ingest -t - -b BASE [-d PATH]...`` call makes the replacement
        (``gateway``: the repository publishes through a gateway)."""
        if self.needs_transaction:
            return False
        return not (gateway and self.deletes)


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if rel else base


def plan_replacement(
    base: str, new: Mapping[str, EntryType], live: Mapping[str, EntryType]
) -> ReplacePlan:
    """Plan replacing what is live under ``base`` with a new archive's content.

    ``base``: the repository path the archive is published under (``sw/foo``, not the
    root). ``new``: every path the new archive publishes, relative to the base, with its
    type (:meth:`cvmfs_syncd.ingest.model.Manifest.entries`). ``live``: what the index
    says is live below the base, the same way; a ``""`` key is the base itself, which
    must be a directory (anything else is a type change).
    """
    deleted = {path for path in live if path and path not in new}
    deletes = []
    for path in deleted:
        parent = path
        while (cut := parent.rfind("/")) > 0:
            parent = parent[:cut]
            if parent in deleted:
                break
        else:
            deletes.append(path)
    changes = [path for path, kind in live.items() if path in new and new[path] is not kind]
    if live.get("", EntryType.DIRECTORY) is not EntryType.DIRECTORY:
        changes.append("")
    arguments = [base, *(_join(base, path) for path in deletes)]
    return ReplacePlan(
        deletes=tuple(sorted(_join(base, path) for path in deletes)),
        type_changes=tuple(sorted(_join(base, path) for path in changes)),
        unsafe_arguments=tuple(sorted(arg for arg in arguments if not ingest_argument_safe(arg))),
    )


def live_types(manifest: Manifest, live: Mapping[str, Fingerprint]) -> dict[str, EntryType]:
    """Return what is live below a base (paths relative to it, ``""`` the base itself) as
    :func:`plan_replacement` takes it: the base's catalog marker is left out unless the
    archive has one, so that replacing never deletes the nested catalog."""
    new = manifest.entries()
    return {
        path: entry.type
        for path, entry in live.items()
        if path != CATALOG_MARKER or CATALOG_MARKER in new
    }


def already_live(manifest: Manifest, live: Mapping[str, Fingerprint]) -> bool:
    """Return True if ``live`` (what is live below the base, paths relative to it, ``""``
    the base itself) is exactly what the archive of ``manifest`` publishes.

    Compared: the set of paths, each one's type, a file's size (a hard link's is its
    target's) and a symlink's target. Not compared: modes and times (an equal tree that
    differs only there is not worth a revision), and the base's catalog marker when the
    archive has none.
    """
    base = live.get("")
    if base is None or base.type is not EntryType.DIRECTORY:
        return False
    sizes = {m.path: m.size for m in manifest.members if m.kind is MemberKind.FILE}
    directory = (EntryType.DIRECTORY, 0, "")
    expected = dict.fromkeys(manifest.implied_directories, directory)
    for member in manifest.members:
        if member.kind is MemberKind.HARDLINK:
            size = sizes.get(member.link_target or "", -1)
            expected[member.path] = (EntryType.FILE, size, "")
        elif member.kind is MemberKind.SYMLINK:
            expected[member.path] = (EntryType.SYMLINK, 0, member.link_target or "")
        else:
            expected[member.path] = (member.kind.entry_type, member.size, "")
    found = {path: entry for path, entry in live.items() if path}
    if CATALOG_MARKER not in expected:
        found.pop(CATALOG_MARKER, None)
    if found.keys() != expected.keys():
        return False
    for path, entry in found.items():
        kind, size, target = expected[path]
        if entry.type is not kind:
            return False
        if kind is EntryType.FILE and entry.size != size:
            return False
        if kind is EntryType.SYMLINK and entry.target != target:
            return False
    return True
