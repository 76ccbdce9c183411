"""``cvmfs_server abort``: discard the open transaction and restore the union directory."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import (
    check_union_violations,
    cwd_inside,
    repair_mounts,
    require_repo,
    split_repo_arg,
    whitelist_problem,
)
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.gateway import release_lease
from tests.fake_cvmfs.server.recorded import FUSE_CHATTER, TRACE_PUBLISHER
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.union import load_snapshot, save_snapshot, scan_tree, sync_union


def cmd_abort(ctx: Context, args: list[str]) -> None:
    """``abort [-f] REPO[/path]``."""
    opts, rest = parse_options(args, "f")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server abort [-f] <repository name>\n")
        raise CommandExit(1)
    name, _ = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(
            rule,
            "",
            "(unexpected termination) cannot load whitelist [failed to download "
            "whitelist]\n" + TRACE_PUBLISHER,
            1,
        ),
    )
    force = any(key == "-f" for key, _ in opts)
    if not force:
        ctx.out(
            f"You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION for "
            f"{repo.name}!  Are you sure (y/N)? "
        )
        answer = ctx.ask()
        if answer is not None and answer.lower() not in ("y", "yes"):
            raise CommandExit(4)
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    _abort_mount_checks(ctx, repo)
    if cwd_inside(repo.union):
        ctx.out(
            f"Current working directory is in {repo.union}.  Please release, e.g. by 'cd $HOME'.\n"
        )
        raise CommandExit(1)
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"(unexpected termination) cannot load whitelist [{problem}]\n" + TRACE_PUBLISHER)
        raise CommandExit(1)
    if not repo.in_transaction():
        ctx.err(f"Repository {repo.name} is not in a transaction\n")
        raise CommandExit(22)
    if (repo.spool / "is_collecting.lock").exists():
        ctx.err(f"Repository {repo.name} is busy: garbage collection is running\n")
        raise CommandExit(1)
    if repo.is_gateway:
        release_lease(ctx, repo, force=force)
    catalog = repo.catalog(repo.mounted_root_hash())
    sync_union(repo, catalog, load_snapshot(repo))
    save_snapshot(repo, scan_tree(repo.union))
    ctx.fault("after_restore")
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False, union_mounted=True, rdonly_mounted=True)
    ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))


def _abort_mount_checks(ctx: Context, repo: Repo) -> None:
    state = repo.mount_state()
    if state["union_mounted"] and state["rdonly_mounted"]:
        return
    if not repo.flag("CVMFS_AUTO_REPAIR_MOUNTPOINT", default=True):
        repair_mounts(ctx, repo, style="publish")
        ctx.err("Auto-Repair is disabled (CVMFS_AUTO_REPAIR_MOUNTPOINT = false)\n")
        raise CommandExit(1)
    in_txn = repo.in_transaction()
    repair_mounts(ctx, repo, style="transaction")
    if in_txn and not state["union_mounted"]:
        ctx.err(f"Trying to remount {repo.union} read/write... success\n")
