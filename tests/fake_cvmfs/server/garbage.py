"""Mark and sweep of unreferenced objects, shared by ``gc``, publish's automatic gc and mkfs."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, NoReturn

from tests.fake_cvmfs.server.clock import parse_gc_time, utc, utc_seconds
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.files import read_json, write_atomic
from tests.fake_cvmfs.server.recorded import (
    AUTO_GC_DEFAULT_LAPSE,
    AUTO_GC_DEFAULT_TIMESPAN,
    LAST_GC_FORMAT,
)
from tests.fake_cvmfs.server.repository import Repo, record_refs


class GcPlan:
    """What one gc run keeps and removes."""

    def __init__(
        self, preserved: list[dict[str, Any]], swept: list[dict[str, Any]], threshold: float
    ) -> None:
        self.preserved = preserved
        self.swept = swept
        self.threshold = threshold


def gc_plan(repo: Repo, keep_revisions: int | None, threshold: float) -> GcPlan:
    """Which revisions a gc keeps: the head, every tagged one, and either the
    ``keep_revisions`` newest older ones or those not older than ``threshold``."""
    manifest = repo.manifest()
    tagged = {int(t["revision"]) for t in repo.tags()}
    existing = [
        r for r in repo.revisions() if repo.object_file(str(r["root_hash"]) + "C").is_file()
    ]
    head = manifest.revision
    keep = {head} | tagged
    older = sorted(
        (int(r["revision"]) for r in existing if int(r["revision"]) < head), reverse=True
    )
    if keep_revisions is not None:
        keep |= set(older[:keep_revisions])
        aux_threshold = next(
            (float(r["timestamp"]) for r in existing if int(r["revision"]) == head), threshold
        )
    else:
        keep |= {int(r["revision"]) for r in existing if float(r["timestamp"]) >= threshold}
        aux_threshold = threshold
    preserved = [r for r in existing if int(r["revision"]) in keep]
    preserved.sort(key=lambda r: (int(r["revision"]) != head, int(r["revision"])))
    swept = sorted(
        (r for r in existing if int(r["revision"]) not in keep), key=lambda r: -int(r["revision"])
    )
    return GcPlan(preserved, swept, aux_threshold)


def collect_garbage(
    ctx: Context,
    repo: Repo,
    plan: GcPlan,
    *,
    dry: bool,
    listing: bool,
    fail: Callable[[dict[str, Any]], NoReturn] | None = None,
) -> None:
    """What ``cvmfs_swissknife gc`` and the shell's ``__run_gc`` do, shared by ``gc`` and
    publish's automatic gc: mark and sweep, then record ``last_gc`` in the storage's
    ``.cvmfs_status.json``. ``fail`` is the failure of the ``sweep`` fault point."""
    _gc_sweep(ctx, repo, plan, dry=dry, listing=listing, fail=fail)
    if not dry:
        ctx.out(f"Statistics stored at: {repo.spool}/stats.db\n")
        write_gc_status(repo, ctx.now())


def write_gc_status(repo: Repo, when: float) -> None:
    """Record a finished gc in ``.cvmfs_status.json`` (``last_gc`` as ``date --utc`` prints it)."""
    status = read_json(repo.storage / ".cvmfs_status.json", {})
    if not isinstance(status, dict):
        status = {}
    status["last_gc"] = utc(LAST_GC_FORMAT, when)
    write_atomic(repo.storage / ".cvmfs_status.json", json.dumps(status, indent=2).encode())


def parse_last_gc(text: str) -> float | None:
    """Parse ``last_gc`` (``date --utc`` output, e.g. ``Sun Nov 29 21:15:48 UTC 2026``)."""
    try:
        return utc_seconds(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S UTC %Y"))
    except ValueError:
        return parse_gc_time(text, time.time()) if text else None


def auto_gc_enabled(repo: Repo) -> bool:
    """``is_garbage_collectable`` and ``CVMFS_AUTO_GC``: both compared with "true" verbatim."""
    conf = repo.conf
    return conf.get("CVMFS_GARBAGE_COLLECTION") == "true" and conf.get("CVMFS_AUTO_GC") == "true"


def auto_gc_due(ctx: Context, repo: Repo) -> bool:
    """The shell's ``is_due_auto_garbage_collection``.

    Due when automatic gc is enabled and ``last_gc`` is older than ``CVMFS_AUTO_GC_LAPSE``
    (``date --date`` syntax, default "1 day ago"); also due when there is no ``last_gc``
    or either date cannot be parsed (with the script's messages on stderr).
    """
    if not auto_gc_enabled(repo):
        return False
    lapse = repo.conf.get("CVMFS_AUTO_GC_LAPSE") or AUTO_GC_DEFAULT_LAPSE
    deadline = parse_gc_time(lapse, ctx.now())
    if deadline is None:
        ctx.err(f"Failed to parse CVMFS_AUTO_GC_LAPSE: '{lapse}'\n")
        return True
    status = read_json(repo.storage / ".cvmfs_status.json", {})
    text = str(status.get("last_gc") or "") if isinstance(status, dict) else ""
    if not text:
        return True
    last_gc = parse_last_gc(text)
    if last_gc is None:
        # the script reassigns the variable before printing it, so the message is empty
        ctx.err("Failed to parse last gc timestamp: ''\n")
        return True
    return int(last_gc) < int(deadline)


def auto_gc_threshold(ctx: Context, repo: Repo, now: float) -> float:
    """``get_auto_garbage_collection_timespan``: revisions newer than this survive auto gc.

    Publish computes it before doing anything, for every repository (gc enabled or not),
    and stops with exit 1 when ``CVMFS_AUTO_GC_TIMESPAN`` cannot be parsed.
    """
    text = repo.conf.get("CVMFS_AUTO_GC_TIMESPAN") or AUTO_GC_DEFAULT_TIMESPAN
    threshold = parse_gc_time(text, now)
    if threshold is None:
        ctx.err(f"Failed to parse CVMFS_AUTO_GC_TIMESPAN: '{text}'\n")
        raise CommandExit(1)
    return threshold


def _gc_sweep(
    ctx: Context,
    repo: Repo,
    plan: GcPlan,
    *,
    dry: bool,
    listing: bool,
    fail: Callable[[dict[str, Any]], NoReturn] | None = None,
) -> None:
    def stamp() -> str:
        return utc("[%a, %d %b %Y %H:%M:%S GMT]", ctx.now())

    def day(value: float) -> str:
        return utc("%d %b %Y %H:%M:%S", value)

    ctx.out(f"  --> marking unreferenced objects {stamp()}\n")
    keep_objects: set[str] = set()
    if listing:
        ctx.out("Preserving data objects in latest revision\n")
    for rev in plan.preserved:
        with contextlib.suppress(OSError, ValueError):
            catalog = repo.catalog(str(rev["root_hash"]))
            for entry in catalog.entries.values():
                keep_objects.update(entry.objects())
        if listing:
            ctx.out(
                f"Preserving Revision {rev['revision']} ({day(rev['timestamp'])} / "
                f"added @ {day(rev['timestamp'])})\n├─ {rev['root_hash']} /\n"
            )
    ctx.fault("sweep", fail)
    ctx.out(f"  --> sweeping unreferenced objects {stamp()}\n")
    removed: set[str] = set()
    for index, rev in enumerate(plan.swept, start=1):
        root_hash = str(rev["root_hash"])
        if listing:
            ctx.out(
                f"Sweeping Revision {rev['revision']} ({day(rev['timestamp'])})\n├─ {root_hash} /\n"
            )
        names: set[str] = set()
        with contextlib.suppress(OSError, ValueError):
            for entry in repo.catalog(root_hash).entries.values():
                names.update(entry.objects())
        doomed = sorted(n for n in names - keep_objects - removed if repo.object_file(n).is_file())
        for name in [*doomed, root_hash + "C"]:
            if listing:
                ctx.out(f"Sweep: {name}\n")
            removed.add(name)
            if not dry:
                repo.object_file(name).unlink(missing_ok=True)
        if listing:
            percent = index * 100 // len(plan.swept)
            ctx.out(
                f"      - {percent}%    {index} / {len(plan.swept)} unreferenced revisions "
                f"removed {stamp()}\n"
            )
    ctx.out(f"  --> done garbage collecting {stamp()}\n")
    current_history = repo.manifest().history
    old_histories = [
        r
        for r in repo.reflog().get("refs", [])
        if r[1] == 2
        and r[0] != current_history
        and float(r[2]) < plan.threshold
        and repo.object_file(r[0]).is_file()
    ]
    if listing:
        ctx.out(
            f"Sweeping auxiliary objects older than {day(plan.threshold)}\n"
            f"Scanning 0 certificate objects\n"
            f"Scanning {len(old_histories)} tag database objects\n"
        )
        for ref in old_histories:
            ctx.out(f"  sweep: {ref[0]}\n")
        ctx.out("Scanning 0 repository meta information objects\n")
    if dry:
        return
    for ref in old_histories:
        repo.object_file(ref[0]).unlink(missing_ok=True)
        removed.add(ref[0])
    if removed:
        manifest = repo.manifest()
        manifest.reflog = record_refs(repo, [], ctx.now(), drop=removed)
        repo.write_manifest(manifest)
