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

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from cvmfs_syncd import fsops
from cvmfs_syncd.backoff import Backoff
from cvmfs_syncd.batching import Pending
from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import SourceError
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import S3_FILE_MODE, Dirty, Fingerprint, Op, OpKind
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.pipeline.plan import COPY_ONLY, ContentPolicy
from cvmfs_syncd.pipeline.plan_s3 import (
    DIR_MODE,
    ListedObservation,
    ListingPolicy,
    ListingView,
    listed_deletes,
    listing_waits,
    plan_listed,
)
from cvmfs_syncd.pipeline.prepare import Content
from cvmfs_syncd.planner import Applied, ApplyOutcome, Plan
from cvmfs_syncd.sources.drops import Drops, is_drop
from cvmfs_syncd.sources.s3_client import (
    ClientCache,
    ClientFactory,
    S3Content,
    make_client,
    open_object,
    pieces,
)
from cvmfs_syncd.sources.s3_inbox import InboxCleaner
from cvmfs_syncd.sources.s3_listing import (
    Found,
    Listing,
    Refusals,
    build_listing,
    changed_paths,
    full_prefix,
    list_prefix,
)
from cvmfs_syncd.sources.s3_observe import (
    listing_differences,
    listing_drops,
    listing_policy,
    observe_entry,
)
from cvmfs_syncd.state import PublishedEntry, State

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: Mode of every file published from S3 (objects carry no permissions).
FILE_MODE = S3_FILE_MODE
#: Keys per ListObjectsV2 page (the S3 maximum).
LIST_PAGE_SIZE = 1000
#: Above this many pending entries, plan() reads the source's whole index at once.
_BULK_LOOKUP = 256

# --------------------------------------------------------------------------- the source


