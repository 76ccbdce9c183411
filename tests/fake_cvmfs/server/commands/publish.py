"""``cvmfs_server publish``: the checks, the sync, tags, manifest and automatic gc."""

from __future__ import annotations

import os
import stat
from typing import Any, NoReturn

from tests.fake_cvmfs.server.catalog import (
    Catalog,
    revision_record,
    store_catalog,
    store_history,
    tag_row,
)
from tests.fake_cvmfs.server.checks import (
    check_union_violations,
    cwd_inside,
    open_fds_under,
    repair_mounts,
    require_repo,
    split_repo_arg,
    whitelist_problem,
)
from tests.fake_cvmfs.server.clock import parse_timespan, utc
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.faults import command_costs
from tests.fake_cvmfs.server.garbage import auto_gc_due, auto_gc_threshold, collect_garbage, gc_plan
from tests.fake_cvmfs.server.receiver import publish_through_gateway
from tests.fake_cvmfs.server.recorded import PUBLISH_STEPS_BEFORE_UPLOAD
from tests.fake_cvmfs.server.repository import Repo, record_refs
from tests.fake_cvmfs.server.storage import Manifest
from tests.fake_cvmfs.server.sync import (
    Ingester,
    PublishJob,
    finish_union,
    plan_catalog,
    upload_failure,
)
from tests.fake_cvmfs.server.union import load_snapshot, scan_tree


def cmd_publish(ctx: Context, args: list[str]) -> None:
    """``publish [-m MSG] [-a TAG] [-f] REPO[/path]``."""
    opts, rest = parse_options(args, "m:a:fpe:vF:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server publish [options] <repository name>\n")
        raise CommandExit(1)
    name, _ = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    ctx.fail_on_broken_pipe = True
    options = dict(opts)
    force = "-f" in options
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(rule, f"Repository unavailable under {repo.stratum0}\n", "", 1),
    )
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    _publish_mount_checks(ctx, repo)
    if ctx.storage_fault() == "unreachable":
        ctx.out(f"Repository unavailable under {repo.stratum0}\n")
        raise CommandExit(1)
    if whitelist_problem(ctx, repo) == "expired whitelist":
        ctx.out(f"Repository whitelist for {repo.name} is expired!\n")
        raise CommandExit(1)
    if not repo.in_transaction():
        ctx.out(f"Repository {repo.name} is not in a transaction\n")
        raise CommandExit(1)
    if (repo.spool / "is_collecting.lock").exists():
        ctx.err(f"Repository {repo.name} is busy: garbage collection is running\n")
        raise CommandExit(1)
    if cwd_inside(repo.union):
        ctx.out(
            f"Current working directory is in {repo.union}.  Please release, e.g. by 'cd $HOME'.\n"
        )
        raise CommandExit(1)
    writable, readonly = open_fds_under(repo.union)
    if writable:
        ctx.out(f"Open writable file descriptors on {repo.name}\n")
        raise CommandExit(1)
    now = ctx.now()
    gc_threshold = auto_gc_threshold(ctx, repo, now)
    manifest = repo.manifest()
    tag_name = options.get("-a", "")
    if not tag_name and repo.flag("CVMFS_AUTO_TAG", default=True):
        tag_name = _auto_tag_name(repo, now)
        ctx.out(f"Using auto tag '{tag_name}'\n")
    if readonly:
        _confirm_readonly_fds(ctx, repo, readonly, force=force)
    job = PublishJob(repo, manifest, tag_name, options.get("-m"), now, gc_threshold)
    publishing = repo.spool / "is_publishing.lock"
    publishing.touch()
    # the union is read-only while publish works on it: a publish killed without its
    # cleanup trap (SIGKILL to its group) leaves it so, with the lock (faults.md F9)
    repo.set_mount_state(union_rw=False)
    try:
        if repo.is_gateway:
            publish_through_gateway(ctx, job, options.get("-a"))
        else:
            _run_publish(ctx, job)
    except BaseException:
        # the cleanup trap (publish_failed): the transaction stays open, read/write
        if repo.in_transaction():
            repo.set_mount_state(union_rw=True)
        raise
    finally:
        publishing.unlink(missing_ok=True)
    # the real publish ends with a file system flush after both locks are released
    ctx.release_locks()
    ctx.pad_until(job.cost(command_costs(ctx.root, "publish"), locked=False))


