"""``cvmfs_server info``: a repository's name, whitelist validity and client configuration."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg, whitelist_problem
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.recorded import CREATOR_VERSION, TRACE_REPOSITORY


def cmd_info(ctx: Context, args: list[str]) -> None:
    """``info REPO``."""
    if len(args) != 1:
        ctx.err("usage: cvmfs_server info <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(args[0])[0])
    ctx.fault("start")
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"(unexpected termination) cannot load whitelist [{problem}]\n" + TRACE_REPOSITORY)
        raise CommandExit(1)
    expiry = repo.whitelist().expiry() or 0.0
    days = int((expiry - ctx.now()) // 86400)
    pub = repo.key("pub")
    ctx.out(
        f"Repository name: {repo.name}\n"
        f"Created by CernVM-FS {repo.conf.get('CVMFS_CREATOR_VERSION', CREATOR_VERSION)}\n"
        "Stratum1 replication allowed: "
        f"{'yes' if (repo.storage / '.cvmfs_master_replica').exists() else 'no'}\n"
        f"Whitelist is valid for another {days} days\n"
        "\n"
        "Client configuration:\n"
        f"Add {repo.name} to CVMFS_REPOSITORIES in /etc/cvmfs/default.local\n"
        f"Create /etc/cvmfs/config.d/{repo.name}.conf and set\n"
        f"  CVMFS_SERVER_URL={repo.stratum0}\n"
        f"  CVMFS_PUBLIC_KEY={pub}\n"
        f"Copy {pub} to the client\n"
    )
