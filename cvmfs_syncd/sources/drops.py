"""Tarball drops as a source sees them: which of its top-level names are drops now, where
each is published, and which live paths an ingest wrote.

A source with ``tarballs = "ingest"`` publishes a top-level ``foo.tar.gz`` as the
directory ``<target>/foo`` (its base). Every path an ingest publishes is recorded in the
index with the tarball as its input (source path and fingerprint), so the tarball's own
name settles a reconciliation scan, and its removal (mirror mode) deletes the base with
everything below it. The decisions themselves are :func:`cvmfs_syncd.ingest.find_drops`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_syncd.config import S3Config, StagingConfig
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.ingest import IngestLimits, RefusedDrop, find_drops, tarball_base
from cvmfs_syncd.paths import is_ignored, repo_path


@dataclass(frozen=True, slots=True)
class Drops:
    """The top-level tarballs of a source at one moment: ``bases`` maps each drop to its
    base name, ``refused`` each other tarball to why it is no drop; ``present`` holds every
    top-level name there is."""

    bases: dict[str, str] = field(default_factory=dict)
    refused: dict[str, RefusedDrop] = field(default_factory=dict)
    present: frozenset[str] = frozenset()

    @classmethod
    def find(
        cls, names: Iterable[str], plain: Collection[str], *, allow_reserved_names: bool
    ) -> Drops:
        """Sort the top-level ``names`` of a source (``plain``: those that are never
        tarballs, such as directories and symlinks) with :func:`find_drops`."""
        present = frozenset(names)
        bases, refused = find_drops(present, plain, allow_reserved_names=allow_reserved_names)
        return cls(bases, {drop.name: drop for drop in refused}, present)

    def is_drop(self, rel: str) -> bool:
        """Return True if source path ``rel`` is published as a base: a drop, or a
        top-level tarball name that is gone (whose base a mirror source deletes)."""
        if top_level_tarball(rel) is None:
            return False
        return rel in self.bases or rel not in self.present


def staged_drops(root: Path, ignore: tuple[str, ...], allow_reserved_names: bool) -> Drops:
    """The drops of a staging directory: its top-level names (ignored ones left out; an
    unreadable directory has none), directories and symlinks never being tarballs."""
    names: list[str] = []
    plain: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(root) as listing:
        for item in listing:
            if is_ignored(item.name, ignore):
                continue
            names.append(item.name)
            if not item.is_file(follow_symlinks=False):
                plain.add(item.name)
    return Drops.find(names, plain, allow_reserved_names=allow_reserved_names)


def sharing_base(rel: str, reported: MutableMapping[str, str]) -> list[str]:
    """Return the top-level tarballs in ``reported`` (refused or skipped before) whose base
    is the one of the top-level name ``rel`` (its own name if it is no tarball), and
    forget them there: a change to ``rel`` may end their refusal."""
    if "/" in rel or not rel:
        return []
    base = top_level_tarball(rel) or rel
    others = [r for r in reported if r != rel and top_level_tarball(r) == base]
    for other in others:
        del reported[other]
    return others


def forget_resolved(reported: MutableMapping[str, str], drops: Drops) -> None:
    """Forget, in ``reported``, the refusals of tarballs that are drops now (the name that
    took their base is gone), so that the next scan plans them again."""
    for rel in [rel for rel in reported if rel in drops.bases]:
        del reported[rel]


def top_level_tarball(rel: str) -> str | None:
    """Return the base of source path ``rel`` if it is a top-level name with a tarball
    suffix (``foo`` for ``foo.tgz``), else None."""
    return None if "/" in rel else tarball_base(rel)


def is_drop(config: StagingConfig | S3Config, rel: str) -> bool:
    """Return whether source path ``rel`` is a tarball drop of a source configured so."""
    return config.tarballs == "ingest" and top_level_tarball(rel) is not None


def arrives_whole(
    config: StagingConfig | S3Config, rel: str, event_type: str, is_directory: bool
) -> bool:
    """Whether a watcher's event (watchdog's type) says the file at ``rel`` is no longer
    being written: a close after writing, a deletion, or a tarball drop that appeared.

    A drop moved in from outside the directory arrives as "created" and no close follows,
    so it would look written to until the quiet period ends; one created in place gets
    "modified" events next, which mark it as being written again. Either way the settle
    time and the writer check still decide when it is read.
    """
    if event_type in ("closed", "deleted"):
        return True
    return event_type == "created" and not is_directory and is_drop(config, rel)


def drop_path(target: str, rel: str) -> str | None:
    """Return the repository path a top-level tarball ``rel`` is published under (its
    base below ``target``), or None if ``rel`` is no tarball name. Raise UnsafeName if
    the base cannot be a repository path."""
    base = top_level_tarball(rel)
    return None if base is None else repo_path(target, base)


def ingested_from(target: str, path: str, source_rel: str) -> bool:
    """Return True if the live ``path``, recorded with the input ``source_rel``, was
    published by an ingest of that tarball: at or below the base it maps to."""
    try:
        base = drop_path(target, source_rel)
    except UnsafeName:
        return False
    return base is not None and (path == base or path.startswith(base + "/"))


def ingest_limits(config: StagingConfig | S3Config) -> IngestLimits:
    """What a tarball of the source may hold (its ``max_ingest_*`` and name keys)."""
    return IngestLimits(
        max_bytes=config.max_ingest_bytes,
        max_members=config.max_ingest_members,
        allow_absolute_symlinks=config.allow_absolute_symlinks,
        allow_reserved_names=config.allow_reserved_names,
    )
