"""Repository maintenance: re-signing the whitelist, garbage collection, checks, repair.

Three quiet ways to lose a repository are prevented here: the whitelist expires (30 days
after signing; then clients refuse the repository and even ``abort`` fails), garbage is
never collected, or a gc collides with a publish. ``scheduler.py`` decides when; this
module decides whether and does it:

* **resign** is due when the whitelist's own expiry line (read from the repository's
  storage) comes within ``resign_before_expiry`` (:func:`resign_due`, pure). It never
  goes through the lane, so a stuck or slow publish cannot starve it: it has its own
  per-repository lock (``locks/<repo>.resign.lock``). It works during an open transaction
  (h_resign 60), and a lane that meets an expired whitelist asks for it at once
  (:meth:`RepositoryMaintenance.request_resign`). Without the master key on this host
  nothing can be signed: that is reported, not attempted.
* **gc** runs inside the lane (``Lane.run_job``) between batches, under the same
  repository lock as publishing. It reads ``server.conf`` first (:func:`gc_settings`),
  never touches a transaction it did not open (``cvmfs_server gc`` refuses during one,
  o_gc_and_transactions 2) and removes old automatic tags first when asked to
  (``auto_tag_keep``), because every tagged revision survives gc (g_gc 17-20).
* **check** is safe during an open transaction (i_check 21): it runs outside the lane and
  never holds publishing up. Only gc is kept apart from it (``locks/<repo>.check.lock``):
  ``check -i`` reads every object file, and gc deletes some.
* **repair** at lane start compares the mounts with the spool (l_stale_mount) and runs
  ``cvmfs_server mount`` when that is safe; everything else is reported.

Every run is recorded: metrics, ``/status``, the log, and ``<state_dir>/maintenance/
<repo>.json`` (so that "last success" survives restarts and the command-line runs count).
A run that failed or could not run is retried with back-off and counted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cvmfs_syncd.config import Config, MaintenanceConfig, RepositoryConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout, load_layout
from cvmfs_syncd.cvmfs.server import CommandResult, CvmfsServer, Outcome, Tag
from cvmfs_syncd.errors import CvmfsCommandError, RepositoryConfigError, SyncdError
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.metrics import Metrics

if TYPE_CHECKING:
    from cvmfs_syncd.lane import Lane

log = structlog.get_logger(__name__)

TASKS = ("resign", "gc", "check")

#: gc and check that keep failing are retried this many times, then wait for their next
#: scheduled run (the failure stays visible in ``cvmfs_syncd_maintenance_failing``).
#: resign is retried without limit: an expired whitelist takes the repository down.
MAX_RETRIES = 10
#: Outcomes that mean "not now", not "broken": retried without the MAX_RETRIES cap.
_WAITING_OUTCOMES = frozenset({"check_running", "foreign_transaction"})
#: ``check -i`` re-hashes every object file: hours on a large storage. The timeout only
#: guards against a hang.
CHECK_INTEGRITY_TIMEOUT = 24 * 3600.0
GC_TIMEOUT = 24 * 3600.0
#: How long a command-line run waits for a lock the daemon holds.
CLI_LOCK_WAIT = 3600.0


# -- pure decisions -------------------------------------------------------------------


def resign_due(expires_at: float | None, now: float, lead_seconds: float) -> bool:
    """Return whether the whitelist must be re-signed now.

    ``expires_at`` is the whitelist's expiry (UNIX seconds) or None when its expiry line
    cannot be read — a whitelist nothing can use, which ``resign`` repairs (h_resign
    27-28). Due when ``now >= expires_at - lead_seconds``. Pure.
    """
    if expires_at is None:
        return True
    return now >= expires_at - lead_seconds


def auto_tags_to_remove(tags: Iterable[Tag], now: float, keep_seconds: float) -> list[Tag]:
    """Return the automatic ``generic-*`` tags older than ``keep_seconds`` before ``now``.

    Named tags and the undo tags (``trunk``, ``trunk-previous``) are never returned. Pure.
    """
    limit = now - keep_seconds
    return [
        tag
        for tag in tags
        if tag.is_auto_tag and not tag.is_undo_tag and tag.timestamp.timestamp() < limit
    ]


@dataclass(frozen=True)
class GcSettings:
    """What the repository's own settings mean for the daemon's gc.

    ``enabled``: the daemon runs gc on its schedule; ``reason`` says why not when it
    does not; ``notes`` are warnings about settings that make gc pointless or doubled.
    """

    enabled: bool
    reason: str = ""
    notes: tuple[str, ...] = ()


def gc_settings(
    layout: RepositoryLayout, settings: MaintenanceConfig, *, on_demand: bool = False
) -> GcSettings:
    """Given a repository's server.conf and its maintenance settings, say what gc can do.

    ``on_demand`` is an operator's explicit request: it does not need a ``gc_schedule``.

    Reads ``CVMFS_GARBAGE_COLLECTION`` (without it ``gc`` fails, o_gc_and_transactions
    9), ``CVMFS_AUTO_GC`` (every publish may collect garbage itself) and
    ``CVMFS_AUTO_TAG`` / ``CVMFS_AUTO_TAG_TIMESPAN`` (every publish adds a tag and gc
    keeps tagged revisions, g_gc 17-20). Pure.
    """
    notes: list[str] = []
    collectable = layout.flag("CVMFS_GARBAGE_COLLECTION")
    auto_gc = layout.flag("CVMFS_AUTO_GC")
    auto_tag = layout.flag("CVMFS_AUTO_TAG", default=True)
    timespan = layout.settings.get("CVMFS_AUTO_TAG_TIMESPAN", "").strip()
    if not settings.gc_schedule and not on_demand:
        if collectable and auto_gc:
            notes.append(
                "no gc_schedule: cvmfs_server collects garbage itself after publishing "
                "(CVMFS_AUTO_GC=true), inside the daemon's publish"
            )
        return GcSettings(False, "no gc_schedule configured", tuple(notes))
    if not collectable:
        return GcSettings(
            False,
            "CVMFS_GARBAGE_COLLECTION is not true in server.conf (create the repository "
            "with mkfs -z, or set it): cvmfs_server gc would refuse, so gc is skipped",
        )
    if auto_gc:
        notes.append(
            "CVMFS_AUTO_GC=true: every publish also runs gc; set CVMFS_AUTO_GC=false in "
            "server.conf so that gc runs only on gc_schedule, between batches"
        )
    if auto_tag and settings.auto_tag_keep_seconds is None and not timespan:
        notes.append(
            "CVMFS_AUTO_TAG=true and neither auto_tag_keep nor CVMFS_AUTO_TAG_TIMESPAN is "
            "set: every revision keeps its generic-* tag and gc frees nothing"
        )
    return GcSettings(True, "", tuple(notes))


@dataclass(frozen=True)
class MountHealth:
    """How a repository is mounted: union ``"rw"``/``"ro"``/None (missing), rdonly mounted."""

    union: str | None
    rdonly: bool


def read_mount_table(path: str = "/proc/self/mountinfo") -> dict[str, str] | None:
    """Return mount point → ``"rw"``/``"ro"`` from the kernel's mount table, or None.

    None means the table cannot be read (then nothing is repaired on its evidence).
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    table: dict[str, str] = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        point = _unescape_mount_path(fields[4])
        options = fields[5].split(",")
        table[point] = "rw" if "rw" in options else "ro"
    return table


