"""Pure decisions of repository maintenance: no I/O, "now" always passed in.

When a resign is due, whether a forced or requested one signs, what gc can do with a
repository's ``server.conf``, which automatic tags go, what a mount table means and what
to repair, and whether a failed run is retried.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum

from cvmfs_syncd.config import MaintenanceConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.tags import Tag

TASKS = ("resign", "gc", "check")

#: gc and check that keep failing are retried this many times, then wait for their next
#: scheduled run (the failure stays visible in ``cvmfs_syncd_maintenance_failing``).
#: resign is retried without limit: an expired whitelist takes the repository down.
MAX_RETRIES = 10
#: Outcomes that mean "not now", not "broken": retried without the MAX_RETRIES cap.
WAITING_OUTCOMES = frozenset({"check_running", "foreign_transaction"})


def retry_allowed(task: str, failures: int, outcome: str) -> bool:
    """Return whether a failed run that asked for a retry gets one after ``failures``.

    Waiting behind a long ``check -i`` or an operator's transaction is not a failure of
    the task: it keeps retrying instead of giving up for the week after MAX_RETRIES.
    """
    return task == "resign" or failures <= MAX_RETRIES or outcome in WAITING_OUTCOMES


# -- resign ---------------------------------------------------------------------------


def resign_due(expires_at: float | None, now: float, lead_seconds: float) -> bool:
    """Return whether the whitelist must be re-signed now.

    ``expires_at`` is the whitelist's expiry (UNIX seconds) or None when its expiry line
    cannot be read — a whitelist nothing can use, which ``resign`` repairs (h_resign
    27-28). Due when ``now >= expires_at - lead_seconds``.
    """
    if expires_at is None:
        return True
    return now >= expires_at - lead_seconds


class ResignMode(Enum):
    """Why a resign runs, which decides whether it still signs once under its lock."""

    DUE = "due"  #: scheduled, start-up or retry: only if due now
    FORCE = "force"  #: the command line: always
    REQUESTED = "requested"  #: a command met an expired whitelist


def resign_wanted(mode: ResignMode, *, due: bool, expired: bool, changed: bool) -> bool:
    """Decide, under the resign lock, whether to sign: ``due`` and ``expired`` describe the
    whitelist now; ``changed``: it was signed since the request was made. A requested
    resign is not repeated when someone signed meanwhile and the whitelist is valid."""
    if mode is ResignMode.DUE:
        return due
    if mode is ResignMode.REQUESTED:
        return expired or not changed
    return True


# -- gc -------------------------------------------------------------------------------


def auto_tags_to_remove(tags: Iterable[Tag], now: float, keep_seconds: float) -> list[Tag]:
    """Return the automatic ``generic-*`` tags older than ``keep_seconds`` before ``now``.

    Named tags and the undo tags (``trunk``, ``trunk-previous``) are never returned.
    """
    limit = now - keep_seconds
    return [
        tag
        for tag in tags
        if tag.is_auto_tag and not tag.is_undo_tag and tag.timestamp.timestamp() < limit
    ]


#: Names per ``tag -r`` call: what CernVM-FS's own automatic cleanup uses (faults.md F1).
MAX_TAGS_PER_CALL = 100
#: Bytes of the names of one call, joined by spaces. The tool pastes them into a single
#: ``sh -c`` argument, which Linux caps at 128 KiB; half of it leaves room for the rest.
MAX_TAG_CALL_BYTES = 64 * 1024
#: Failed calls in a row after which the cleanup stops for this run (100 names halve
#: down to one in 7 calls).
MAX_TAG_CALL_FAILURES = 10

_MISSING_TAG = re.compile(r"tag '([^']+)' does not exist")


def missing_tags(output: str) -> frozenset[str]:
    """Return the names a failed ``tag -r`` said do not exist (``tag 'X' does not exist``)."""
    return frozenset(_MISSING_TAG.findall(output))


@dataclass(frozen=True)
class TagCleanup:
    """Where the removal of old automatic tags stands between two ``tag -r`` calls.

    ``limit``: names the next call may hold; ``skip``: names not tried again in this run
    (said not to exist, or failing alone); ``retried``: the failing call was already
    tried again without its missing names; ``failures``: failed calls in a row;
    ``stopped``: why the cleanup gave up ("" while it goes on).
    """

    limit: int = MAX_TAGS_PER_CALL
    skip: frozenset[str] = frozenset()
    retried: bool = False
    failures: int = 0
    removed: int = 0
    stopped: str = ""


def next_tag_call(
    state: TagCleanup, candidates: Sequence[str], *, max_bytes: int = MAX_TAG_CALL_BYTES
) -> tuple[str, ...]:
    """Return the names of the next ``tag -r`` call: the first of ``candidates`` not
    skipped, at most ``state.limit`` of them and at most ``max_bytes`` joined by spaces
    (always at least one name when there is one). Empty: nothing left to remove."""
    call: list[str] = []
    size = 0
    for name in candidates:
        if name in state.skip:
            continue
        grown = size + len(name.encode()) + (1 if call else 0)
        if call and (len(call) >= state.limit or grown > max_bytes):
            break
        call.append(name)
        size = grown
    return tuple(call)


def tag_call_done(
    state: TagCleanup, call: Sequence[str], *, ok: bool, missing: Collection[str] = ()
) -> TagCleanup:
    """Return the cleanup's state after a ``tag -r`` of ``call`` succeeded or failed.

    The tool removes all names of a call or none (F1). A success counts the names and
    restores the full call size. A failure naming tags that do not exist drops them
    and retries the rest once; a second failure, or one without a missing name (e.g.
    "Argument list too long"), halves the call; a single name that fails is skipped.
    After MAX_TAG_CALL_FAILURES failures in a row the cleanup stops.
    """
    if ok:
        return replace(
            state,
            limit=MAX_TAGS_PER_CALL,
            retried=False,
            failures=0,
            removed=state.removed + len(call),
        )
    failures = state.failures + 1
    gone = frozenset(missing) & frozenset(call)
    if gone and not state.retried:
        after = replace(state, skip=state.skip | gone, retried=True, failures=failures)
    elif len(call) <= 1:
        after = replace(state, skip=state.skip | frozenset(call), retried=False, failures=failures)
    else:
        after = replace(
            state,
            skip=state.skip | gone,
            limit=max(1, len(call) // 2),
            retried=False,
            failures=failures,
        )
    if failures >= MAX_TAG_CALL_FAILURES:
        after = replace(after, stopped=f"{failures} tag removals failed in a row")
    return after


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
    keeps tagged revisions, g_gc 17-20).
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


def parse_last_gc(data: bytes) -> float | None:
    """Return ``last_gc`` of ``.cvmfs_status.json`` (``Sun Nov 29 21:15:48 UTC 2026``)."""
    try:
        text = json.loads(data).get("last_gc", "")
        stamp = datetime.strptime(" ".join(str(text).split()), "%a %b %d %H:%M:%S UTC %Y")
    except (ValueError, AttributeError):
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


# -- mounts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MountHealth:
    """How a repository is mounted: union ``"rw"``/``"ro"``/None (missing), rdonly mounted."""

    union: str | None
    rdonly: bool


def parse_mount_table(lines: Iterable[str]) -> dict[str, str]:
    """Given the lines of ``/proc/self/mountinfo``, return mount point → ``"rw"``/``"ro"``."""
    table: dict[str, str] = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        point = fields[4]
        # The kernel writes space, tab, newline and backslash as octal escapes.
        for code in ("040", "011", "012", "134"):
            point = point.replace("\\" + code, chr(int(code, 8)))
        table[point] = "rw" if "rw" in fields[5].split(",") else "ro"
    return table


def mount_health(layout: RepositoryLayout, table: Mapping[str, str]) -> MountHealth:
    """Given a mount table, return how ``layout``'s union and rdonly mounts look."""
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
    own); anyone else's is reported, never touched.
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


def iso(when: float | None) -> str:
    """Return a UNIX time as ``2026-11-29T21:15:48Z`` (``unknown`` for None)."""
    if when is None:
        return "unknown"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
