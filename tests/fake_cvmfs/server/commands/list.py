"""``cvmfs_server list``: every repository with its status."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import check_union_violations, whitelist_problem
from tests.fake_cvmfs.server.context import Context
from tests.fake_cvmfs.server.repository import Repo, list_repositories


def cmd_list(ctx: Context, args: list[str]) -> None:
    """``list``: every repository with its status."""
    del args
    ctx.fault("start")
    for name in list_repositories(ctx.root):
        repo = Repo(ctx.root, name)
        ctx.repo_name = name
        if ctx.lock_repo(repo, wait=False):
            check_union_violations(ctx, repo)
            ctx.release_locks()
        parts = ["S3" if repo.is_s3 else "gw" if repo.is_gateway else "local"]
        if repo.in_transaction():
            parts.append("in transaction")
        state = repo.mount_state()
        if not (state["union_mounted"] and state["rdonly_mounted"]):
            parts.append("unhealthy")
        problem = whitelist_problem(ctx, repo)
        if problem == "expired whitelist":
            parts.append("whitelist expired")
        elif problem == "failed to download whitelist":
            parts.append("whitelist unreachable")
        elif problem == "malformed whitelist":
            parts.append("whitelist malformed")
        ctx.out(f"{name} (stratum0 / {' - '.join(parts)})  \n")