def _unescape_mount_path(text: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    for code in ("040", "011", "012", "134"):
        text = text.replace("\\" + code, chr(int(code, 8)))
    return text


def mount_health(layout: RepositoryLayout, table: Mapping[str, str]) -> MountHealth:
    """Given a mount table, return how ``layout``'s union and rdonly mounts look. Pure."""
    union = table.get(os.path.normpath(layout.union_dir))
    rdonly = os.path.normpath(layout.spool_dir / "rdonly") in table
    return MountHealth(union, rdonly)


def repair_plan(
    in_transaction: bool, collecting: bool, health: MountHealth | None
) -> tuple[bool, list[str]]:
    """Decide what to repair: return (run ``cvmfs_server mount``, findings to report).

    ``mount`` is only run without a transaction: it restores missing mounts then
    (l_stale_mount 26, 40). With a transaction open and the union not mounted read/write
    only ``abort`` helps and the files written in it are lost (l_stale_mount 32-35): the
    lane's recovery does that for its own transaction (the journal says which are its
    own); anyone else's is reported, never touched. Pure.
    """
    if health is None:
        return False, []
    findings: list[str] = []
    missing = [name for name, ok in (("union", health.union), ("rdonly", health.rdonly)) if not ok]
    if not in_transaction:
        if health.union == "rw":
            findings.append(
                "the union directory is mounted read/write but no transaction is open "
                "(a transaction interrupted half-way?); left for an operator"
            )
        if missing:
            findings.append(f"{' and '.join(missing)} mount missing: running cvmfs_server mount")
            return True, findings
        return False, findings
    if collecting:
        return False, findings
    if health.union != "rw":
        findings.append(
            "a transaction is open but the union directory is not mounted read/write: "
            "only abort repairs it and the files written in it are lost; the daemon aborts "
            "its own transaction during recovery, anyone else's must be aborted by its owner"
        )
    if not health.rdonly:
        findings.append("a transaction is open and the rdonly mount is missing")
    return False, findings


# -- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """What one run of a maintenance task came to.

    ``ok``: it did its job. ``skipped``: it had nothing to do or was not enabled (not a
    failure). ``ran``: the cvmfs command ran (False when something stopped it first).
    ``retry``: worth trying again soon. ``outcome`` is the cvmfs outcome name or the
    daemon's own reason (``master_key_missing``, ``foreign_transaction``, …).
    """

    task: str
    ok: bool
    message: str
    outcome: str = ""
    ran: bool = True
    skipped: bool = False
    retry: bool = False
    duration: float = 0.0


@dataclass
class TaskStatus:
    """The last runs of one task, as /status shows them."""

    last_success: float = 0.0
    last_attempt: float = 0.0
    last_duration: float = 0.0
    last_outcome: str = ""
    last_message: str = ""
    failing: bool = False
    consecutive_failures: int = 0
    enabled_since: float = 0.0
    running: bool = False
    queued: bool = False


class _Records:
    """``<state_dir>/maintenance/<repo>.json``: per task, the facts that outlive a restart.

    Written by the daemon's threads and the command line alike: every update is a
    read-modify-write under an flock, replacing the file atomically.
    """

    def __init__(self, state_dir: Path, repo: str) -> None:
        self.state_dir = state_dir
        self.repo = repo
        self.path = state_dir / "maintenance" / f"{repo}.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, task: str, **fields: Any) -> None:
        lock = RepositoryLock(self.state_dir, self.repo, name="records")
        try:
            if not lock.acquire(timeout=30.0):
                log.warning("maintenance record locked too long; not updated", path=str(self.path))
                return
            data = self.load()
            entry = data.setdefault(task, {})
            entry.update(fields)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except (OSError, SyncdError) as exc:
            log.warning("cannot record a maintenance result", path=str(self.path), error=str(exc))
        finally:
            lock.release()


def _parse_last_gc(data: bytes) -> float | None:
    """Return ``last_gc`` of ``.cvmfs_status.json`` (``Sun Nov 29 21:15:48 UTC 2026``)."""
    try:
        text = json.loads(data).get("last_gc", "")
        stamp = datetime.strptime(" ".join(str(text).split()), "%a %b %d %H:%M:%S UTC %Y")
    except (ValueError, AttributeError):
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


# -- the tasks of one repository ------------------------------------------------------


RunSoon = Callable[[str, str, Callable[[], object], float], None]


class RepositoryMaintenance:
    """Resign, gc, check and repair for one repository.

    ``lane`` is the repository's lane (None for a command-line run: then gc must be
    called with the repository lock held, see :func:`run_once`). ``clock`` gives "now"
    for every decision and timestamp. ``mount_table`` returns the mount table (None if
    unknown). ``run_soon`` and ``next_run`` are set by the scheduler; without them
    retries are not scheduled and a requested resign runs in the caller's thread.
    """

    def __init__(
        self,
        config: Config,
        repo: RepositoryConfig,
        *,
        layout: RepositoryLayout,
        server: CvmfsServer,
        metrics: Metrics,
        lane: Lane | None = None,
        clock: Callable[[], float] = time.time,
        mount_table: Callable[[], Mapping[str, str] | None] = read_mount_table,
        on_demand: bool = False,
    ) -> None:
        self.config = config
        self.repo = repo
        self.name = repo.name
        self.settings = repo.maintenance
        self.layout = layout
        self.server = server
        self.metrics = metrics
        self.lane = lane
        self.clock = clock
        self.mount_table = mount_table
        self.on_demand = on_demand
        self.state_dir = config.daemon.state_dir
        self.master_key = config.cvmfs.config_dir / "keys" / f"{repo.name}.masterkey"
        self.run_soon: RunSoon | None = None
        self.next_run: Callable[[str, str], float | None] | None = None
        #: Schedules that could not be used (set by whoever schedules the tasks).
        self.schedule_problems: list[str] = []
        self._records = _Records(self.state_dir, repo.name)
        self._lock = threading.Lock()
        self._tasks = {task: TaskStatus() for task in TASKS}
        self._expires_at: float | None = None
        self._created_at: float | None = None
        self._whitelist_error = ""
        self._whitelist_known = False
        self._key_present = False
        self._gc: GcSettings = gc_settings(layout, self.settings, on_demand=on_demand)
        self._gc_future: Future[Any] | None = None
        self._repair_findings: list[str] = []
        self._warned: set[str] = set()
        self._backoff = dict.fromkeys(TASKS, 0)
        for task in TASKS:
            # Every series exists from the start, so that rates and alerts see a zero.
            self.metrics.maintenance_failures.labels(self.name, task)
            self.metrics.maintenance_failing.labels(self.name, task)
        self._load_records()
        self._update_enabled()
        self.metrics.master_key_present.labels(self.name).set(1 if self.master_key.is_file() else 0)

    # -- whitelist and master key --------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the whitelist, the master key and the repository's last gc; set metrics."""
        self._key_present = self.master_key.is_file()
        self.metrics.master_key_present.labels(self.name).set(1 if self._key_present else 0)
        try:
            whitelist = self.layout.whitelist()
        except RepositoryConfigError as exc:
            with self._lock:
                self._whitelist_error = str(exc)
            log.warning("cannot read the whitelist", repository=self.name, error=str(exc))
        else:
            with self._lock:
                self._whitelist_error = ""
                self._whitelist_known = True
                self._expires_at = whitelist.expires_at
                self._created_at = whitelist.created_at
            # 0 says "unusable": an unreadable expiry line is as bad as an expired one.
            self.metrics.whitelist_expiry.labels(self.name).set(whitelist.expires_at or 0)
            if whitelist.created_at:
                self._seen_success("resign", whitelist.created_at)
        try:
            last_gc = _parse_last_gc(self.layout.read_storage_file(".cvmfs_status.json"))
        except RepositoryConfigError:
            last_gc = None
        if last_gc is not None:
            self._seen_success("gc", last_gc)
        self._update_enabled()

    @property
    def expires_at(self) -> float | None:
        """The whitelist's expiry as last read (None: unknown or unreadable)."""
        with self._lock:
            return self._expires_at

    def _resign_due(self, lead: float | None = None) -> bool:
        with self._lock:
            if self._whitelist_error or not self._whitelist_known:
                return False
            expires = self._expires_at
        if lead is None:
            lead = self.settings.resign_before_expiry_seconds
        return resign_due(expires, self.clock(), lead)

    def _expired(self) -> bool:
        return self._resign_due(lead=0.0)

    # -- resign --------------------------------------------------------------------------

    def resign_check(self) -> TaskResult | None:
        """The hourly (and start-up) check: re-sign when due; return the run, or None.

        An unreadable whitelist (storage down) is a failed run, retried.
        """
        self.refresh()
        with self._lock:
            error = self._whitelist_error
        if error:
            return self._run("resign", lambda: self._cannot_read_whitelist(error))
        if not self._resign_due():
            return None
        return self._run("resign", lambda: self._resign_body(reason="due", mode="due"))

    def resign(self, reason: str = "requested") -> TaskResult:
        """Re-sign the whitelist now, whatever its expiry (the command line's ``resign``)."""
        result = self._run("resign", lambda: self._resign_body(reason=reason, mode="force"))
        return result or TaskResult("resign", ok=False, message="resign did not run", ran=False)

    def request_resign(self) -> None:
        """Re-sign at once because a command met an expired whitelist (the lane calls this).

        Runs in a scheduler thread when there is one (the lane goes on with its back-off),
        else in the caller's. A resign that happened since the request is not repeated.
        """
        with self._lock:
            seen = self._created_at

        def run() -> None:
            self._run(
                "resign",
                lambda: self._resign_body(reason="whitelist expired", mode="requested", seen=seen),
            )

        log.warning("whitelist expired: re-signing now", repository=self.name)
        if self.run_soon is not None:
            self.run_soon(self.name, "resign-now", run, 0.0)
        else:
            run()

    def _cannot_read_whitelist(self, error: str) -> TaskResult:
        return TaskResult(
            "resign",
            ok=False,
            message=f"cannot read the whitelist to see when it expires: {error}",
            outcome="whitelist_unreadable",
            ran=False,
            retry=True,
        )

    def _resign_body(
        self, *, reason: str, mode: str, seen: float | None = None
    ) -> TaskResult | None:
        """Sign under the resign lock. ``mode``: ``due`` (only if due now), ``force``
        (always), ``requested`` (a command met an expired whitelist: sign unless the
        whitelist changed since ``seen`` and is not expired).
        """
        lock = RepositoryLock(self.state_dir, self.name, name="resign")
        if not lock.acquire(timeout=self.config.cvmfs.command_timeout_seconds):
            return TaskResult(
                "resign",
                ok=False,
                message=f"another resign holds {lock.path}",
                outcome="locked",
                ran=False,
                retry=True,
            )
        try:
            # Decide again under the lock: another thread or process may have just signed.
            self.refresh()
            with self._lock:
                created = self._created_at
            if mode == "due" and not self._resign_due():
                return None
            if mode == "requested" and created != seen and not self._expired():
                log.info("whitelist re-signed meanwhile; not signing again", repository=self.name)
                return None
            if not self._key_present:
                return TaskResult(
                    "resign",
                    ok=False,
                    message=(
                        f"the master key {self.master_key} is not on this host: the whitelist "
                        "cannot be re-signed here; run cvmfs_server resign where the key is kept"
                    ),
                    outcome="master_key_missing",
                    ran=False,
                )
            log.info(
                "re-signing the whitelist",
                repository=self.name,
                reason=reason,
                expires_at=_iso(self.expires_at),
                days=self.settings.resign_days,
            )
            result = self.server.resign(
                self.name,
                days=self.settings.resign_days,
                timeout=self.config.cvmfs.command_timeout_seconds,
            )
            self.refresh()
            if result.ok:
                return TaskResult(
                    "resign",
                    ok=True,
                    message=f"whitelist re-signed, valid until {_iso(self.expires_at)}",
                    outcome=result.outcome.value,
                )
            return _failed("resign", result, retry=result.outcome is not Outcome.NO_SUCH_REPOSITORY)
        finally:
            lock.release()

    # -- gc ------------------------------------------------------------------------------

    def submit_gc(self) -> None:
        """Queue a gc in the lane (the scheduler's gc job); it runs between batches.

        A gc still queued or running absorbs this one. Without a running lane the run
        fails and is retried.
        """
        lane = self.lane
        if lane is None or not lane.is_alive():
            with self._lock:
                # A job queued in a lane that has stopped will never run.
                self._gc_future = None
                self._tasks["gc"].queued = False
            self._run(
                "gc",
                lambda: TaskResult(
                    "gc",
                    ok=False,
                    message="the repository's lane is not running; gc waits for it",
                    outcome="lane_not_running",
                    ran=False,
                    retry=True,
                ),
            )
            return
        with self._lock:
            pending = self._gc_future
            if pending is not None and not pending.done():
                log.info("gc already queued; this run is coalesced", repository=self.name)
                return
            self._tasks["gc"].queued = True
            future = self._gc_future = lane.run_job("gc", self.gc_locked)
        future.add_done_callback(self._gc_finished)
        log.info("gc queued in the lane", repository=self.name)

    def gc_locked(self) -> TaskResult | None:
        """Run gc now; the caller holds the repository lock (the lane, or :func:`run_once`)."""
        with self._lock:
            self._tasks["gc"].queued = False
        return self._run("gc", self._gc_body)

    def _gc_finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._tasks["gc"].queued = False
        exc = future.exception() if not future.cancelled() else None
        if exc is not None:
            # The lane stopped before the job ran (it raises its stop signal then).
            log.warning("gc did not run: the lane stopped", repository=self.name, error=repr(exc))

    def _gc_body(self) -> TaskResult:
        layout = self._fresh_layout()
        verdict = gc_settings(layout, self.settings, on_demand=self.on_demand)
        with self._lock:
            self._gc = verdict
        self._update_enabled()
        for note in verdict.notes:
            self._warn_once(note)
        if not verdict.enabled:
            return TaskResult(
                "gc", ok=False, message=verdict.reason, outcome="disabled", skipped=True
            )
        if layout.in_transaction():
            what = "gc's" if layout.is_collecting() else "an operator's or a script's"
            return TaskResult(
                "gc",
                ok=False,
                message=(
                    f"a transaction the daemon did not open is in progress ({what}): "
                    "cvmfs_server gc refuses to run during one, and it is never aborted"
                ),
                outcome="foreign_transaction",
                ran=False,
                retry=True,
            )
        check_lock = RepositoryLock(self.state_dir, self.name, name="check")
        # A check -i reads every object file; never wait for it here, the lane is held.
        if not check_lock.acquire(timeout=0.0):
            return TaskResult(
                "gc",
                ok=False,
                message="a check of the repository is running; gc waits for it",
                outcome="check_running",
                ran=False,
                retry=True,
            )
        try:
            removed: list[str] = []
            if self.settings.auto_tag_keep_seconds is not None:
                failure = self._remove_old_auto_tags(removed)
                if failure is not None:
                    return failure
            keep_since = (
                datetime.fromtimestamp(self.clock() - self.settings.gc_keep_seconds, UTC)
                if self.settings.gc_keep_seconds is not None
                else None
            )
            result = self.server.gc(
                self.name,
                keep_revisions=self.settings.gc_keep_revisions,
                keep_since=keep_since,
                # gc of a large repository takes hours; it runs as a lane job, which the
                # stall check exempts, so only this bound ends a gc that hangs.
                timeout=GC_TIMEOUT,
            )
        finally:
            check_lock.release()
        tags = f"; removed {len(removed)} automatic tags" if removed else ""
        if result.ok:
            return TaskResult("gc", ok=True, message=f"garbage collected{tags}", outcome="ok")
        if result.outcome is Outcome.GC_NOT_ENABLED:
            with self._lock:
                self._gc = GcSettings(False, result.reason or "garbage collection is not enabled")
            self._update_enabled()
            return TaskResult(
                "gc", ok=False, message=_describe(result) + tags, outcome="disabled", skipped=True
            )
        retry = result.outcome is not Outcome.NO_SUCH_REPOSITORY
        ran = result.outcome is not Outcome.GC_IN_TRANSACTION
        return replace(_failed("gc", result, retry=retry), ran=ran)

    def _remove_old_auto_tags(self, removed: list[str]) -> TaskResult | None:
        timeout = self.config.cvmfs.command_timeout_seconds
        listing = self.server.tag_list(self.name, timeout=timeout)
        if not listing.ok:
            return replace(
                _failed("gc", listing.result, retry=True),
                message="cannot list tags: " + _describe(listing.result),
            )
        keep = self.settings.auto_tag_keep_seconds or 0.0
        old = auto_tags_to_remove(listing.tags, self.clock(), keep)
        if not old:
            return None
        result = self.server.tag_remove(self.name, [tag.name for tag in old], timeout=timeout)
        if not result.ok:
            return replace(
                _failed("gc", result, retry=True),
                message="cannot remove old automatic tags: " + _describe(result),
            )
        removed.extend(tag.name for tag in old)
        log.info("removed old automatic tags", repository=self.name, tags=removed)
        return None

    # -- check ---------------------------------------------------------------------------

    def check(self) -> TaskResult | None:
        """Run ``cvmfs_server check`` (``-i`` with ``check_integrity``); record the result.

        Runs in the caller's thread, outside the lane. A check that found problems is a
        failure that waits for the next schedule; one that could not run is retried.
        """
        return self._run("check", self._check_body)

    def _check_body(self) -> TaskResult:
        integrity = self.settings.check_integrity
        lock = RepositoryLock(self.state_dir, self.name, name="check")
        # gc holds this lock while it deletes objects; it is bounded by gc's own timeout.
        if not lock.acquire(timeout=self.config.cvmfs.publish_timeout_seconds):
            return TaskResult(
                "check",
                ok=False,
                message="gc or another check held the repository too long",
                outcome="locked",
                ran=False,
                retry=True,
            )
        try:
            result = self.server.check(
                self.name,
                integrity=integrity,
                timeout=(
                    CHECK_INTEGRITY_TIMEOUT
                    if integrity
                    else self.config.cvmfs.publish_timeout_seconds
                ),
            )
        finally:
            lock.release()
        if result.ok:
            what = " (with -i)" if integrity else ""
            return TaskResult("check", ok=True, message=f"no problems found{what}", outcome="ok")
        if result.outcome is Outcome.CHECK_FAILED:
            return _failed("check", result, retry=False)
        return _failed("check", result, retry=result.outcome is not Outcome.NO_SUCH_REPOSITORY)

    # -- start-up and repair ---------------------------------------------------------------

    def startup(self) -> None:
        """Before the lane recovers: re-sign an expired (or due) whitelist, then repair.

        An expired whitelist makes transaction, publish and abort fail (h_resign 33), so
        the lane's recovery would only meet that; resigning first lets it go through.
        Never raises: problems are recorded and logged.
        """
        try:
            self.refresh()
            if self._expired():
                log.error(
                    "the whitelist has expired: re-signing before anything else",
                    repository=self.name,
                )
            self.resign_check()
            self.repair()
        except Exception:
            log.exception("maintenance start-up failed", repository=self.name)

    def repair(self) -> list[str]:
        """Compare mounts and transaction with what they should be; repair what is safe.

        Return the findings (also logged and shown in /status).
        """
        layout = self.layout
        table = self.mount_table()
        health = mount_health(layout, table) if table is not None else None
        do_mount, findings = repair_plan(layout.in_transaction(), layout.is_collecting(), health)
        if do_mount:
            result = self.server.mount(self.name, timeout=self.config.cvmfs.command_timeout_seconds)
            findings.append("cvmfs_server mount: " + ("done" if result.ok else _describe(result)))
        for finding in findings:
            log.warning("repository repair", repository=self.name, finding=finding)
        with self._lock:
            self._repair_findings = findings
        return findings

    def missed(self, task: str) -> None:
        """A scheduled run was skipped because it was late: count it and run it now."""
        self.metrics.retries.labels(self.name, task).inc()
        runner: Callable[[], object] | None = {
            "resign": self.resign_check,
            "gc": self.submit_gc,
            "check": self.check,
        }.get(task)
        if runner is not None and self.run_soon is not None:
            self.run_soon(self.name, task, runner, 0.0)

    # -- recording -----------------------------------------------------------------------

    def _run(self, task: str, body: Callable[[], TaskResult | None]) -> TaskResult | None:
        started = time.monotonic()
        with self._lock:
            self._tasks[task].running = True
        try:
            result = body()
        except CvmfsCommandError as exc:
            result = TaskResult(task, ok=False, message=str(exc), outcome="error", ran=False)
        except Exception as exc:
            log.exception("maintenance task raised", repository=self.name, task=task)
            result = TaskResult(
                task, ok=False, message=f"{type(exc).__name__}: {exc}", outcome="error", retry=True
            )
        finally:
            with self._lock:
                self._tasks[task].running = False
        if result is None:
            return None
        result = replace(result, duration=time.monotonic() - started)
        self._record(result)
        return result

    def _record(self, result: TaskResult) -> None:
        task = result.task
        now = self.clock()
        labels = (self.name, task)
        with self._lock:
            status = self._tasks[task]
            status.last_attempt = now
            status.last_outcome = result.outcome
            status.last_message = result.message
            if result.ran:
                status.last_duration = result.duration
            if result.ok:
                status.last_success = now
                status.failing = False
                status.consecutive_failures = 0
            elif result.skipped:
                status.failing = False
                status.consecutive_failures = 0
            else:
                status.failing = True
                status.consecutive_failures += 1
            failures = status.consecutive_failures
        if result.ran:
            self.metrics.maintenance_duration.labels(*labels).set(result.duration)
        self.metrics.maintenance_failing.labels(*labels).set(
            0 if result.ok or result.skipped else 1
        )
        fields: dict[str, Any] = {
            "last_attempt": now,
            "last_outcome": result.outcome,
            "last_message": result.message,
        }
        if result.ok:
            self.metrics.maintenance_last_success.labels(*labels).set(now)
            fields["last_success"] = now
            self._backoff[task] = 0
            log.info(
                "maintenance task done",
                repository=self.name,
                task=task,
                message=result.message,
                seconds=round(result.duration, 3),
            )
        elif result.skipped:
            self._warn_once(f"{task} skipped: {result.message}")
        else:
            self.metrics.maintenance_failures.labels(*labels).inc()
            log.error(
                "maintenance task failed",
                repository=self.name,
                task=task,
                outcome=result.outcome,
                message=result.message,
                seconds=round(result.duration, 3),
                consecutive_failures=failures,
            )
        self._records.update(task, **fields)
        if not result.ok and result.retry:
            self._schedule_retry(task, failures, waiting=result.outcome in _WAITING_OUTCOMES)

    def _schedule_retry(self, task: str, failures: int, *, waiting: bool = False) -> None:
        if self.run_soon is None:
            return
        # Waiting behind a long `check -i` or an operator's transaction is not a failure
        # of the task: it keeps retrying (at the capped back-off) instead of giving up
        # for the week after MAX_RETRIES.
        if task != "resign" and failures > MAX_RETRIES and not waiting:
            log.error(
                "maintenance task keeps failing; waiting for its next scheduled run",
                repository=self.name,
                task=task,
                consecutive_failures=failures,
            )
            return
        step = self._backoff[task]
        self._backoff[task] = step + 1
        delay = min(
            max(self.repo.retry_initial_seconds, 0.01) * (2.0**step),
            max(self.repo.retry_max_seconds, self.repo.retry_initial_seconds),
        )
        self.metrics.retries.labels(self.name, task).inc()
        runner: Callable[[], object] = {
            "resign": self._retry_resign,
            "gc": self.submit_gc,
            "check": self.check,
        }[task]
        log.info(
            "maintenance task retry scheduled", repository=self.name, task=task, retry_in=delay
        )
        self.run_soon(self.name, task, runner, delay)

    def _retry_resign(self) -> None:
        self.refresh()
        with self._lock:
            error = self._whitelist_error
        if error:
            self._run("resign", lambda: self._cannot_read_whitelist(error))
            return
        result = self._run("resign", lambda: self._resign_body(reason="retry", mode="due"))
        if result is None:
            # No longer due (someone signed meanwhile): the failure is over.
            with self._lock:
                self._tasks["resign"].failing = False
                self._tasks["resign"].consecutive_failures = 0
            self.metrics.maintenance_failing.labels(self.name, "resign").set(0)

    def _seen_success(self, task: str, when: float) -> None:
        with self._lock:
            status = self._tasks[task]
            if when <= status.last_success:
                return
            status.last_success = when
        self.metrics.maintenance_last_success.labels(self.name, task).set(when)

    def _load_records(self) -> None:
        for task, entry in self._records.load().items():
            if task not in self._tasks or not isinstance(entry, dict):
                continue
            status = self._tasks[task]
            status.last_attempt = float(entry.get("last_attempt") or 0.0)
            status.last_outcome = str(entry.get("last_outcome") or "")
            status.last_message = str(entry.get("last_message") or "")
            status.enabled_since = float(entry.get("enabled_since") or 0.0)
            self._seen_success(task, float(entry.get("last_success") or 0.0))
        for task in TASKS:
            self.metrics.maintenance_last_success.labels(self.name, task).set(
                self._tasks[task].last_success
            )

    def _update_enabled(self) -> None:
        with self._lock:
            gc_enabled = self._gc.enabled
        enabled = {
            "resign": self.master_key.is_file(),
            "gc": gc_enabled,
            "check": bool(self.settings.check_schedule),
        }
        now = self.clock()
        for task, on in enabled.items():
            with self._lock:
                status = self._tasks[task]
                before = status.enabled_since
                if on and not before:
                    status.enabled_since = now
                elif not on:
                    status.enabled_since = 0.0
                since = status.enabled_since
            self.metrics.maintenance_enabled_since.labels(self.name, task).set(since)
            if since != before and not self.on_demand:
                self._records.update(task, enabled_since=since)

    def _warn_once(self, message: str) -> None:
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        log.warning("maintenance", repository=self.name, note=message)

    def _fresh_layout(self) -> RepositoryLayout:
        # server.conf may have been edited (e.g. gc enabled) since the daemon started.
        try:
            return load_layout(self.config.cvmfs.config_dir, self.name)
        except RepositoryConfigError as exc:
            log.warning("cannot re-read server.conf; using the one read at start", error=str(exc))
            return self.layout

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return the maintenance state for /status (JSON-ready)."""
        now = self.clock()
        with self._lock:
            expires = self._expires_at
            tasks = {name: replace(status) for name, status in self._tasks.items()}
            body: dict[str, Any] = {
                "whitelist": {
                    "expires_at": expires,
                    "expires_in_seconds": None if expires is None else round(expires - now),
                    "resign_due_at": (
                        None
                        if expires is None
                        else expires - self.settings.resign_before_expiry_seconds
                    ),
                    "error": self._whitelist_error,
                },
                "master_key_present": self._key_present,
                "gc_settings": {
                    "enabled": self._gc.enabled,
                    "reason": self._gc.reason,
                    "notes": list(self._gc.notes),
                },
                "repair": list(self._repair_findings),
            }
        for name, status in tasks.items():
            entry = {
                "last_success": status.last_success or None,
                "last_attempt": status.last_attempt or None,
                "last_duration_seconds": round(status.last_duration, 3),
                "last_outcome": status.last_outcome,
                "last_message": status.last_message,
                "failing": status.failing,
                "running": status.running,
                "queued": status.queued,
                "enabled_since": status.enabled_since or None,
                "next_run": self.next_run(self.name, name) if self.next_run else None,
            }
            body[name] = entry
        body["schedules"] = {
            "gc": self.settings.gc_schedule,
            "check": self.settings.check_schedule,
        }
        body["problems"] = self.problems()
        return body

    def problems(self) -> list[str]:
        """Return what needs an operator (for /status and the systemd STATUS line)."""
        items: list[str] = []
        now = self.clock()
        with self._lock:
            expires = self._expires_at
            error = self._whitelist_error
            known = self._whitelist_known
            key = self._key_present
            failing = {name: s.last_message for name, s in self._tasks.items() if s.failing}
        if error:
            items.append(f"{self.name}: whitelist unreadable: {error}")
        elif not known:
            pass
        elif expires is None:
            items.append(f"{self.name}: whitelist expiry unreadable (resign repairs it)")
        elif expires <= now:
            items.append(f"{self.name}: whitelist EXPIRED at {_iso(expires)}")
        elif not key and now >= expires - self.settings.resign_before_expiry_seconds:
            items.append(
                f"{self.name}: whitelist expires {_iso(expires)} and the master key is not "
                "on this host"
            )
        for task, message in failing.items():
            items.append(f"{self.name}: {task} failing: {message}")
        return items + list(self.schedule_problems)


def _failed(task: str, result: CommandResult, *, retry: bool) -> TaskResult:
    return TaskResult(
        task, ok=False, message=_describe(result), outcome=result.outcome.value, retry=retry
    )


def _describe(result: CommandResult) -> str:
    reason = result.reason
    if not reason:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[0] if lines else ""
    return f"{result.outcome.value} (exit {result.exit_code}): {reason[:300]}"


def _iso(when: float | None) -> str:
    if when is None:
        return "unknown"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- one run from the command line -----------------------------------------------------


def run_once(
    config: Config,
    repo: RepositoryConfig,
    task: str,
    *,
    server: CvmfsServer,
    metrics: Metrics | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> TaskResult:
    """Run one maintenance task now, through the same locks the daemon uses.

    ``resign`` signs whatever the expiry; ``gc`` takes the repository lock first (it
    waits for a publish of the daemon to finish, and the daemon waits for it);
    ``check`` runs beside publishing. ``on_wait`` is told when a lock must be waited
    for. Raise RepositoryConfigError if the repository is not on this host.
    """
    layout = load_layout(config.cvmfs.config_dir, repo.name)
    maint = RepositoryMaintenance(
        config, repo, layout=layout, server=server, metrics=metrics or Metrics(), on_demand=True
    )
    maint.refresh()
    if task == "resign":
        return maint.resign(reason="requested on the command line")
    if task == "check":
        return maint.check() or TaskResult(
            "check", ok=False, message="check did not run", ran=False
        )
    if task != "gc":
        raise ValueError(f"unknown maintenance task {task!r}")
    lock = RepositoryLock(config.daemon.state_dir, repo.name)
    if not lock.acquire(timeout=1.0):
        if on_wait is not None:
            on_wait(f"waiting for the repository lock {lock.path} (a publish is in progress)")
        if not lock.acquire(timeout=CLI_LOCK_WAIT):
            return TaskResult(
                "gc",
                ok=False,
                message=f"the repository lock {lock.path} stayed held for {CLI_LOCK_WAIT:.0f}s",
                outcome="locked",
                ran=False,
            )
    try:
        result = maint.gc_locked()
    finally:
        lock.release()
    return result or TaskResult("gc", ok=False, message="gc did not run", ran=False)