@dataclass
class _Status:
    up: bool = False
    detail: str = "not listed yet"
    failures: int = 0
    retry_at: float = 0.0


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
        self.full_prefix = full_prefix(config.prefix)
        self.target_path = repo_path(config.target, "")
        self._clients = ClientCache(config, client_factory)
        self._lock = threading.Lock()  # guards the fields below
        self._list_lock = threading.Lock()  # one listing at a time
        # Listings are stored per repository: two repositories may publish one prefix.
        self.listing_key = f"{repo}/{self.name}"
        self._stored = state.s3_listing(self.listing_key)
        self._listing: Listing | None = None
        self._status = _Status()
        self._refusals = Refusals(repo, self.name, metrics)
        self._inbox = InboxCleaner(config, self.full_prefix, self.client, self._known_etag)
        #: Keys found changed or gone at download time: not planned again before the next
        #: listing (cleared by every listing).
        self._stale: set[str] = set()
        self._drops_of: tuple[Listing, Drops] | None = None
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
        self._clients.close()

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
        return self._clients.get()

    def _known_etag(self, key: str) -> str | None:
        with self._lock:
            known = self._stored.get(key)
        return known.etag if known is not None else None

    # -- listing ---------------------------------------------------------------------------

    def _list(self) -> Found:
        """List the prefix; raise SourceError (see :func:`list_prefix`)."""
        return list_prefix(self.client, self.config, self.full_prefix, self.page_size)

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
            listing, changed, removed = build_listing(
                found, self._stored, self._listing, self.config, now
            )
            self.state.update_s3_listing(self.listing_key, changed.values(), removed)
            with self._lock:
                previous, self._listing = self._listing, listing
                self._stored = listing.objects
                self._stale.clear()
        self._set_up(True, "")
        self.metrics.s3_listed_objects.labels(self.repo, self.name).set(len(listing.objects))
        self.metrics.s3_last_listing.labels(self.repo, self.name).set(now)
        self._refusals.report(listing)
        return previous, listing

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
            for rel in sorted(changed_paths(previous, listing))
        ]

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
        rels, here = listing_differences(
            listing,
            self.state.published_under(self.repo, self.target_path, self.name),
            policy=self._policy(),
            target=self.config.target,
            drops=self._drops(listing),
            aside_of=partial(self.state.set_aside_entry, self.repo, self.name),
        )
        if self.config.mode == "inbox" and not self.read_only:
            # Objects that are live but still in the bucket (a deletion after an earlier
            # publish failed) are removed now.
            for key, fp in here:
                self._inbox.delete_object(key, fp.etag)
        return [Dirty(self.name, rel, now, from_scan=True) for rel in rels]

    def _drops(self, listing: Listing) -> Drops | None:
        """The tarball drops of ``listing`` when this source ingests them (kept per listing)."""
        if self.config.tarballs != "ingest":
            return None
        with self._lock:
            cached = self._drops_of
        if cached is not None and cached[0] is listing:
            return cached[1]
        drops = listing_drops(listing, self.config)
        with self._lock:
            self._drops_of = (listing, drops)
        return drops

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
            observe = partial(
                observe_entry,
                listing=listing,
                live_of=live_of,
                policy=policy,
                target=self.config.target,
                is_stale=self._is_stale,
                set_aside=partial(self.state.set_aside_entry, self.repo, self.name),
                drops=self._drops(listing),
                count_below=partial(self.state.count_under, self.repo, source=self.name),
            )
            observations = [observe(e) for e in entries]
            if any(listed_deletes(o, policy) for o in observations):
                view = replace(view, live_count=self.state.count_published(self.repo, self.name))
        result = plan_listed(observations, view, policy, now)
        for key in result.clear_set_aside:
            self.state.clear_set_aside(self.repo, self.name, key)
        return result.plan

    def _policy(self) -> ListingPolicy:
        return listing_policy(self.config, self.content, self.full_prefix)

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
        got = self._get_planned(op)
        if isinstance(got, Applied):
            result = got
        else:
            fp, opened = got
            # A GRAFT op reaches here only when its objects could not be prepared.
            try:
                result = self._copy(op, fp, opened, union_dir)
            except OSError as exc:
                self._trouble(str(exc))
                raise
            finally:
                opened.close()
        self._downloaded(op, result)
        return result

    def _get_planned(self, op: Op) -> tuple[Fingerprint, StreamingBody] | Applied:
        """GET exactly the planned version of ``op``'s object, or say why not.

        Raises OSError when S3 fails, and while backing off after such a failure: a dead
        or hanging endpoint must not cost a timeout per remaining object of a batch.
        """
        fp = op.fingerprint
        if fp is None or op.kind not in (OpKind.COPY_FILE, OpKind.GRAFT, OpKind.INGEST):
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
            return opened
        return fp, opened

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
        got = self._get_planned(op)
        if isinstance(got, Applied):
            self._downloaded(op, got)
            return got
        fp, opened = got
        return S3Content(opened, op, fp, self._trouble, partial(self._downloaded, op))

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
        try:
            client = self.client()
        except SourceError as exc:
            raise OSError(errno.EIO, str(exc)) from exc
        return open_object(client, self.config.bucket, key, fp)

    def _copy(self, op: Op, fp: Fingerprint, body: StreamingBody, union_dir: Path) -> Applied:
        complete = fsops.write_stream(
            union_dir,
            op.repo_path,
            pieces(body, op.source_path),
            size=fp.size,
            mode=FILE_MODE,
            mtime_ns=fp.mtime_ns,
            replace=True,
        )
        return Applied(ApplyOutcome.APPLIED if complete else ApplyOutcome.CHANGED)

    def is_drop(self, rel_path: str) -> bool:
        """Return whether ``rel_path`` is a tarball drop (see :func:`drops.is_drop`)."""
        return is_drop(self.config, rel_path)

    def published(self, ops: Sequence[Op]) -> None:
        """Inbox mode: delete each published object (if still that version) and the
        ready markers of the directories published."""
        if self.config.mode == "inbox":
            self._inbox.published(ops)
