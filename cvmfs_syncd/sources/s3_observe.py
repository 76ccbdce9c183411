"""What an S3 source knows of one pending path, for :func:`plan_listed`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.model import Fingerprint
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.pipeline.plan import ContentPolicy
from cvmfs_syncd.pipeline.plan_s3 import Listed, ListedObservation, ListingPolicy, listed_unchanged
from cvmfs_syncd.sources.s3_listing import Listing
from cvmfs_syncd.state import PublishedEntry


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
    set_aside: Callable[[str], tuple[str, Fingerprint | None] | None],
) -> ListedObservation:
    """Look up one pending path in the listing, the index and the set-aside records."""
    rel = entry.rel_path
    if not rel:
        return ListedObservation(entry)
    try:
        path = repo_path(target, rel)
    except UnsafeName as exc:
        return ListedObservation(entry, unmappable=str(exc))
    live = live_of(path)
    key = listing.winners.get(rel)
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
    )
    if key is not None and not listed_unchanged(obs, policy):
        aside = set_aside(key)
        if aside is not None:
            obs = replace(obs, set_aside=True, aside=aside[1])
    return obs
