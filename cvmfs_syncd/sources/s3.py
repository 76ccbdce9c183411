"""S3 prefixes: a poller lists the prefix, the lane plans and applies what changed.

CI pipelines upload build outputs under a prefix of a bucket (MinIO or AWS). One poller
thread per source lists the prefix (paginated ``ListObjectsV2``) every ``poll_seconds``,
records the listing in the state database (so a restart neither republishes nor waits
again) and sends the lane a hint for every key that changed. As for staging directories
the hints are only hints: at batch time the source compares its latest listing with the
index of what is live and returns ops.

- **Keys to paths.** Every key below the prefix maps to exactly one safe path inside the
  target (:func:`cvmfs_syncd.paths.resolve_key_collisions`) or is refused, logged once and
  counted in ``cvmfs_syncd_inputs_skipped_total{reason=...}``. Directories are implied by
  the keys below them and published as directories, so mirror mode also removes a
  directory whose last key went away.
- **When an object is taken.** Once it had the same size and ETag in two listings at
  least ``poll_seconds`` apart, or at once when ``ready_marker`` is set and the marker key
  exists in its top-level directory (then the whole directory is published in one
  revision, like a staging directory).
- **How.** Objects of ``copy_below`` bytes or more are streamed once from ``GetObject``
  through the graft engine into the repository's own storage (verified object by object
  before anything enters the transaction), and only the empty placeholder and its
  ``.cvmfsgraft-`` file are written into the union directory: their content never touches
  the publishing host's disk. Smaller objects, and objects whose name is too long to
  carry the ``.cvmfsgraft-`` prefix, are downloaded into the union directory. Every
  download is pinned to the listed version with ``If-Match: <ETag>``.
- **Deletions.** Mirror mode deletes what vanished from the prefix, behind the same
  mass-deletion guard as staging sources; an empty listing while paths are live is held
  until ``cvmfs-syncd release`` (an emptied or mistyped prefix must not wipe the target).
  Inbox mode deletes each object from the bucket once it is live.
- **Outages.** A listing that fails (endpoint down, wrong credentials) marks the source
  down (``cvmfs_syncd_source_up`` 0, the reason in ``/status``), keeps the previous
  listing, backs off up to four poll intervals and recovers by itself; nothing is planned
  from a source that is down.
"""

from __future__ import annotations

import calendar
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from cvmfs_syncd import fsops
from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import SourceError, UnsafeName
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Dirty, EntryType, Fingerprint, Op, OpKind
from cvmfs_syncd.paths import KeyRefused, repo_path, resolve_key_collisions
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy
from cvmfs_syncd.pipeline.plan_s3 import (
    DIR_MODE,
    Listed,
    ListedObservation,
    ListingPolicy,
    ListingView,
    listed_deletes,
    listed_ready,
    listed_unchanged,
    listing_waits,
    plan_listed,
)
from cvmfs_syncd.pipeline.prepare import Content
from cvmfs_syncd.planner import Applied, ApplyOutcome, Plan
from cvmfs_syncd.state import PublishedEntry, State

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: Mode of every file published from S3 (objects carry no permissions).
FILE_MODE = 0o644
#: Keys per ListObjectsV2 page (the S3 maximum).
LIST_PAGE_SIZE = 1000
#: Bytes per read of a downloaded object.
READ_PIECE = 1 << 20
#: Above this many pending entries, plan() reads the source's whole index at once.
_BULK_LOOKUP = 256

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_CHANGED = frozenset({"PreconditionFailed", "412"})
_REFUSED = frozenset({"AccessDenied", "403", "InvalidObjectState"})

ClientFactory = Callable[[S3Config], "S3Client"]


# --------------------------------------------------------------------------- clients