def _publish_mount_checks(ctx: Context, repo: Repo) -> None:
    state = repo.mount_state()
    in_txn = repo.in_transaction()
    if in_txn and (not state["union_mounted"] or not state["union_rw"]):
        if not state["union_mounted"]:
            ctx.err(f"{repo.union} is not mounted properly.\n")
        ctx.err(
            f"{repo.name} is in a transaction but {repo.union} is not mounted read/write\n"
            f"Repository {repo.name} is in a transaction and cannot be repaired.\n"
            f"--> Run `cvmfs_server abort {repo.name}` to revert and repair.\n"
        )
        raise CommandExit(1)
    if not repair_mounts(ctx, repo, style="publish"):
        ctx.err("Auto-Repair is disabled (CVMFS_AUTO_REPAIR_MOUNTPOINT = false)\n")
        raise CommandExit(1)


def _auto_tag_name(repo: Repo, now: float) -> str:
    try:
        existing = {str(t.get("name")) for t in repo.tags()}
    except (OSError, ValueError):
        existing = set()
    stamp = utc("%Y-%m-%dT%H:%M:%SZ", now)
    name = f"generic-{stamp}"
    counter = 0
    while name in existing:
        counter += 1
        name = f"generic_{counter}-{stamp}"
    return name


def _confirm_readonly_fds(ctx: Context, repo: Repo, lines: list[str], *, force: bool) -> None:
    report = "\n".join(lines)
    if force:
        ctx.out(
            f"WARNING: Open file descriptors on {repo.union} (possible race!)\n"
            "         The following lsof report might show the culprit:\n\n"
            f"{report}\n\n"
        )
        return
    ctx.out(
        f"\nWARNING! There are open read-only file descriptors in {repo.union}\n"
        "  --> This is potentially harmful and might cause problems later on.\n"
        "      We can anyway perform the requested operation, but this will most likely\n"
        f"      break other processes with open file descriptors on {repo.union}!\n\n"
        "      The following lsof report might show the processes with open file "
        "handles\n      \n"
        f"{report}\n\n         Do you want to proceed anyway? (y/N) "
    )
    answer = ctx.ask()
    if answer is None or answer.lower() not in ("y", "yes"):
        ctx.out("aborted.\n")
        raise CommandExit(1)


