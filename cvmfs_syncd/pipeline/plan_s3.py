"""plan, for S3 prefixes: pure decisions about each pending path of a listing.

The S3 source observes (its latest listing, the index, set-aside records, which keys a
download found changed) and records one :class:`ListedObservation` per pending entry;
:func:`plan_listed` decides. No I/O, no clock: ``now`` is a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.ingest import RefusedDrop
from cvmfs_syncd.model import EntryType, Fingerprint, HoldReason, Op, OpKind, SetAside
from cvmfs_syncd.pipeline.plan import (
    COPY_ONLY,
    ContentPolicy,
    IngestBases,
    Planned,
    drop_verdict,
    drops_first,
    file_op_kind,
    hold_deletes,
)
from cvmfs_syncd.planner import deletion_guard

#: Mode of the directories implied by keys.
DIR_MODE = 0o755
#: The fingerprint of every directory implied by keys.
LISTED_DIRECTORY = Fingerprint(EntryType.DIRECTORY, DIR_MODE)


@dataclass(frozen=True, slots=True)
class ListingPolicy:
    """What an S3 source's configuration says about planning (``S3Config``).

    ``where`` names the prefix for operators (``s3://bucket/prefix/``); ``full_prefix``
    is the key prefix (a directory's source path is ``full_prefix + rel + "/"``).
    """

    source: str
    mirror: bool = True
    content: ContentPolicy = COPY_ONLY
    ready_marker: str = ""
    prepare: bool = True
    copy_below: int = 1024 * 1024
    poll_seconds: float = 30.0
    max_delete_share: float = 0.5
    where: str = ""
    full_prefix: str = ""


@dataclass(frozen=True, slots=True)
class Listed:
    """The listed object that provides a path.

    ``stable``: the same size and ETag in two listings a poll interval apart; ``stale``:
    a download found the bucket ahead of the listing (not planned before the next one).
    """

    key: str
    fingerprint: Fingerprint
    stable: bool = False
    stale: bool = False


@dataclass(frozen=True, slots=True)
class ListedObservation:
    """What the S3 source saw of one pending entry in its latest listing and the index.

    ``repo_path``/``unmappable``: the mapped repository path, or why there is none.
    ``listed``: the object providing the path (None when no key does); ``directory``: the
    path is a directory implied by keys below it, ``dir_ready`` with at least one of them
    ready; ``marker``: the ready marker of the path's top-level directory is listed.
    ``live``/``live_source``/``live_source_path``: the index entry at ``repo_path``.
    ``set_aside``/``aside``: a set-aside record of the key exists, with its fingerprint
    (looked up only for an object that differs from what is live).

    Tarball drops (``tarballs = "ingest"``): ``drop`` says the path is a top-level tarball
    name and ``repo_path`` is its base; ``refused_drop`` why it is no drop;
    ``live_elsewhere`` that the entry live at ``repo_path`` came from another tarball;
    ``live_below``: for a drop whose tarball is gone, the live paths deleting its base
    removes.
    """

    entry: Pending
    repo_path: str = ""
    unmappable: str = ""
    listed: Listed | None = None
    directory: bool = False
    dir_ready: bool = False
    marker: bool = False
    live: Fingerprint | None = None
    live_source: str = ""
    live_source_path: str = ""
    set_aside: bool = False
    aside: Fingerprint | None = None
    drop: bool = False
    refused_drop: RefusedDrop | None = None
    live_elsewhere: bool = False
    live_below: int = 0


@dataclass(frozen=True, slots=True)
class ListingView:
    """What the S3 source saw of itself.

    ``usable``: a listing is there and the source is up; ``retry_at``: until when it
    backs off after a failed download; ``listed_at``: when the listing was made;
    ``empty``: it holds no publishable key; ``live_count``: the paths this source has live
    (looked at only when a plan deletes).
    """

    usable: bool
    listed_at: float = 0.0
    retry_at: float = 0.0
    empty: bool = False
    live_count: int = 0


def listed_ready(rel: str, stable: bool, marker: bool, ready_marker: str) -> bool:
    """Return True if an object may be published: inside a ready-marker directory once
    the marker is listed, elsewhere once stable."""
    if ready_marker and "/" in rel:
        return marker
    return stable


def _mine(obs: ListedObservation, policy: ListingPolicy) -> bool:
    return obs.live is not None and obs.live_source == policy.source and not obs.live_elsewhere


def listed_unchanged(obs: ListedObservation, policy: ListingPolicy) -> bool:
    """Return True if the listed object is what this source has live already."""
    return (
        obs.listed is not None
        and _mine(obs, policy)
        and obs.live is not None
        and obs.live.same_content(obs.listed.fingerprint)
    )


def listed_deletes(obs: ListedObservation, policy: ListingPolicy) -> bool:
    """Return True if the entry is a deletion: gone from the listing, live from here."""
    return (
        bool(obs.entry.rel_path)
        and not obs.unmappable
        and obs.listed is None
        and not obs.directory
        and policy.mirror
        and _mine(obs, policy)
    )


def listing_waits(view: ListingView, now: float) -> bool:
    """Return True if nothing can be planned now (no listing, source down, backing off)."""
    return not view.usable or now < view.retry_at


def plan_listed(
    observations: Sequence[ListedObservation],
    view: ListingView,
    policy: ListingPolicy,
    now: float,
) -> Planned:
    """Decide what a batch does with each pending path of an S3 source.

    Everything is deferred while the source is down or backing off. Objects not yet
    ready (stable, or their ready marker listed) are deferred until the next listing;
    those whose ready marker is missing wait for it; a ready-marker directory goes live
    in one revision. A tarball drop that is ready becomes an INGEST op at its base, and
    what else the plan does there waits for it; one that is no drop is set aside.
    Deletions (mirror mode; a gone tarball's base counted with everything below it) pass
    the mass-deletion guard, and an empty listing while paths are live holds them
    however few they are.
    """
    result = Planned()
    plan = result.plan
    if listing_waits(view, now):
        later = max(view.retry_at, now + min(policy.poll_seconds, 30.0))
        plan.deferred = [o.entry.deferred_until(later) for o in observations]
        return result
    marker = policy.ready_marker
    groups: dict[str, list[str]] = {}
    deletes: dict[str, int] = {}  # path -> the live paths deleting it removes
    next_listing = max(view.listed_at + policy.poll_seconds, now + 1.0)
    ingests = IngestBases(next_listing)
    for obs in drops_first(observations):
        entry = obs.entry
        rel = entry.rel_path
        if not rel or obs.unmappable:
            continue  # hints carry mapped paths only; nothing else can be published
        path = obs.repo_path
        top, sep, _ = rel.partition("/")
        listed = obs.listed
        if listed is not None:
            if listed_unchanged(obs, policy):
                continue
            if obs.set_aside:
                if obs.aside is not None and obs.aside.same_content(listed.fingerprint):
                    continue
                result.clear_set_aside.append(listed.key)
            if obs.refused_drop is not None:
                verdict = drop_verdict(obs.refused_drop)
                aside = SetAside(policy.source, listed.key, verdict.reason, refusal=verdict.code)
                plan.set_aside.append(aside)
                continue
            if marker and sep and not obs.marker:
                plan.waiting_for_marker.append(entry)
                continue
            if not listed_ready(rel, listed.stable, obs.marker, marker) or listed.stale:
                plan.deferred.append(entry.deferred_until(next_listing))
                continue
            kind = (
                OpKind.INGEST
                if obs.drop
                else file_op_kind(
                    rel.rsplit("/", 1)[-1],
                    listed.fingerprint.size,
                    policy.content,
                    prepare=policy.prepare,
                    graft_at=policy.copy_below,
                )
            )
            op = Op(kind, path, policy.source, listed.key, listed.fingerprint)
        elif obs.directory:
            if obs.live is not None and obs.live.type is EntryType.DIRECTORY:
                continue
            if not obs.dir_ready:
                if marker and not obs.marker:
                    plan.waiting_for_marker.append(entry)
                else:
                    plan.deferred.append(entry.deferred_until(next_listing))
                continue
            source_path = policy.full_prefix + rel + "/"
            op = Op(OpKind.MAKE_DIR, path, policy.source, source_path, LISTED_DIRECTORY)
        elif listed_deletes(obs, policy):
            # Counted once per path: every live path below a vanished directory is
            # hinted too (no index scan per deletion, which is quadratic for a prefix
            # of 100 000 keys that was emptied).
            op = Op(OpKind.DELETE, path, policy.source, obs.live_source_path)
            if ingests.add(plan, entry, op):
                deletes[path] = max(1, obs.live_below)
            continue
        else:
            continue
        if not ingests.add(plan, entry, op):
            continue
        if marker and (sep or obs.directory):  # the top directory too
            groups.setdefault(top, []).append(path)
    plan.atomic_groups = [paths for paths in groups.values() if paths]
    deleted = sum(deletes[o.repo_path] for o in plan.ops if o.kind is OpKind.DELETE)
    if deleted:
        live = view.live_count
        # "Empty" means no publishable key: folder markers ("dir/"), refused keys and ready
        # markers left behind in an emptied prefix must not disarm the guard.
        if view.empty and live:
            why = (
                f"the listing of {policy.where} is empty while {live} paths from it are "
                "live (emptied or wrong prefix?); run 'cvmfs-syncd release' to confirm"
            )
        else:
            why = deletion_guard(deleted, live, policy.max_delete_share)
        if why:
            hold_deletes(plan, why, HoldReason.MASS_DELETE)
    return result
