"""``cvmfs_server rollback``: modelled where it fails, on a gateway publisher."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.recorded import SESSION_FILE_MISSING


def cmd_rollback(ctx: Context, args: list[str]) -> None:
    """``rollback [-t TAG] [-f] REPO``: on a gateway publisher exit 1 with the recorded
    session-token error (p_gateway_maintenance 12); elsewhere not modelled (exit 1)."""
    opts, rest = parse_options(args, "t:f")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server rollback [-t tag] [-f] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    ctx.fault("start")
    if not repo.is_gateway:
        ctx.err("fake cvmfs_server: rollback is modelled on gateway publishers only\n")
        raise CommandExit(1)
    flags = {key for key, _ in opts}
    if "-f" not in flags:
        ctx.out(f"You are about to roll back {repo.name}. Are you sure (y/N)? ")
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    root_hash = repo.manifest().root_hash
    ctx.out(f"Rolling back repository (leaving behind {root_hash})\n")
    command = (
        f"cvmfs_swissknife tag_rollback -w {repo.stratum0} -t {repo.spool}/tmp "
        f"-p {repo.key('pub')} -f {repo.name} -r {repo.conf.get('CVMFS_UPSTREAM_STORAGE', '')} "
        f"-m {repo.spool}/tmp/manifest -b {root_hash} -e {repo.hash_algorithm}"
    )
    ctx.err(f"{SESSION_FILE_MISSING}Rollback failed\n\nExecuted Command:\n{command}\n")
    raise CommandExit(1)
