"""``cvmfs_server list-catalogs``: the fake has one catalog per revision, at ``/``."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options


def cmd_list_catalogs(ctx: Context, args: list[str]) -> None:
    """``list-catalogs [-s] [-e] [-h] [-x] REPO``: ``/`` (p_gateway_maintenance 14; nested
    catalogs are not modelled, and the options' extra columns neither)."""
    _, rest = parse_options(args, "sehx")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server list-catalogs [-s] [-e] [-h] [-x] <repository name>\n")
        raise CommandExit(1)
    require_repo(ctx, split_repo_arg(rest[0])[0])
    ctx.fault("start")
    ctx.out("/\n")