def _run_publish(ctx: Context, job: PublishJob) -> None:
    repo = job.repo
    ctx.fault("before_sync")
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[0])
    previous = repo.catalog(job.manifest.root_hash)
    snap = load_snapshot(repo)
    union = str(repo.union)
    current = scan_tree(repo.union)
    entries, todo = plan_catalog(ctx, job, previous, snap, current)
    job.copied = len(todo)
    ctx.out(PUBLISH_STEPS_BEFORE_UPLOAD[1])
    half = len(todo) // 2
    ingester = Ingester(job)
    for index, (path, st_info) in enumerate(todo):
        if index == half:
            ctx.fault("upload", lambda rule: upload_failure(ctx, job, rule))
        try:
            entries[path] = ingester.ingest(union + path, st_info)
        except OSError as exc:
            ctx.err(f"Failed to read {union + path}: {exc.strerror}\nSynchronization failed\n")
            raise CommandExit(1) from None
    if not todo:
        ctx.fault("upload", lambda rule: upload_failure(ctx, job, rule))
    ctx.fault("after_upload")
    revision = job.manifest.revision + 1
    catalog = Catalog(repo.name, revision, int(job.now), entries)
    ctx.out("Committing file catalogs...\n")
    root_hash, size = store_catalog(repo, catalog)
    ctx.out(
        "Swissknife Sync: Wait for all uploads to finish\n"
        "Swissknife Sync: Exporting repository manifest\n"
        f"Statistics stored at: {repo.spool}/stats.db\n"
    )
    ctx.out(f"Tagging {repo.name}\n")
    _check_served(ctx, repo, root_hash + "C")
    tags = _publish_tags(repo, job, revision_record(catalog, root_hash, size))
    history = store_history(repo, tags)
    ctx.out("Flushing file system buffers\n")
    ctx.out("Signing new manifest\n")
    ctx.fault(
        "signing",
        lambda rule: ctx.fail_with(
            rule,
            "",
            f"HTTP transfer error 7 (HTTP code -1): {repo.stratum0}/.cvmfsreflog\n"
            "failed loading reflog (3 - network failure)\nreflog missing\nSigning failed\n",
            1,
        ),
    )
    reflog = record_refs(repo, [(root_hash + "C", 0), (history, 2)], job.now)
    repo.add_revision(catalog, root_hash, size)
    repo.write_manifest(
        Manifest(
            root_hash,
            size,
            revision,
            job.manifest.garbage_collectable,
            repo.name,
            job.manifest.certificate,
            history,
            int(job.now),
            job.manifest.meta_info,
            reflog,
        )
    )
    (repo.spool / "client.local").write_text(f"CVMFS_ROOT_HASH={root_hash}\n")
    ctx.fault("after_manifest")
    if auto_gc_due(ctx, repo):
        _publish_auto_gc(ctx, job)
    ctx.out("Remounting newly created repository revision\n")
    finish_union(repo, catalog, current)
    ctx.pad_until(job.cost(command_costs(ctx.root, "publish"), locked=True))
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False)
    ctx.fault("end")


def _check_served(ctx: Context, repo: Repo, name: str) -> None:
    """The tag edit reads the new root catalog back over HTTP (local storage): an object
    file that is not world-readable gets a 403 from the web server (faults.md F4)."""
    if repo.is_s3:
        return
    try:
        readable = bool(os.stat(repo.object_file(name)).st_mode & stat.S_IROTH)
    except FileNotFoundError:
        readable = False
    if not readable:
        ctx.err(
            f"failed to download object '{name}' (9 - host returned HTTP error)\nTagging failed\n"
        )
        raise CommandExit(1)


def _publish_tags(repo: Repo, job: PublishJob, record: dict[str, Any]) -> list[dict[str, Any]]:
    tags = repo.tags()
    if job.tag_name:
        tags.append(tag_row(job.tag_name, record, job.message or ""))
    old_trunk = next((t for t in tags if t.get("name") == "trunk"), None)
    tags = [t for t in tags if t.get("name") not in ("trunk", "trunk-previous")]
    if old_trunk is not None:
        tags.append(dict(old_trunk, name="trunk-previous", description="default undo target"))
    tags.append(tag_row("trunk", record, "current HEAD"))
    span = parse_timespan(repo.conf.get("CVMFS_AUTO_TAG_TIMESPAN", ""))
    if span is not None:
        limit = job.now - span
        tags = [
            t
            for t in tags
            if not (
                str(t.get("name", "")).startswith("generic")
                and int(t.get("timestamp", 0)) < limit
                and t.get("name") != job.tag_name
            )
        ]
    return tags


def _publish_auto_gc(ctx: Context, job: PublishJob) -> None:
    """Publish's automatic gc (F10): after the new manifest is signed and before the remount.

    It runs inside the publish's own transaction (no ``is_collecting.lock``), preserves the
    new revision, every tagged revision and revisions newer than the auto-gc timespan, and
    prints swissknife's gc lines without a listing. A failure ends the publish with
    ``Garbage collection failed (6)`` and the transaction open; the new revision stays.
    """

    def failed(rule: dict[str, Any]) -> NoReturn:
        ctx.fail_with(rule, "", "Garbage collection failed (6)\n", 1)

    repo = job.repo
    job.auto_gc = True
    ctx.out("Running automatic garbage collection\n")
    ctx.fault("auto_gc", failed)
    plan = gc_plan(repo, None, job.gc_threshold)
    collect_garbage(ctx, repo, plan, dry=False, listing=False, fail=failed)
