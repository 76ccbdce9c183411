"""``cvmfs_server mount``: repair missing mounts silently."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import (
    check_union_violations,
    remount_published,
    require_repo,
    split_repo_arg,
)
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.recorded import FUSE_CHATTER
from tests.fake_cvmfs.server.repository import Repo, list_repositories


def cmd_mount(ctx: Context, args: list[str]) -> None:
    """``mount REPO`` / ``mount -a``: repair missing mounts silently."""
    opts, rest = parse_options(args, "a")
    if any(key == "-a" for key, _ in opts):
        names = list_repositories(ctx.root)
    elif len(rest) == 1:
        names = [split_repo_arg(rest[0])[0]]
        require_repo(ctx, names[0])
    else:
        ctx.err("usage: cvmfs_server mount <repository name> | -a\n")
        raise CommandExit(1)
    ctx.fault("start")
    for name in names:
        repo = Repo(ctx.root, name)
        ctx.repo_name = name
        ctx.storage_fault()
        ctx.lock_repo(repo)
        check_union_violations(ctx, repo)
        state = repo.mount_state()
        if not state["rdonly_mounted"]:
            ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))
            repo.set_mount_state(rdonly_mounted=True)
        if not state["union_mounted"]:
            repo.set_mount_state(union_mounted=True, union_rw=repo.in_transaction())
            if not repo.in_transaction():
                remount_published(repo)
        ctx.release_locks()
