"""``cvmfs_server transaction``: open a transaction (``-t``: wait for another to end)."""

from __future__ import annotations

import os
import sys
import time

from tests.fake_cvmfs.server.checks import (
    check_union_violations,
    repair_mounts,
    require_repo,
    split_repo_arg,
    whitelist_problem,
)
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.faults import command_costs
from tests.fake_cvmfs.server.files import write_json
from tests.fake_cvmfs.server.gateway import drop_lease, take_lease, write_session_token
from tests.fake_cvmfs.server.recorded import LEASE_BUSY_ERROR, TRACE_TRANSACTION
from tests.fake_cvmfs.server.repository import Repo, list_repositories

# exit code of a gateway publisher's transaction whose lease path is busy (gateway.md 5)
LEASE_BUSY = 16


def cmd_transaction(ctx: Context, args: list[str]) -> None:
    """``transaction [-t SECONDS] REPO[/path]``."""
    opts, rest = parse_options(args, "t:T:i")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server transaction [-t timeout] <repository name>[/path]\n")
        raise CommandExit(1)
    if rest[0].startswith("/"):
        # the name part is empty, so cvmfs_server tries to guess the repository (basic 30)
        names = "".join(f"  {n}\n" for n in list_repositories(ctx.root))
        ctx.err(
            f"Invocation error: multiple repositories available in {ctx.root}/etc/cvmfs/"
            f"repositories.d:\n{names}"
        )
        raise CommandExit(1)
    name, scope = split_repo_arg(rest[0])
    repo = require_repo(ctx, name)
    timeout: float | None = None
    for key, value in opts:
        if key in ("-t", "-T"):
            try:
                timeout = float(value)
            except ValueError:
                ctx.err(f"invalid timeout: {value}\n")
                raise CommandExit(1) from None
    ctx.fault(
        "start",
        lambda rule: ctx.fail_with(
            rule, "", "cannot load whitelist [failed to download whitelist]\n", 5
        ),
    )
    if repo.in_transaction() and timeout is None:
        ctx.err("CernVM-FS transaction error: another transaction is already open\n")
        raise CommandExit(17)
    ctx.lock_repo(repo)
    check_union_violations(ctx, repo)
    repair_mounts(ctx, repo, style="transaction")
    problem = whitelist_problem(ctx, repo)
    if problem is not None:
        ctx.err(f"cannot load whitelist [{problem}]\n")
        raise CommandExit(5)
    if timeout is None:
        code = _open_transaction(ctx, repo, scope)
        if code == LEASE_BUSY:
            ctx.err(LEASE_BUSY_ERROR)
        raise CommandExit(code)
    ctx.release_locks()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        raise CommandExit(os.waitstatus_to_exitcode(status))
    raise CommandExit(_retry_transaction(ctx, repo, scope, timeout))


def _retry_transaction(ctx: Context, repo: Repo, scope: str, timeout: float) -> int:
    """The waiting child of ``transaction -t``: retry with a growing back-off."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    backoff = 0.1
    while True:
        code = 17
        if not repo.in_transaction():
            ctx.lock_repo(repo)
            if not repo.in_transaction():
                code = _open_transaction(ctx, repo, scope)
                if code != LEASE_BUSY:
                    return code
            ctx.release_locks()
        if deadline is not None and time.monotonic() >= deadline:
            if code == LEASE_BUSY:
                ctx.err(LEASE_BUSY_ERROR)
                return code
            ctx.err("CernVM-FS transaction error: another transaction is already open\n")
            return 17
        ctx.out("repository busy, retrying\n")
        time.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def _open_transaction(ctx: Context, repo: Repo, scope: str) -> int:
    if repo.in_transaction():
        ctx.err("CernVM-FS transaction error: another transaction is already open\n")
        return 17
    lease = take_lease(ctx, repo, scope) if repo.is_gateway else None
    if isinstance(lease, int):
        return lease
    if scope:
        parent = scope.rsplit("/", 1)[0] or "/"
        if not (repo.union / parent.lstrip("/")).is_dir():
            if lease is not None:
                # the lease was granted before the path was looked at (basic 1, 26)
                drop_lease(ctx, lease, repo)
            ctx.err(
                "CernVM-FS transaction error: cannot open transaction on non-existing "
                f"path {parent}\n"
            )
            return 2
    if not repo.mount_state()["union_mounted"]:
        if lease is not None:
            drop_lease(ctx, lease, repo)
        ctx.err(
            "(unexpected termination) cannot establish writable mountpoint\n" + TRACE_TRANSACTION
        )
        return 1
    lock = repo.spool / "in_transaction.lock"
    lock.touch()
    lock.chmod(0o600)
    if lease is not None:
        write_session_token(repo, lease)
    write_json(repo.state_dir / "transaction.json", {"scope": scope, "opened": ctx.now()})
    ctx.fault("after_lock")
    repo.set_mount_state(union_rw=True)
    ctx.pad_until(command_costs(ctx.root, "transaction").get("base", 0.0))
    return 0
