"""Listings of an S3 prefix: listing it, mapping its keys to paths, what changed.

A listing maps every key below the prefix to exactly one safe path inside the target
(:func:`cvmfs_syncd.paths.resolve_key_collisions`) or refuses it; directories are implied
by the keys below them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import SourceError
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import ListedObject
from cvmfs_syncd.paths import KeyRefused, resolve_key_collisions
from cvmfs_syncd.pipeline.plan_s3 import listed_ready
from cvmfs_syncd.sources.s3_client import describe, s3_errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: key -> (size, ETag, LastModified in ISO 8601), as ListObjectsV2 returned it.
Found = dict[str, tuple[int, str, str]]


@dataclass(frozen=True)
class Listing:
    """What one successful listing of the prefix says should be published.

    ``winners`` maps each source-relative path to the key that provides it (ready markers
    left out), ``dirs`` are the directories those paths imply, ``ready_dirs`` the ones
    with at least one object ready to publish below them, ``markers`` the top-level
    directories holding the ready marker, ``refused`` every key that maps to no path.
    """

    objects: dict[str, ListedObject]
    winners: dict[str, str]
    dirs: frozenset[str]
    ready_dirs: frozenset[str]
    markers: frozenset[str]
    refused: list[tuple[str, KeyRefused]]
    listed_at: float


def parents(rel: str) -> Iterator[str]:
    """The directories above ``rel``, outermost first."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


def full_prefix(prefix: str) -> str:
    """The prefix as listed: it names a directory, so "builds" lists "builds/…", never
    "builds2/…"."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def list_prefix(
    client: Callable[[], S3Client], config: S3Config, prefix: str, page_size: int
) -> Found:
    """List ``prefix`` of the source's bucket; raise SourceError.

    A listing is all or nothing: a page that fails fails the listing, so a partial
    result is never mistaken for deleted keys.
    """
    found: Found = {}
    try:
        paginator = client().get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=config.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            for item in page.get("Contents", []):
                modified = item["LastModified"]
                found[item["Key"]] = (int(item["Size"]), item["ETag"], modified.isoformat())
    except SourceError:
        raise
    except s3_errors() as exc:
        raise SourceError(
            f"listing s3://{config.bucket}/{prefix} at "
            f"{config.endpoint_url or 'AWS'} failed: {describe(exc)}"
        ) from exc
    return found


def build_listing(
    found: Found,
    before: dict[str, ListedObject],
    previous: Listing | None,
    config: S3Config,
    now: float,
) -> tuple[Listing, dict[str, ListedObject], list[str]]:
    """Turn a raw listing into a :class:`Listing`, with the objects that changed since
    ``before`` (the stored listing) and the keys gone from it."""
    objects: dict[str, ListedObject] = {}
    changed: dict[str, ListedObject] = {}
    for key, (size, etag, modified) in found.items():
        old = before.get(key)
        if old is not None and old.size == size and old.etag == etag:
            # Stable once unchanged for a poll interval: listings spaced that far apart
            # (the poller's) or a later one-shot listing, never two back to back.
            stable = old.stable or now - old.first_seen >= config.poll_seconds
            obj = ListedObject(key, size, etag, modified, old.first_seen, stable)
        else:
            obj = ListedObject(key, size, etag, modified, now, False)
        objects[key] = obj
        if obj != old:
            changed[key] = obj
    removed = [key for key in before if key not in found]
    if previous is not None and previous.objects.keys() == found.keys():
        # Same keys: the mapping depends on the keys only, so keep it (with 100 000
        # keys this is most of a poll's work).
        winners, refused, markers = previous.winners, previous.refused, previous.markers
        dirs = previous.dirs
    else:
        winners, refused, markers = map_keys(found, config)
        dirs = frozenset(parent for rel in winners for parent in parents(rel))
    ready_dirs: set[str] = set()
    for rel, key in winners.items():
        top = rel.partition("/")[0]
        if listed_ready(rel, objects[key].stable, top in markers, config.ready_marker):
            ready_dirs.update(parents(rel))
    listing = Listing(
        objects=objects,
        winners=winners,
        dirs=dirs,
        ready_dirs=frozenset(ready_dirs),
        markers=markers,
        refused=refused,
        listed_at=now,
    )
    return listing, changed, removed


def map_keys(
    found: Found, config: S3Config
) -> tuple[dict[str, str], list[tuple[str, KeyRefused]], frozenset[str]]:
    """Map keys to paths: (winners without ready markers, refused keys, marker dirs)."""
    winners, refused = resolve_key_collisions(
        found, config.prefix, allow_reserved_names=config.allow_reserved_names
    )
    marker = config.ready_marker
    if not marker:
        return winners, refused, frozenset()
    skip = len(full_prefix(config.prefix))
    markers: set[str] = set()
    for key in found:
        top, sep, rest = key[skip:].partition("/")
        if sep and rest == marker:
            markers.add(top)
    winners = {
        rel: key
        for rel, key in winners.items()
        if not (rel.count("/") == 1 and rel.endswith("/" + marker))
    }
    return winners, refused, frozenset(markers)


def changed_paths(old: Listing, new: Listing) -> set[str]:
    """The source-relative paths whose publishing may differ between two listings."""
    rels: set[str] = set()
    for rel, key in new.winners.items():
        if old.winners.get(rel) != key or not new.objects[key].same_version(old.objects.get(key)):
            rels.add(rel)
    rels.update(rel for rel in old.winners if rel not in new.winners)
    rels.update(old.dirs ^ new.dirs)
    rels.update(new.ready_dirs - old.ready_dirs)
    for top in new.markers - old.markers:
        below = top + "/"
        rels.update(r for r in new.winners if r.startswith(below))
        rels.update(d for d in new.dirs if d == top or d.startswith(below))
    return rels


class Refusals:
    """Logs and counts each refused key of a source once per version (not at every poll)."""

    def __init__(self, repo: str, source: str, metrics: Metrics) -> None:
        self._repo = repo
        self._source = source
        self._metrics = metrics
        self._lock = threading.Lock()
        self._reported: dict[str, tuple[str, str]] = {}

    def report(self, listing: Listing) -> None:
        """Log and count the refusals of ``listing`` not reported for that version yet."""
        reported: dict[str, tuple[str, str]] = {}
        with self._lock:
            before = self._reported
        for key, refusal in listing.refused:
            if refusal.ignorable:
                continue
            obj = listing.objects.get(key)
            signature = (obj.etag if obj else "", refusal.reason.value)
            reported[key] = signature
            if before.get(key) == signature:
                continue
            self._metrics.skipped.labels(self._repo, self._source, refusal.reason.value).inc()
            log.warning(
                "S3 key refused",
                source=self._source,
                key=repr(key)[:300],
                reason=refusal.reason.value,
                detail=refusal.detail[:300],
            )
        with self._lock:
            self._reported = reported
