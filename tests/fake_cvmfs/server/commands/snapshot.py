"""``cvmfs_server snapshot``: a stratum 1's command; every fake repository is a stratum 0."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options


def cmd_snapshot(ctx: Context, args: list[str]) -> None:
    """``snapshot REPO``: exit 1, ``not a stratum 1 repository`` (p_gateway_maintenance 16)."""
    _, rest = parse_options(args, "atsn:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server snapshot [-t] [-s] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    ctx.fault("start")
    ctx.out(f"Repository {repo.name} is not a stratum 1 repository\n")
    raise CommandExit(1)
