"""plan: pure decisions about what a batch does with each observed input.

A source observes (stats, index look-ups, the ready marker, the writer check) and
records what it saw in one observation per pending entry; the functions here decide.
No I/O, no clock: every function takes what it needs (observations, the policy, ``now``)
and returns a decision, so it is tested without files, sleeps or a repository.

This module holds what every source shares and the staging directories' planning
(:func:`plan_staged`); S3 prefixes are planned by :mod:`cvmfs_syncd.pipeline.plan_s3`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from cvmfs_syncd.batching import Pending
from cvmfs_syncd.cvmfs.graft import GRAFT_NAME_MAX
from cvmfs_syncd.ingest import RefusedDrop
from cvmfs_syncd.model import EntryType, Fingerprint, HoldReason, Op, OpKind, SetAside
from cvmfs_syncd.paths import is_ignored, reserved_name
from cvmfs_syncd.planner import Plan, deletion_guard


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """How a file's content reaches the repository.

    ``writable``: this host can write the repository's objects (False on a gateway
    publisher, with unsupported compression, extended attributes, or a zlib that differs
    from CernVM-FS's); ``small_limit``: files below it are one object when ``publish``
    stores them (``CVMFS_MIN_CHUNK_SIZE``; None when chunking is off).
    """

    writable: bool
    small_limit: int | None


#: A source that never writes objects itself (tests, gateway publishers): every file is copied.
COPY_ONLY = ContentPolicy(writable=False, small_limit=None)


def file_op_kind(
    name: str, size: int, policy: ContentPolicy, *, prepare: bool, graft_at: int
) -> OpKind:
    """Return GRAFT (objects written before the transaction) or COPY_FILE for one file.

    Prepared: files below ``small_limit``, whose object is exactly the one ``publish``
    would store (so deduplication holds). Grafted: files of ``graft_at`` bytes and more
    (fixed-size chunks instead of ``publish``'s content-defined ones). Everything else, and
    names too long to leave room for ``.cvmfsgraft-``, is copied into the transaction.
    """
    if not policy.writable or len(os.fsencode(name)) > GRAFT_NAME_MAX:
        return OpKind.COPY_FILE
    if prepare and (policy.small_limit is None or size < policy.small_limit):
        return OpKind.GRAFT
    if graft_at > 0 and size >= graft_at:
        return OpKind.GRAFT
    return OpKind.COPY_FILE


def count_deleted(subtrees: Iterable[Iterable[str]]) -> int:
    """Count the distinct live paths a batch removes, given the live subtree of each delete.

    A deleted directory's entries are deleted (and hinted) one by one as well as the
    directory itself: each live path counts once, however many of its ancestors go too.
    """
    seen: set[str] = set()
    for subtree in subtrees:
        seen.update(subtree)
    return len(seen)


# --------------------------------------------------------------------------- shared


class _Drop(Protocol):
    @property
    def drop(self) -> bool: ...


_Observed = TypeVar("_Observed", bound=_Drop)


class Fate(enum.Enum):
    """Where one pending entry goes, decided before settling and the writer check."""

    IGNORED = "ignored"  # the target itself, an ignored name, a ready marker
    REFUSED = "refused"  # an unsafe or reserved name: set aside
    WAITING = "waiting"  # its directory's ready marker is missing
    SKIPPED = "skipped"  # exists but cannot be published (FIFO, device, unreadable, …)
    GONE = "gone"  # absent and nothing of this source live there
    DELETE = "delete"  # absent, live from this source, mirror mode
    ASIDE = "aside"  # this very version was set aside before
    UNCHANGED = "unchanged"  # equal to what is live
    CHANGED = "changed"  # to be published (a file once settled and without a writer)


class Verdict(NamedTuple):
    """A fate, with the reason an operator reads for REFUSED and SKIPPED (and for a refused
    tarball the refusal's code)."""

    fate: Fate
    reason: str = ""
    code: str = ""


def drop_verdict(refused: RefusedDrop) -> Verdict:
    """The verdict on a top-level tarball that is no drop (its base is taken or unsafe)."""
    why = f"tarball refused ({refused.reason.value}): {refused.detail}"
    return Verdict(Fate.REFUSED, why, refused.reason.value)


@dataclass
class Planned:
    """A plan, with what the source must remember or record because of it."""

    plan: Plan = field(default_factory=Plan)
    #: pending keys whose settle record is dropped (gone, deleted, equal to what is live)
    forget: list[tuple[str, str]] = field(default_factory=list)
    #: paths (staging) or keys (S3) whose set-aside record no longer applies
    clear_set_aside: list[str] = field(default_factory=list)
    #: path -> reason refused or skipped in this plan (reported once per reason)
    reported: dict[str, str] = field(default_factory=dict)
    #: replaced paths whose old entry goes without its replacement (not ready after
    #: ``max_batch_seconds``): the source logs them
    replaced_alone: list[str] = field(default_factory=list)


def hold_deletes(plan: Plan, why: str, kind: HoldReason, also: Iterable[str] = ()) -> None:
    """Withhold every DELETE op of ``plan`` (the guard said ``why``), and the ops at the
    repository paths ``also`` (replacements, which delete what they replace)."""
    held = set(also)
    held |= {o.repo_path for o in plan.ops if o.kind is OpKind.DELETE}
    # A group (a ready-marker directory, a replacement) is held whole or not at all.
    for group in plan.atomic_groups:
        if held.intersection(group):
            held.update(group)
    plan.guarded = [o for o in plan.ops if o.kind is OpKind.DELETE or o.repo_path in held]
    plan.ops = [o for o in plan.ops if o.kind is not OpKind.DELETE and o.repo_path not in held]
    plan.guard_reason = why
    plan.guard_kind = kind


class IngestBases:
    """The bases of the INGEST ops of one plan, and what else must wait for them.

    ``cvmfs_server ingest`` publishes a drop in a revision of its own and replaces its
    base's content: another op at or below a base in the same plan is deferred until
    ``until`` and planned again once the ingest is live. Planners look at drops first
    (see :func:`drops_first`), so that the bases are known before anything else.
    """

    def __init__(self, until: float) -> None:
        self.until = until
        self.bases: list[str] = []

    def add(self, plan: Plan, entry: Pending, op: Op) -> bool:
        """Add ``op`` to ``plan`` (or defer ``entry`` when it waits for an ingest); return
        True if it was added."""
        if op.kind is OpKind.INGEST:
            self.bases.append(op.repo_path)
        elif any(op.repo_path == b or op.repo_path.startswith(b + "/") for b in self.bases):
            plan.deferred.append(entry.deferred_until(self.until))
            return False
        _add(plan, entry, op)
        return True


def drops_first(observations: Iterable[_Observed]) -> list[_Observed]:
    """The observations with the tarball drops first (otherwise in their order)."""
    return sorted(observations, key=lambda obs: not obs.drop)


def _add(plan: Plan, entry: Pending, op: Op) -> None:
    plan.ops.append(op)
    plan.origin[op.repo_path] = entry


def _report(result: Planned, entry: Pending, verdict: Verdict, reported: str) -> None:
    """Refuse or skip an entry, unless that was reported already for the same reason."""
    if verdict.reason == reported:
        return
    result.reported[entry.rel_path] = verdict.reason
    if verdict.fate is Fate.REFUSED:
        aside = SetAside(entry.source, entry.rel_path, verdict.reason, refusal=verdict.code)
        result.plan.set_aside.append(aside)
    else:
        result.plan.skipped.append((verdict.reason, entry.rel_path))


# --------------------------------------------------------------------------- staging


#: The repository's ``max_batch_seconds`` when none is given (the configuration's default).
DEFAULT_MAX_BATCH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class StagingPolicy:
    """What a staging source's configuration says about planning (``StagingConfig``)."""

    source: str
    mirror: bool = True
    content: ContentPolicy = COPY_ONLY
    settle_seconds: float = 2.0
    ready_marker: str = ""
    ignore: tuple[str, ...] = ()
    allow_reserved_names: bool = False
    prepare: bool = True
    graft_at: int = 0
    max_delete_share: float = 0.5
    #: how long a replaced entry's deletion waits for its replacement (the repository's)
    max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS


@dataclass(frozen=True, slots=True)
class StagedObservation:
    """What the staging source saw of one pending entry.

    The source looks in the order of the decision and stops where the decision is made
    (:func:`staged_name_verdict`, then the marker, then :func:`staged_content_verdict`):
    what it did not look at keeps its default.

    ``repo_path``/``unmappable``: the mapped repository path, or why there is none.
    ``reported``: the reason this path was last refused or skipped for ("" if none).
    ``marker``: whether the ready marker of the entry's top-level directory exists (None
    when no marker applies: none configured, or a top-level entry that is no directory).
    ``found``: the staged entry (None when absent, or ``skipped`` says why it cannot be
    published). ``live``/``live_source``: the index entry at ``repo_path``; ``live_below``:
    the live paths of this source at and below it (for deletions and replacements, see
    :func:`replaces`). ``set_aside``: a
    set-aside record exists, ``aside`` its fingerprint. ``settle_at``: 0.0 once the file
    is settled, else when to look again (``batching.Settler``). ``writers``: whether a
    process has the file open for writing (None: the kernel cannot say).

    Tarball drops (``tarballs = "ingest"``): ``drop`` says the entry is a top-level tarball
    name and ``repo_path`` is its base (the directory it is published as);
    ``refused_drop`` why it is no drop (another entry takes its base, or the base is
    unsafe). ``live_elsewhere``: the entry live at ``repo_path`` came from another input of
    this source (a tarball whose base holds it), so it is not this entry's to delete or
    keep.
    """

    entry: Pending
    repo_path: str = ""
    unmappable: str = ""
    reported: str = ""
    marker: bool | None = None
    found: Fingerprint | None = None
    skipped: str = ""
    live: Fingerprint | None = None
    live_source: str = ""
    live_below: tuple[str, ...] = ()
    set_aside: bool = False
    aside: Fingerprint | None = None
    settle_at: float = 0.0
    writers: bool | None = None
    drop: bool = False
    refused_drop: RefusedDrop | None = None
    live_elsewhere: bool = False


@dataclass(frozen=True, slots=True)
class StagingView:
    """What the staging source saw of itself, looked at only when a plan deletes.

    ``root_problem``: why the staging path cannot be trusted ("" when it can);
    ``live_count``: the paths this source has live.
    """

    root_problem: str = ""
    live_count: int = 0


def same_staged(found: Fingerprint, live: Fingerprint) -> bool:
    """Return True if a staged entry equals what is live.

    Directories compare by type and mode only: their mtime moves with every child.
    """
    if found.type is EntryType.DIRECTORY:
        return live.type is EntryType.DIRECTORY and found.mode == live.mode
    if found.type is EntryType.FILE and found.inode != live.inode:
        # A file renamed over the old one (tar, rsync -t, a build with a fixed mtime) may
        # keep size, mode and mtime: a new inode means new content until proven otherwise.
        return False
    return found.same_content(live)


def replaces(obs: StagedObservation) -> bool:
    """Return True if the staged entry replaces a live one of another type (a directory by
    a file or symlink, or the other way round): publishing it deletes what it replaces.
    Never for a tarball drop, whose ingest replaces its base's content itself."""
    return (
        not obs.drop
        and obs.found is not None
        and obs.live is not None
        and obs.found.type != obs.live.type
    )


def reserved_in(rel: str) -> str | None:
    """Return why some component of ``rel`` is reserved by CernVM-FS, or None."""
    for part in rel.split("/"):
        why = reserved_name(part)
        if why:
            return why
    return None


def staged_name_verdict(obs: StagedObservation, policy: StagingPolicy) -> Verdict | None:
    """Decide by the name alone (nothing of the staging directory read), or return None."""
    rel = obs.entry.rel_path
    if not rel or is_ignored(rel, policy.ignore):
        return Verdict(Fate.IGNORED)  # the target directory exists in the repository already
    if obs.unmappable:
        return Verdict(Fate.REFUSED, f"unsafe name: {obs.unmappable}")
    refused = None if policy.allow_reserved_names else reserved_in(rel)
    if refused:
        return Verdict(Fate.REFUSED, refused)
    if policy.ready_marker and rel.partition("/")[2] == policy.ready_marker:
        return Verdict(Fate.IGNORED)  # the marker itself is never published
    if obs.refused_drop is not None:
        return drop_verdict(obs.refused_drop)
    return None


def staged_content_verdict(obs: StagedObservation, policy: StagingPolicy) -> Verdict:
    """Decide by what is staged, live and set aside (the name and marker allowed it)."""
    found = obs.found
    mine = obs.live is not None and obs.live_source == policy.source and not obs.live_elsewhere
    if found is None:
        if obs.skipped:
            return Verdict(Fate.SKIPPED, obs.skipped)
        return Verdict(Fate.DELETE if policy.mirror and mine else Fate.GONE)
    if obs.set_aside and obs.aside is not None and same_staged(found, obs.aside):
        return Verdict(Fate.ASIDE)
    if mine and obs.live is not None and same_staged(found, obs.live):
        return Verdict(Fate.UNCHANGED)
    return Verdict(Fate.CHANGED)


def staged_verdict(obs: StagedObservation, policy: StagingPolicy) -> Verdict:
    """Where an entry goes, before settling and the writer check."""
    by_name = staged_name_verdict(obs, policy)
    if by_name is not None:
        return by_name
    if obs.marker is False:
        return Verdict(Fate.WAITING)
    return staged_content_verdict(obs, policy)


def writer_gone(entry: Pending, writers: bool | None, now: float, settle_seconds: float) -> bool:
    """Return True if no process has the settled file open for writing.

    Asked of the kernel for every file, whatever the hint said: a writer that pauses
    longer than settle_seconds must not get a half-written file published, and a scan
    (after a restart, or when a watch event was lost) cannot tell. Where the kernel cannot
    say (``writers`` None), a file seen modified without a close waits for a long quiet
    time (60 s, or ten settle periods); one with no such sign is taken once settled.
    """
    if writers is not None:
        return not writers
    if not entry.writing:
        return True
    return now - entry.last_at >= max(60.0, 10 * settle_seconds)


def plan_staged(
    observations: Sequence[StagedObservation],
    policy: StagingPolicy,
    now: float,
    view: StagingView = StagingView(),
) -> Planned:
    """Decide what a batch does with each observed staged entry.

    Unsettled files, and files a process still writes, are deferred; entries of a
    ready-marker directory without its marker wait for it, and such a directory goes
    live whole (if one of its files is deferred, all of them are); a replacement goes in
    one revision with what it replaces (:func:`_replace_whole`); a settled tarball drop
    becomes an INGEST op at its base, and what else the plan does there waits for it
    (:class:`IngestBases`); deletions of a mirror source, replaced subtrees (and
    a deleted tarball's base) counted, pass the mass-deletion guard or are all held.
    """
    result = Planned()
    plan = result.plan
    groups: dict[str, list[str]] = {}
    #: repo path -> the live paths its op removes (deletions and replacements)
    removes: dict[str, tuple[str, ...]] = {}
    replacements: list[StagedObservation] = []
    later = now + policy.settle_seconds
    ingests = IngestBases(later)
    for obs in drops_first(observations):
        entry = obs.entry
        rel = entry.rel_path
        verdict = staged_verdict(obs, policy)
        fate = verdict.fate
        if fate in (Fate.REFUSED, Fate.SKIPPED):
            _report(result, entry, verdict, obs.reported)
            continue
        if fate is Fate.WAITING:
            plan.waiting_for_marker.append(entry)
            continue
        if fate in (Fate.GONE, Fate.DELETE, Fate.UNCHANGED):
            result.forget.append(entry.key)
        if fate is Fate.DELETE:
            delete = Op(OpKind.DELETE, obs.repo_path, policy.source, rel)
            if ingests.add(plan, entry, delete):
                removes[obs.repo_path] = obs.live_below
        found = obs.found
        if found is not None and obs.set_aside and fate is not Fate.ASIDE:
            result.clear_set_aside.append(rel)
        if fate is not Fate.CHANGED or found is None:
            continue
        if obs.drop and found.type is not EntryType.FILE:
            plan.deferred.append(entry.deferred_until(later))  # replaced since it was listed
            continue
        if replaces(obs):
            replacements.append(obs)
            removes[obs.repo_path] = obs.live_below
        if found.type is EntryType.FILE:
            if obs.settle_at:
                plan.deferred.append(entry.deferred_until(obs.settle_at))
                continue
            if not writer_gone(entry, obs.writers, now, policy.settle_seconds):
                plan.deferred.append(entry.deferred_until(later))
                continue
            kind = (
                OpKind.INGEST
                if obs.drop
                else file_op_kind(
                    rel.rsplit("/", 1)[-1],
                    found.size,
                    policy.content,
                    prepare=policy.prepare,
                    graft_at=policy.graft_at,
                )
            )
        elif found.type is EntryType.DIRECTORY:
            kind = OpKind.MAKE_DIR
        else:
            kind = OpKind.MAKE_SYMLINK
        if not ingests.add(plan, entry, Op(kind, obs.repo_path, policy.source, rel, found)):
            removes.pop(obs.repo_path, None)
            continue
        top, _, inner = rel.partition("/")
        if policy.ready_marker and inner:
            groups.setdefault(top, []).append(obs.repo_path)
    if policy.ready_marker:
        # A ready-marker directory goes live whole: if any of its files must wait
        # (settling, still written), the whole directory waits with it.
        waiting = {e.rel_path.partition("/")[0] for e in plan.deferred if "/" in e.rel_path}
        for top in waiting & set(groups):
            held = set(groups.pop(top))
            plan.deferred += [
                plan.origin.pop(o.repo_path).deferred_until(later)
                for o in plan.ops
                if o.repo_path in held
            ]
            plan.ops = [o for o in plan.ops if o.repo_path not in held]
    plan.atomic_groups = [paths for paths in groups.values() if paths]
    replaced = _replace_whole(result, replacements, policy, now)
    plan.atomic_groups += replaced
    deletes = count_deleted(removes[o.repo_path] for o in plan.ops if o.repo_path in removes)
    if policy.mirror and deletes:
        # A replacement deletes what it replaces: held with the deletions, and whole.
        together = [path for paths in replaced for path in paths]
        if view.root_problem:
            hold_deletes(plan, view.root_problem, HoldReason.STAGING_MISSING, together)
        else:
            why = deletion_guard(deletes, view.live_count, policy.max_delete_share)
            if why:
                hold_deletes(plan, why, HoldReason.MASS_DELETE, together)
    return result


def _below(rel: str, top: str) -> bool:
    return rel == top or rel.startswith(top + "/")


def _replace_whole(
    result: Planned,
    replacements: Sequence[StagedObservation],
    policy: StagingPolicy,
    now: float,
) -> list[list[str]]:
    """Keep each replacement in one revision; return the repo paths of each one's ops.

    A replacement's ops are those at and below its path: the deletions of what was live
    below a replaced directory, the new entry, and the content of a new directory. While
    any of them is deferred (the new file, or a file of the new directory, settling or
    still written), all of them wait, so the old entry stays live; that ends
    ``max_batch_seconds`` after the change was first seen, and then what is ready goes
    alone (the old entry's deletion first of all; recorded in ``replaced_alone``). The ops
    of a replacement are an atomic group: the caps never split them across batches.
    """
    plan = result.plan
    groups: list[list[str]] = []
    for obs in sorted(replacements, key=lambda o: o.entry.rel_path.count("/")):
        rel = obs.entry.rel_path
        members = [o.repo_path for o in plan.ops if _below(o.source_path, rel)]
        blockers = [e for e in plan.deferred if _below(e.rel_path, rel)]
        if blockers:
            seen = [obs.entry, *blockers, *(plan.origin[p] for p in members)]
            deadline = min(e.first_at for e in seen) + policy.max_batch_seconds
            if now < deadline:
                until = min(*(e.not_before for e in blockers), deadline)
                plan.deferred += [plan.origin.pop(p).deferred_until(until) for p in members]
                held = set(members)
                plan.ops = [o for o in plan.ops if o.repo_path not in held]
                continue
            if members:
                result.replaced_alone.append(rel)
        if members:
            groups.append(members)
    return groups
