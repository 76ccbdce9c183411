"""``cvmfs_server list-catalogs``: the published revision's catalogs as a tree."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.nested import catalog_tree


def cmd_list_catalogs(ctx: Context, args: list[str]) -> None:
    """``list-catalogs [-h] [-x] REPO``: ``/`` and the nested catalogs depth first, drawn as
    swissknife's ``lsrepo`` draws them (m2_ingest 11); ``-h`` puts each catalog's hash
    first, ``-x`` leaves the tree drawing out."""
    opts, rest = parse_options(args, "hx")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server list-catalogs [-h] [-x] <repository name>\n")
        raise CommandExit(1)
    flags = {key for key, _ in opts}
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    root_hash = repo.manifest().root_hash
    for level, mountpoint, digest in catalog_tree(repo.catalog(root_hash)):
        indent = ""
        if "-x" not in flags and level:
            indent = "│  " * (level - 1) + "├─ "
        shown = f"{digest or root_hash} " if "-h" in flags else ""
        ctx.out(f"{indent}{shown}{mountpoint}\n")
