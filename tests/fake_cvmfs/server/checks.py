"""Checks that several commands make before acting.

The repository argument, the whitelist, the mounts (and their repair), changes made to
the union directory outside a transaction, open files and the working directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tests.fake_cvmfs.server.clock import utc
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.files import flocked
from tests.fake_cvmfs.server.recorded import FUSE_CHATTER
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.union import (
    diff_tree,
    load_snapshot,
    save_snapshot,
    scan_tree,
    sync_union,
)


def split_repo_arg(arg: str) -> tuple[str, str]:
    """Split ``repo/sub/path`` into (repo, "/sub/path"); the path may be empty."""
    name, _, sub = arg.partition("/")
    sub = sub.strip("/")
    return name, f"/{sub}" if sub else ""


def require_repo(ctx: Context, name: str, *, period: bool = True) -> Repo:
    """Load a repository or fail with the recorded unknown-repository message."""
    repo = Repo(ctx.root, name)
    ctx.repo_name = name
    if not repo.exists():
        ctx.err(f"The repository {name} does not exist{'.' if period else ''}\n")
        raise CommandExit(1)
    return repo


def whitelist_problem(ctx: Context, repo: Repo) -> str | None:
    """Why the whitelist cannot be loaded ("expired whitelist", ...), or None when valid."""
    if ctx.storage_fault() == "unreachable":
        return "failed to download whitelist"
    try:
        whitelist = repo.whitelist()
    except (OSError, ValueError):
        return "failed to download whitelist"
    expiry = whitelist.expiry()
    if expiry is None:
        return "malformed whitelist"
    if ctx.now() >= expiry:
        return "expired whitelist"
    return None


def manifest_problem(ctx: Context, repo: Repo) -> str | None:
    """Why swissknife could not fetch the manifest ("3 - network failure", "8 - bad
    whitelist"), or None."""
    problem = whitelist_problem(ctx, repo)
    if problem == "failed to download whitelist":
        return "3 - network failure"
    if problem is not None:
        return "8 - bad whitelist"
    return None


def check_union_violations(ctx: Context, repo: Repo) -> None:
    """Log and revert changes made to the union directory outside a transaction."""
    if repo.in_transaction() or not repo.mount_state()["union_mounted"]:
        return
    snap = load_snapshot(repo)
    if not snap:
        return
    current = scan_tree(repo.union)
    changes = diff_tree(snap, current)
    if not changes:
        return
    stamp = utc("%Y-%m-%dT%H:%M:%SZ", time.time())
    lines = [
        f"{stamp} {repo.name}: {change} in {repo.union} outside a transaction "
        f"(noticed by `{ctx.command}`)\n"
        for change in changes
    ]
    with (
        flocked(ctx.root / "fake" / "violations.lock"),
        (ctx.root / "fake-violations.log").open("a") as log,
    ):
        log.writelines(lines)
    try:
        catalog = repo.catalog(repo.mounted_root_hash())
    except (OSError, ValueError):
        return
    sync_union(repo, catalog, snap)
    save_snapshot(repo, scan_tree(repo.union))


def remount_published(repo: Repo) -> None:
    """Show the published revision in the union directory again (after a repair)."""
    try:
        catalog = repo.catalog(repo.mounted_root_hash())
    except (OSError, ValueError):
        return
    sync_union(repo, catalog, load_snapshot(repo))
    save_snapshot(repo, scan_tree(repo.union))


def repair_mounts(ctx: Context, repo: Repo, *, style: str) -> bool:
    """The shell's health check: report missing mounts and repair them when allowed.

    ``style`` selects the recorded wording: "transaction" (``transaction``, ``abort``),
    "publish" (trailing period, ``Note:`` prefix). Returns False when auto-repair is
    disabled and something is missing.
    """
    state = repo.mount_state()
    missing: list[tuple[str, Path]] = []
    if not state["rdonly_mounted"]:
        missing.append(("rdonly", repo.spool / "rdonly"))
    if not state["union_mounted"]:
        missing.append(("union", repo.union))
    if not missing:
        return True
    period = "." if style == "publish" else ""
    for _, path in missing:
        ctx.err(f"{path} is not mounted properly{period}\n")
    if not repo.flag("CVMFS_AUTO_REPAIR_MOUNTPOINT", default=True):
        return False
    note = "Note: " if style == "publish" else ""
    for kind, path in missing:
        ctx.err(f"{note}Trying to mount {path}... success\n")
        if kind == "rdonly":
            if style == "transaction":
                ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))
            repo.set_mount_state(rdonly_mounted=True)
        else:
            repo.set_mount_state(union_mounted=True, union_rw=repo.in_transaction())
            if not repo.in_transaction():
                remount_published(repo)
    return True


def open_fds_under(directory: Path) -> tuple[list[str], list[str]]:
    """Processes with open fds below ``directory``: (writable lsof lines, read-only lines)."""
    base = os.path.realpath(directory)
    prefix = base + "/"
    own = os.getpid()
    writable: list[str] = []
    readonly: list[str] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return writable, readonly
    for pid in pids:
        if int(pid) == own:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = str(Path(f"{fd_dir}/{fd}").readlink())
            except OSError:
                continue
            if target != base and not target.startswith(prefix):
                continue
            flags = 0
            with contextlib.suppress(OSError, ValueError):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                for line in info.splitlines():
                    if line.startswith("flags:"):
                        flags = int(line.split()[1], 8)
            line = _lsof_line(pid, target)
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                writable.append(line)
            else:
                readonly.append(line)
    return writable, readonly


def _lsof_line(pid: str, target: str) -> str:
    comm = "?"
    user = "?"
    with contextlib.suppress(OSError):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    with contextlib.suppress(OSError, KeyError, ImportError):
        import pwd

        user = pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name
    return f"{comm:<10} {pid}  {user:<9} {target}"


def cwd_inside(directory: Path) -> bool:
    """Whether this process's working directory is inside ``directory``."""
    try:
        cwd = os.path.realpath(Path.cwd())
    except OSError:
        return False
    base = os.path.realpath(directory)
    return cwd == base or cwd.startswith(base + "/")