def make_client(config: S3Config) -> S3Client:
    """Return an S3 client for a source; raise SourceError if it cannot be configured.

    With ``credentials_file`` the keys come from that AWS shared-credentials file (profile
    ``profile``), set on this client's own botocore session rather than through
    ``os.environ``, and an explicit profile keeps ``AWS_ACCESS_KEY_ID`` & co. from
    overriding it; without it boto3's standard chain applies. Custom endpoints (MinIO)
    get path-style addressing.
    """
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError

    core = botocore.session.get_session()
    explicit = config.credentials_file is not None or config.profile != "default"
    if config.credentials_file is not None:
        core.set_config_variable("credentials_file", os.fspath(config.credentials_file))
    try:
        session = boto3.session.Session(
            botocore_session=core, profile_name=config.profile if explicit else None
        )
        client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            region_name=config.region or None,
            config=BotoConfig(
                connect_timeout=5,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path"} if config.endpoint_url else {},
            ),
        )
    except BotoCoreError as exc:
        raise SourceError(f"cannot configure the S3 client: {exc}") from exc
    return client


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


def _describe(exc: BaseException) -> str:
    """Say what went wrong without anything a request carried (no credentials, no URLs
    with signatures): the error code and HTTP status, or botocore's own sentence."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{_error_code(exc)}" + (f" (HTTP {status})" if status else "")
    return str(exc)[:300] or type(exc).__name__


def _s3_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exceptions a boto3 call raises when S3 cannot be used (plus ``extra``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, OSError, *extra)


# --------------------------------------------------------------------------- listings


@dataclass(frozen=True, slots=True)
class ListedObject:
    """One object as a listing showed it.

    ``last_modified`` is the listing's timestamp in ISO 8601 (kept as text in the state
    database); ``stable`` is True once the same size and ETag were seen in two listings at
    least ``poll_seconds`` apart.
    """

    key: str
    size: int
    etag: str
    last_modified: str
    first_seen: float
    stable: bool

    @property
    def mtime_ns(self) -> int:
        """``last_modified`` in nanoseconds since the epoch (the published mtime)."""
        moment = datetime.fromisoformat(self.last_modified)
        return calendar.timegm(moment.utctimetuple()) * 10**9 + moment.microsecond * 1000

    def fingerprint(self) -> Fingerprint:
        """The fingerprint the index records for this version of the object."""
        return Fingerprint(EntryType.FILE, FILE_MODE, self.size, self.mtime_ns, etag=self.etag)

    def row(self) -> tuple[int, str, str, float, int]:
        """The state database row (size, etag, last_modified, first_seen, stable)."""
        return (self.size, self.etag, self.last_modified, self.first_seen, int(self.stable))

    def same_version(self, other: ListedObject | None) -> bool:
        """True if ``other`` is the same version in the same readiness state."""
        return other is not None and (
            self.size,
            self.etag,
            self.last_modified,
            self.stable,
        ) == (other.size, other.etag, other.last_modified, other.stable)


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


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


def _full_prefix(prefix: str) -> str:
    # A prefix names a directory: "builds" lists "builds/…", never "builds2/…".
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


# --------------------------------------------------------------------------- the source


@dataclass
class _Status:
    up: bool = False
    detail: str = "not listed yet"
    failures: int = 0
    retry_at: float = 0.0
    reported: dict[str, tuple[str, str]] = field(default_factory=dict)


class S3Input:
    """One ``[[repository.s3]]`` source of a repository.

    ``client_factory`` builds the S3 client (tests pass fakes); ``content`` says whether
    objects are prepared (stored in the repository by the lane before the transaction)
    or copied through it.
    """

    def __init__(
        self,
        repo: str,
        config: S3Config,
        state: State,
        metrics: Metrics,
        *,
        content: ContentPolicy = COPY_ONLY,
        clock: Callable[[], float] = time.time,
        client_factory: ClientFactory = make_client,
        page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        self.repo = repo
        self.config = config
        self.name = config.name
        self.state = state
        self.metrics = metrics
        self.content = content
        #: After a failed listing or download: one poll interval, doubling, at most four.
        self._retry = Backoff(config.poll_seconds, 4 * config.poll_seconds)
        #: True for a dry run: the bucket is only listed, nothing is deleted from it.
        self.read_only = False
        self.clock = clock
        self.page_size = page_size
        self.full_prefix = _full_prefix(config.prefix)
        self.target_path = repo_path(config.target, "")
        self._client_factory = client_factory
        self._client: S3Client | None = None
        self._client_signature: object = None
        self._retired: list[S3Client] = []
        self._lock = threading.Lock()  # guards the fields below and the client
        self._list_lock = threading.Lock()  # one listing at a time
        # Listings are stored per repository: two repositories may publish one prefix.
        self.listing_key = f"{repo}/{self.name}"
        self._stored = {
            key: ListedObject(key, size, etag, modified, first, bool(stable))
            for key, (size, etag, modified, first, stable) in state.s3_listing(
                self.listing_key
            ).items()
        }
        self._listing: Listing | None = None
        self._status = _Status()
        #: Keys found changed or gone at download time: not planned again before the next
        #: listing (cleared by every listing).
        self._stale: set[str] = set()
        self._submit: Callable[[Dirty], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, submit: Callable[[Dirty], None]) -> None:
        """Start the poller thread; hints go to ``submit``."""
        self._submit = submit
        self._stop.clear()
        thread = threading.Thread(
            target=self._poll_loop, name=f"s3-poll-{self.repo}-{self.config.bucket}", daemon=True
        )
        self._thread = thread
        thread.start()

    def stop(self) -> None:
        """Stop the poller and close connections (waits for a listing in progress)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=120)
        with self._lock:
            clients = [*self._retired, *([self._client] if self._client else [])]
            self._client, self._retired = None, []
        for client in clients:
            client.close()

    def alive(self) -> bool:
        """Return False if the poller thread died (listing failures are "down", not dead)."""
        thread = self._thread
        return thread is None or thread.is_alive()

    def health(self) -> tuple[bool, str]:
        """Return (up, detail): down while listings fail or the poller died."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return False, f"the poller of {self.name} died"
        with self._lock:
            return self._status.up, self._status.detail

    def _polling(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _set_up(self, up: bool, detail: str) -> None:
        with self._lock:
            changed = self._status.up != up or self._status.detail != detail
            self._status.up = up
            self._status.detail = detail
            if up:
                self._status.failures = 0
        self.metrics.source_up.labels(self.repo, self.name).set(1 if up else 0)
        if changed and not up:
            log.error("S3 source down", source=self.name, reason=detail)
        elif changed:
            log.info("S3 source up", source=self.name)

    # -- the client ------------------------------------------------------------------------

    def client(self) -> S3Client:
        """Return the S3 client, rebuilt when the credentials file changed on disk."""
        signature = self._credentials_signature()
        with self._lock:
            if self._client is not None and signature == self._client_signature:
                return self._client
            old = self._client
        fresh = self._client_factory(self.config)
        with self._lock:
            if old is not None:
                # The lane may be downloading with the old client right now: close it later.
                self._retired.append(old)
            self._client, self._client_signature = fresh, signature
        return fresh

    def _credentials_signature(self) -> object:
        path = self.config.credentials_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError as exc:
            return ("missing", exc.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- listing ---------------------------------------------------------------------------

    def _list(self) -> dict[str, tuple[int, str, str]]:
        """List the prefix: key -> (size, ETag, LastModified ISO); raise SourceError.

        A listing is all or nothing: a page that fails fails the listing, so a partial
        result is never mistaken for deleted keys.
        """
        found: dict[str, tuple[int, str, str]] = {}
        try:
            paginator = self.client().get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.config.bucket,
                Prefix=self.full_prefix,
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                for item in page.get("Contents", []):
                    modified = item["LastModified"]
                    found[item["Key"]] = (int(item["Size"]), item["ETag"], modified.isoformat())
        except SourceError:
            raise
        except _s3_errors() as exc:
            raise SourceError(
                f"listing s3://{self.config.bucket}/{self.full_prefix} at "
                f"{self.config.endpoint_url or 'AWS'} failed: {_describe(exc)}"
            ) from exc
        return found

    def refresh(self, now: float) -> tuple[Listing | None, Listing]:
        """List the prefix once and record it; return (previous listing, new listing).

        Raise SourceError (and mark the source down) if the listing fails; the previous
        listing stays in force then.
        """
        with self._list_lock:
            try:
                found = self._list()
            except SourceError as exc:
                with self._lock:
                    self._status.failures += 1
                self._set_up(False, str(exc))
                raise
            listing, changed, removed = self._build(found, now)
            self.state.update_s3_listing(
                self.listing_key, {k: o.row() for k, o in changed.items()}, removed
            )
            with self._lock:
                previous, self._listing = self._listing, listing
                self._stored = listing.objects
                self._stale.clear()
        self._set_up(True, "")
        self.metrics.s3_listed_objects.labels(self.repo, self.name).set(len(listing.objects))
        self.metrics.s3_last_listing.labels(self.repo, self.name).set(now)
        self._report_refusals(listing)
        return previous, listing

    def _build(
        self, found: dict[str, tuple[int, str, str]], now: float
    ) -> tuple[Listing, dict[str, ListedObject], list[str]]:
        """Turn a raw listing into a :class:`Listing`, with the rows that changed."""
        before = self._stored
        objects: dict[str, ListedObject] = {}
        changed: dict[str, ListedObject] = {}
        for key, (size, etag, modified) in found.items():
            old = before.get(key)
            if old is not None and old.size == size and old.etag == etag:
                # Stable once unchanged for a poll interval: listings spaced that far apart
                # (the poller's) or a later one-shot listing, never two back to back.
                stable = old.stable or now - old.first_seen >= self.config.poll_seconds
                obj = ListedObject(key, size, etag, modified, old.first_seen, stable)
            else:
                obj = ListedObject(key, size, etag, modified, now, False)
            objects[key] = obj
            if obj != old:
                changed[key] = obj
        removed = [key for key in before if key not in found]
        previous = self._listing
        if previous is not None and previous.objects.keys() == found.keys():
            # Same keys: the mapping depends on the keys only, so keep it (with 100 000
            # keys this is most of a poll's work).
            winners, refused, markers = previous.winners, previous.refused, previous.markers
            dirs = previous.dirs
        else:
            winners, refused, markers = self._map(found)
            dirs = frozenset(parent for rel in winners for parent in _parents(rel))
        ready_dirs: set[str] = set()
        for rel, key in winners.items():
            if self._ready(rel, objects[key], markers):
                ready_dirs.update(_parents(rel))
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

    def _map(
        self, found: dict[str, tuple[int, str, str]]
    ) -> tuple[dict[str, str], list[tuple[str, KeyRefused]], frozenset[str]]:
        """Map keys to paths: (winners without ready markers, refused keys, marker dirs)."""
        winners, refused = resolve_key_collisions(
            found, self.config.prefix, allow_reserved_names=self.config.allow_reserved_names
        )
        marker = self.config.ready_marker
        if not marker:
            return winners, refused, frozenset()
        markers: set[str] = set()
        for key in found:
            top, sep, rest = key[len(self.full_prefix) :].partition("/")
            if sep and rest == marker:
                markers.add(top)
        winners = {
            rel: key
            for rel, key in winners.items()
            if not (rel.count("/") == 1 and rel.endswith("/" + marker))
        }
        return winners, refused, frozenset(markers)

    def _ready(self, rel: str, obj: ListedObject, markers: frozenset[str]) -> bool:
        top = rel.partition("/")[0]
        return listed_ready(rel, obj.stable, top in markers, self.config.ready_marker)

    def _report_refusals(self, listing: Listing) -> None:
        """Log and count each refused key once per version (not at every poll)."""
        reported: dict[str, tuple[str, str]] = {}
        with self._lock:
            before = self._status.reported
        for key, refusal in listing.refused:
            if refusal.ignorable:
                continue
            obj = listing.objects.get(key)
            signature = (obj.etag if obj else "", refusal.reason.value)
            reported[key] = signature
            if before.get(key) == signature:
                continue
            self.metrics.skipped.labels(self.repo, self.name, refusal.reason.value).inc()
            log.warning(
                "S3 key refused",
                source=self.name,
                key=repr(key)[:300],
                reason=refusal.reason.value,
                detail=refusal.detail[:300],
            )
        with self._lock:
            self._status.reported = reported

    # -- polling ---------------------------------------------------------------------------

    def poll(self, now: float) -> list[Dirty]:
        """List once and return hints for what changed since the previous listing.

        The first listing of a process is compared with the index as a whole. Raise
        SourceError if the listing fails.
        """
        previous, listing = self.refresh(now)
        if previous is None:
            return self._differences(listing, now)
        return [
            Dirty(self.name, rel, now, closed=True)
            for rel in sorted(self._changed(previous, listing))
        ]

    def _changed(self, old: Listing, new: Listing) -> set[str]:
        rels: set[str] = set()
        for rel, key in new.winners.items():
            if old.winners.get(rel) != key or not new.objects[key].same_version(
                old.objects.get(key)
            ):
                rels.add(rel)
        rels.update(rel for rel in old.winners if rel not in new.winners)
        rels.update(old.dirs ^ new.dirs)
        rels.update(new.ready_dirs - old.ready_dirs)
        for top in new.markers - old.markers:
            below = top + "/"
            rels.update(r for r in new.winners if r.startswith(below))
            rels.update(d for d in new.dirs if d == top or d.startswith(below))
        return rels

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                hints = self.poll(self.clock())
            except SourceError:
                delay = self._backoff()
            except Exception as exc:
                log.exception("polling failed", source=self.name)
                with self._lock:
                    self._status.failures += 1
                self._set_up(False, f"polling failed: {exc}")
                delay = self._backoff()
            else:
                submit = self._submit
                if submit is not None:
                    for hint in hints:
                        submit(hint)
                delay = self.config.poll_seconds
            self._stop.wait(delay)

    def _backoff(self) -> float:
        """Seconds until the next attempt after a failure: doubling, at most 4 polls."""
        with self._lock:
            failures = self._status.failures
        return self._retry.delay(failures)

    # -- reconciliation --------------------------------------------------------------------

    def reconcile(self, now: float) -> list[Dirty]:
        """Compare the latest listing with the index; return a hint for each difference.

        Without a poller thread (``cvmfs-syncd sync``) this lists the prefix first and
        raises SourceError if that fails, so a one-shot sync never reports "in sync" for a
        prefix it could not read. With a poller it uses the poller's latest listing, and
        returns nothing before the first one (whose hints the poller sends itself).
        """
        listing = self._current(now, fresh=True)
        if listing is None:
            return []
        return self._differences(listing, now)

    def _current(self, now: float, *, fresh: bool = False) -> Listing | None:
        """The listing to work from. With a poller: its latest (None before the first).
        Without one: a new listing when ``fresh`` or when the last is a poll interval old."""
        with self._lock:
            listing = self._listing
        if self._polling():
            return listing
        if fresh or listing is None or now - listing.listed_at >= self.config.poll_seconds:
            _, listing = self.refresh(now)
        return listing

    def _rel(self, path: str) -> str:
        return path[len(self.target_path) + 1 :] if self.target_path else path

    def _path(self, rel: str) -> str:
        return f"{self.target_path}/{rel}" if self.target_path else rel

    def _differences(self, listing: Listing, now: float) -> list[Dirty]:
        live = {
            e.path: e for e in self.state.published_under(self.repo, self.target_path, self.name)
        }
        rels: list[str] = []
        expected: set[str] = set()
        published_here: list[tuple[str, Fingerprint]] = []
        for rel, key in listing.winners.items():
            path = self._path(rel)
            expected.add(path)
            fp = listing.objects[key].fingerprint()
            entry = live.get(path)
            if entry is not None and entry.fingerprint.same_content(fp):
                published_here.append((key, fp))
                continue
            aside = self.state.set_aside_entry(self.repo, self.name, key)
            if aside is not None and aside[1] is not None and aside[1].same_content(fp):
                continue
            rels.append(rel)
        for rel in listing.dirs:
            path = self._path(rel)
            expected.add(path)
            entry = live.get(path)
            if entry is None or entry.fingerprint.type is not EntryType.DIRECTORY:
                rels.append(rel)
        if self.config.mode == "mirror":
            rels += [self._rel(p) for p in live if p not in expected and p != self.target_path]
        elif published_here and not self.read_only:
            # Inbox: objects that are live but still in the bucket (a deletion after an
            # earlier publish failed) are removed now.
            for key, fp in published_here:
                self._delete_object(key, fp.etag)
        return [Dirty(self.name, rel, now, from_scan=True) for rel in sorted(set(rels))]

    # -- planning --------------------------------------------------------------------------

    def plan(self, entries: Sequence[Pending], now: float) -> Plan:
        """Turn pending paths into ops from the latest listing.

        Observes the source and every entry, lets :func:`plan_listed` decide (defer
        everything while the source is down or backing off after a failed download;
        defer objects not yet stable until the next listing, hold those whose ready
        marker is missing), then clears the set-aside records that no longer apply.
        """
        policy = self._policy()
        view, listing = self._view(now)
        observations = [ListedObservation(e) for e in entries]
        if listing is not None and not listing_waits(view, now):
            live_of = self._live_lookup(len(entries))
            observations = [self._observe(e, listing, live_of, policy) for e in entries]
            if any(listed_deletes(o, policy) for o in observations):
                view = replace(view, live_count=self.state.count_published(self.repo, self.name))
        result = plan_listed(observations, view, policy, now)
        for key in result.clear_set_aside:
            self.state.clear_set_aside(self.repo, self.name, key)
        return result.plan

    def _policy(self) -> ListingPolicy:
        config = self.config
        return ListingPolicy(
            source=self.name,
            mirror=config.mode == "mirror",
            content=self.content,
            ready_marker=config.ready_marker,
            prepare=config.prepare,
            copy_below=config.copy_below,
            poll_seconds=config.poll_seconds,
            max_delete_share=config.max_delete_share,
            where=f"s3://{config.bucket}/{self.full_prefix}",
            full_prefix=self.full_prefix,
        )

    def _view(self, now: float) -> tuple[ListingView, Listing | None]:
        """The listing to plan from (None if there is none) and what it says of the source."""
        try:
            listing = self._current(now)
        except SourceError:
            listing = None
        with self._lock:
            up = self._status.up
            retry_at = self._status.retry_at
        if listing is None:
            return ListingView(usable=False, retry_at=retry_at), None
        view = ListingView(
            usable=up, listed_at=listing.listed_at, retry_at=retry_at, empty=not listing.winners
        )
        return view, listing

    def _observe(
        self,
        entry: Pending,
        listing: Listing,
        live_of: Callable[[str], PublishedEntry | None],
        policy: ListingPolicy,
    ) -> ListedObservation:
        """Look up one pending path in the listing, the index and the set-aside records."""
        rel = entry.rel_path
        if not rel:
            return ListedObservation(entry)
        try:
            path = repo_path(self.config.target, rel)
        except UnsafeName as exc:
            return ListedObservation(entry, unmappable=str(exc))
        live = live_of(path)
        key = listing.winners.get(rel)
        listed = None
        if key is not None:
            obj = listing.objects[key]
            listed = Listed(key, obj.fingerprint(), obj.stable, self._is_stale(key))
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
            aside = self.state.set_aside_entry(self.repo, self.name, key)
            if aside is not None:
                obs = replace(obs, set_aside=True, aside=aside[1])
        return obs

    def _is_stale(self, key: str) -> bool:
        with self._lock:
            return key in self._stale

    def _live_lookup(self, count: int) -> Callable[[str], PublishedEntry | None]:
        if count <= _BULK_LOOKUP:
            return lambda path: self.state.published_entry(self.repo, path)
        everything = {
            e.path: e for e in self.state.published_under(self.repo, self.target_path, self.name)
        }
        return everything.get

    # -- applying --------------------------------------------------------------------------

    def apply(self, op: Op, union_dir: Path) -> Applied:
        """Carry out one op in the open transaction.

        Raises OSError when S3 or the repository's storage fails (the lane re-queues the
        op; this source then backs off before planning again).
        """
        if op.kind is OpKind.DELETE:
            fsops.delete(union_dir, op.repo_path)
            return Applied(ApplyOutcome.APPLIED)
        if op.kind is OpKind.MAKE_DIR:
            fsops.make_dir(union_dir, op.repo_path, DIR_MODE, replace=True)
            return Applied(ApplyOutcome.APPLIED)
        fp = op.fingerprint
        if fp is None or op.kind not in (OpKind.COPY_FILE, OpKind.GRAFT):
            return Applied(ApplyOutcome.REFUSED, f"an S3 source cannot {op.kind.value}")
        with self._lock:
            backing_off = self.clock() < self._status.retry_at
        if backing_off:
            # An earlier download of this batch failed: do not hold the transaction open
            # for a timeout per remaining object against a dead or hanging endpoint.
            raise OSError(errno.EAGAIN, f"{self.name} is backing off after a failed download")
        try:
            opened = self._open(op.source_path, fp)
            if isinstance(opened, Applied):
                result = opened
            else:
                # A GRAFT op reaches here only when its objects could not be prepared.
                try:
                    result = self._copy(op, fp, opened, union_dir)
                finally:
                    opened.close()
        except OSError as exc:
            self._trouble(str(exc))
            raise
        self._downloaded(op, result)
        return result

    def _downloaded(self, op: Op, result: Applied) -> None:
        with self._lock:
            self._status.retry_at = 0.0
            if result.outcome in (ApplyOutcome.CHANGED, ApplyOutcome.VANISHED):
                # The listing is behind the bucket: re-planning from it would only fail
                # again (and cost a transaction); wait for the next listing.
                self._stale.add(op.source_path)

    def open_content(self, op: Op) -> Content | Applied:
        """GET the planned version of ``op``'s object for preparing.

        Raises OSError when S3 fails (the op goes back to pending; this source backs off).
        """
        fp = op.fingerprint
        if fp is None or op.kind not in (OpKind.COPY_FILE, OpKind.GRAFT):
            return Applied(ApplyOutcome.REFUSED, f"an S3 source cannot {op.kind.value}")
        with self._lock:
            backing_off = self.clock() < self._status.retry_at
        if backing_off:
            raise OSError(errno.EAGAIN, f"{self.name} is backing off after a failed download")
        try:
            opened = self._open(op.source_path, fp)
        except OSError as exc:
            self._trouble(str(exc))
            raise
        if isinstance(opened, Applied):
            self._downloaded(op, opened)
            return opened
        return _S3Content(self, opened, op, fp)

    def still_current(self, op: Op) -> bool:  # noqa: ARG002 (protocol)
        """Always True: the bytes were pinned to the planned ETag when they were read."""
        return True

    def _trouble(self, why: str) -> None:
        with self._lock:
            self._status.failures += 1
            self._status.retry_at = self.clock() + self._retry.delay(self._status.failures)
        log.warning("S3 download failed; backing off", source=self.name, error=why)

    def _open(self, key: str, fp: Fingerprint) -> StreamingBody | Applied:
        """GET exactly the planned version of ``key``; an Applied says why not."""
        from botocore.exceptions import ClientError

        try:
            response = self.client().get_object(Bucket=self.config.bucket, Key=key, IfMatch=fp.etag)
        except SourceError as exc:
            raise OSError(errno.EIO, str(exc)) from exc
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING:
                return Applied(ApplyOutcome.VANISHED)
            if code in _CHANGED:
                return Applied(ApplyOutcome.CHANGED)
            if code in _REFUSED:
                return Applied(ApplyOutcome.REFUSED, f"S3 GET refused: {_describe(exc)}")
            raise OSError(errno.EIO, f"S3 GET of {key!r} failed: {_describe(exc)}") from exc
        except _s3_errors() as exc:
            raise OSError(errno.EIO, f"S3 GET of {key!r} failed: {_describe(exc)}") from exc
        body = response["Body"]
        if response.get("ContentLength") != fp.size:
            body.close()
            return Applied(ApplyOutcome.CHANGED)
        return body

    def _copy(self, op: Op, fp: Fingerprint, body: StreamingBody, union_dir: Path) -> Applied:
        complete = fsops.write_stream(
            union_dir,
            op.repo_path,
            _pieces(body, op.source_path),
            size=fp.size,
            mode=FILE_MODE,
            mtime_ns=fp.mtime_ns,
            replace=True,
        )
        return Applied(ApplyOutcome.APPLIED if complete else ApplyOutcome.CHANGED)

    def published(self, ops: Sequence[Op]) -> None:
        """Inbox mode: delete each published object (if still that version) and the
        ready markers of the directories published."""
        if self.config.mode != "inbox":
            return
        tops: set[str] = set()
        for op in ops:
            if op.kind not in (OpKind.COPY_FILE, OpKind.GRAFT) or op.fingerprint is None:
                continue
            if self._delete_object(op.source_path, op.fingerprint.etag):
                rel = op.source_path[len(self.full_prefix) :]
                top, sep, _ = rel.partition("/")
                if sep:
                    tops.add(top)
        marker = self.config.ready_marker
        if marker:
            for top in sorted(tops):
                self._delete_marker_if_alone(top, marker)

    def _delete_marker_if_alone(self, top: str, marker: str) -> None:
        """Delete ``top``'s ready marker once nothing but it (and folder markers) is left.

        An object of the directory that could not be published yet keeps the marker, so
        it goes live later instead of waiting for a marker that will never come back; the
        marker is deleted only in the version that was listed (a new drop's marker stays).
        """
        prefix = f"{self.full_prefix}{top}/"
        key = prefix + marker
        try:
            pages = (
                self.client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.config.bucket, Prefix=prefix)
            )
            others = any(
                item["Key"] != key and not item["Key"].endswith("/")
                for page in pages
                for item in page.get("Contents", [])
            )
        except _s3_errors(SourceError) as exc:
            log.warning("could not list before deleting a marker", key=repr(key), error=str(exc))
            return
        if others:
            return
        with self._lock:
            known = self._stored.get(key)
        self._delete_object(key, known.etag if known is not None else None)

    def _delete_object(self, key: str, etag: str | None) -> bool:
        """Delete ``key`` if it still has ``etag`` (any version when None); True if gone.

        S3 has no conditional delete everywhere, so the ETag is checked just before: a
        newer upload in between is the remaining (small) window.
        """
        from botocore.exceptions import ClientError

        try:
            client = self.client()
            if etag is not None:
                client.head_object(Bucket=self.config.bucket, Key=key, IfMatch=etag)
            client.delete_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING:
                return True
            if code not in _CHANGED:
                log.warning("could not delete an S3 object", key=repr(key), error=_describe(exc))
            return False
        except _s3_errors(SourceError) as exc:
            log.warning("could not delete an S3 object", key=repr(key), error=_describe(exc))
            return False
        return True


class _S3Content:
    """An object body opened for preparing (pinned to its ETag by ``If-Match``)."""

    def __init__(self, source: S3Input, body: StreamingBody, op: Op, fp: Fingerprint) -> None:
        self._source = source
        self._body = body
        self._op = op
        self._reader = _Reader(body, op.source_path)
        self._size = fp.size
        self.mode = FILE_MODE
        self.mtime_ns = fp.mtime_ns

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._reader.read(size)
        except OSError as exc:
            self._source._trouble(str(exc))
            raise

    def unchanged(self, size: int) -> bool:
        complete = size == self._size
        if not complete:
            self._source._downloaded(self._op, Applied(ApplyOutcome.CHANGED))
        return complete

    def close(self) -> None:
        self._body.close()


class _Reader:
    """A file-like view of a GetObject body for the graft engine: errors become OSError
    (which the engine reports as an unreadable input)."""

    def __init__(self, body: StreamingBody, key: str) -> None:
        self._body = body
        self._key = key

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self._body.read(size if size >= 0 else None))
        except _s3_errors() as exc:
            raise OSError(errno.EIO, f"reading {self._key!r} from S3: {_describe(exc)}") from exc


def _pieces(body: StreamingBody, key: str) -> Iterator[bytes]:
    reader = _Reader(body, key)
    while piece := reader.read(READ_PIECE):
        yield piece
