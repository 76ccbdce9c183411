"""What an S3 source knows of one pending path, for :func:`plan_listed`, and what differs
between a listing and the index (the hints of a reconciliation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.pipeline.plan import ContentPolicy
from cvmfs_syncd.pipeline.plan_s3 import Listed, ListedObservation, ListingPolicy, listed_unchanged
from cvmfs_syncd.sources.drops import Drops, drop_path, ingested_from
from cvmfs_syncd.sources.s3_listing import Listing
from cvmfs_syncd.state import PublishedEntry

#: A set-aside record: (reason, the fingerprint of the version set aside).
Aside = tuple[str, Fingerprint | None]


def listing_drops(listing: Listing, config: S3Config) -> Drops:
    """The top-level tarballs of a listing (top-level directories are never tarballs)."""
    tops = {rel for rel in listing.winners if "/" not in rel}
    dirs = {rel for rel in listing.dirs if "/" not in rel}
    return Drops.find(tops | dirs, dirs, allow_reserved_names=config.allow_reserved_names)


def _source_rel(key: str, full_prefix: str) -> str:
    return key[len(full_prefix) :] if key.startswith(full_prefix) else ""


def listing_policy(config: S3Config, content: ContentPolicy, full_prefix: str) -> ListingPolicy:
    """The settings of a source that :func:`plan_listed` needs."""
    return ListingPolicy(
        source=config.name,
        mirror=config.mode == "mirror",
        content=content,
        ready_marker=config.ready_marker,
        prepare=config.prepare,
        copy_below=config.copy_below,
        poll_seconds=config.poll_seconds,
        max_delete_share=config.max_delete_share,
        where=f"s3://{config.bucket}/{full_prefix}",
        full_prefix=full_prefix,
    )


def observe_entry(
    entry: Pending,
    *,
    listing: Listing,
    live_of: Callable[[str], PublishedEntry | None],
    policy: ListingPolicy,
    target: str,
    is_stale: Callable[[str], bool],
    set_aside: Callable[[str], Aside | None],
    drops: Drops | None = None,
    count_below: Callable[[str], int] = lambda _: 0,
) -> ListedObservation:
    """Look up one pending path in the listing, the index and the set-aside records.

    ``drops``: the listing's tarball drops when the source ingests them (a drop's path is
    its base); ``count_below(path)``: the live paths at and below ``path`` (asked only for
    a gone tarball's base).
    """
    rel = entry.rel_path
    if not rel:
        return ListedObservation(entry)
    drop = drops is not None and drops.is_drop(rel)
    try:
        path = (drop_path(target, rel) or "") if drop else repo_path(target, rel)
    except UnsafeName as exc:
        return ListedObservation(entry, unmappable=str(exc))
    live = live_of(path)
    key = listing.winners.get(rel)
    if live is None:
        elsewhere = False
    elif drop:
        elsewhere = live.source_path != (key or policy.full_prefix + rel)
    else:
        elsewhere = ingested_from(target, path, _source_rel(live.source_path, policy.full_prefix))
    listed = None
    if key is not None:
        obj = listing.objects[key]
        listed = Listed(key, obj.fingerprint(), obj.stable, is_stale(key))
    obs = ListedObservation(
        entry,
        repo_path=path,
        listed=listed,
        directory=rel in listing.dirs,
        dir_ready=rel in listing.ready_dirs,
        marker=rel.partition("/")[0] in listing.markers,
        live=live.fingerprint if live is not None else None,
        live_source=live.source if live is not None else "",
        live_source_path=live.source_path if live is not None else "",
        drop=drop,
        refused_drop=drops.refused.get(rel) if drops is not None else None,
        live_elsewhere=elsewhere,
    )
    if key is not None and not listed_unchanged(obs, policy):
        aside = set_aside(key)
        if aside is not None:
            obs = replace(obs, set_aside=True, aside=aside[1])
    if drop and key is None and live is not None and not elsewhere:
        obs = replace(obs, live_below=count_below(path))
    return obs


def listing_differences(
    listing: Listing,
    live_entries: Iterable[PublishedEntry],
    *,
    policy: ListingPolicy,
    target: str,
    drops: Drops | None,
    aside_of: Callable[[str], Aside | None],
) -> tuple[list[str], list[tuple[str, Fingerprint]]]:
    """Compare ``listing`` with what the source has live (``live_entries``, the index
    below its target); return the source paths to hint, sorted, and the (key, version)
    of each listed object that is live already (inbox mode deletes those).

    A hint goes to every object that differs from what is live (unless that version is
    set aside), every directory not live as one, and, in mirror mode, every live path no
    longer listed. With ``drops``, what an ingest published is compared through its
    tarball: the tarball is hinted when its base differs from it, or (mirror mode) once
    when it is no longer listed; a refused tarball once, until it is set aside.
    """
    target_path = repo_path(target, "")
    live: dict[str, PublishedEntry] = {}
    ingested: dict[str, PublishedEntry] = {}  # tarball source path -> a row it wrote
    bases: dict[str, PublishedEntry] = {}  # an ingest's base -> its row
    for row in live_entries:
        source_rel = _source_rel(row.source_path, policy.full_prefix)
        if drops is not None and ingested_from(target, row.path, source_rel):
            ingested.setdefault(source_rel, row)
            if row.path == drop_path(target, source_rel):
                bases[row.path] = row
        else:
            live[row.path] = row
    rels: set[str] = set()
    expected: set[str] = set()
    here: list[tuple[str, Fingerprint]] = []
    for rel, key in listing.winners.items():
        fp = listing.objects[key].fingerprint()
        entry: PublishedEntry | None
        if drops is not None and drops.is_drop(rel):
            entry = bases.get(drop_path(target, rel) or "")
            if entry is not None and entry.source_path != key:
                entry = None
        elif drops is not None and rel in drops.refused:
            if aside_of(key) is None:
                rels.add(rel)
            continue
        else:
            path = repo_path(target, rel)
            expected.add(path)
            entry = live.get(path)
        if entry is not None and entry.fingerprint.same_content(fp):
            here.append((key, fp))
            continue
        aside = aside_of(key)
        if aside is not None and aside[1] is not None and aside[1].same_content(fp):
            continue
        rels.add(rel)
    for rel in listing.dirs:
        path = repo_path(target, rel)
        expected.add(path)
        found = live.get(path)
        if found is None or found.fingerprint.type is not EntryType.DIRECTORY:
            rels.add(rel)
    if policy.mirror:
        for path in live:
            if path not in expected and path != target_path:
                rels.add(path[len(target_path) + 1 :] if target_path else path)
        rels.update(rel for rel in ingested if rel not in listing.winners)
    return sorted(rels), here
