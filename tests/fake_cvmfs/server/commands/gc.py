"""``cvmfs_server gc``: garbage collection on request (the sweep itself is ``garbage.py``)."""

from __future__ import annotations

from tests.fake_cvmfs.server.checks import manifest_problem, require_repo, split_repo_arg
from tests.fake_cvmfs.server.clock import parse_gc_time, utc
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.garbage import collect_garbage, gc_plan
from tests.fake_cvmfs.server.recorded import GATEWAY_UPLOADER_PANIC, GC_DEFAULT_TIMESPAN
from tests.fake_cvmfs.server.repository import Repo


def cmd_gc(ctx: Context, args: list[str]) -> None:
    """``gc [-r N] [-t TIME] [-f] [-d] [-l] REPO``."""
    opts, rest = parse_options(args, "r:t:fdlLa")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server gc [options] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    flags = {key for key, _ in opts}
    values = dict(opts)
    dry = "-d" in flags
    now = ctx.now()
    keep_revisions: int | None = None
    threshold = now - GC_DEFAULT_TIMESPAN
    if "-r" in values:
        if not values["-r"].isdigit():
            ctx.err(f"invalid number of revisions: {values['-r']}\n")
            raise CommandExit(1)
        keep_revisions = int(values["-r"])
    if "-t" in values:
        parsed = parse_gc_time(values["-t"], now)
        if parsed is None:
            ctx.err(f"cannot parse time stamp: {values['-t']}\n")
            raise CommandExit(1)
        threshold = parsed
    ctx.fault("start")
    header = (
        f"Affected Repositories:          {repo.name}\n"
        f"Dry Run (no actual deletion):  {'yes' if dry else 'no'}\n"
        "Needs Reflog reconstruction:   no\n"
    )
    if keep_revisions is not None:
        header += f"Preserved Legacy Revisions:    {keep_revisions}\n"
        if keep_revisions == 0:
            header += "Only the latest revision will be preserved.\n"
    else:
        header += f"Preserve Revisions newer than: {utc('%Y/%m/%d %H:%M:%S', threshold)}\n"
    if "-f" not in flags:
        ctx.out(
            "YOU ARE ABOUT TO DELETE DATA! Are you sure you want to do the following:\n"
            + header
            + "\n"
        )
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    else:
        ctx.out(header)
    if not repo.flag("CVMFS_GARBAGE_COLLECTION"):
        ctx.err(f"Garbage Collection is not enabled for {repo.name}\n")
        raise CommandExit(1)
    ctx.lock_repo(repo)
    if not dry and repo.in_transaction():
        ctx.err("Cannot run garbage collection while in a transaction\n")
        raise CommandExit(1)
    problem = manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"failed to fetch repository manifest ({problem})\n")
        raise CommandExit(1)
    _run_gc(ctx, repo, keep_revisions, threshold, dry=dry, listing="-l" in flags)


def _run_gc(
    ctx: Context,
    repo: Repo,
    keep_revisions: int | None,
    threshold: float,
    *,
    dry: bool,
    listing: bool,
) -> None:
    plan = gc_plan(repo, keep_revisions, threshold)
    locks = [repo.spool / "in_transaction.lock", repo.spool / "is_collecting.lock"]
    if not dry:
        for lock in locks:
            lock.touch()
        locks[0].chmod(0o600)
    try:
        ctx.fault("locked")
        ctx.out("Running Garbage Collection \n")
        if repo.is_gateway:  # gc belongs to the gateway (maintenance 10, 11, 20)
            reflog_known = (repo.spool / "reflog.chksum").exists()
            ctx.err(
                (GATEWAY_UPLOADER_PANIC if reflog_known else "Could not read reflog checksum\n")
                + "Fail (6)!\n"
            )
            raise CommandExit(1)
        collect_garbage(ctx, repo, plan, dry=dry, listing=listing)
    finally:
        if not dry:
            for lock in locks:
                lock.unlink(missing_ok=True)
