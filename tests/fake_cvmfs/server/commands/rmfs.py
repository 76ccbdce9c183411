"""``cvmfs_server rmfs``: remove a repository whole."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import require_repo
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options


def cmd_rmfs(ctx: Context, args: list[str]) -> None:
    """``rmfs [-f] REPO``: remove configuration, keys, spool, union and storage."""
    opts, rest = parse_options(args, "fp")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server rmfs [-f] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, rest[0])
    if not any(key == "-f" for key, _ in opts):
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    ctx.fault("start")
    ctx.lock_repo(repo)
    import shutil

    storage = repo.storage
    ctx.out("Unmounting CernVM-FS Area... done\n")
    shutil.rmtree(repo.spool, ignore_errors=True)
    shutil.rmtree(repo.union, ignore_errors=True)
    ctx.out("Removing Spool Area... done\n")
    if not repo.is_s3 and not repo.is_gateway:  # a publisher's storage is the gateway's
        shutil.rmtree(storage, ignore_errors=True)
        ctx.out("Removing Repository Storage... done\n")
    shutil.rmtree(repo.repo_conf_dir, ignore_errors=True)
    ctx.out("Removing Configuration... done\n")
    for ext in ("key", "crt", "pub", "masterkey"):
        repo.key(ext).unlink(missing_ok=True)
    ctx.out("Removing Keys and Certificate... done\n")
    shutil.rmtree(repo.state_dir, ignore_errors=True)
    ctx.out("Updating global JSON information... done\n")
    ctx.out(f"CernVM-FS repository {repo.name} wiped out!\n")
