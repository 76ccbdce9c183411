"""``cvmfs_server resign``: sign the whitelist again (``-p``: the manifest)."""

from __future__ import annotations

import hashlib
import json

from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.files import write_atomic
from tests.fake_cvmfs.server.recorded import GATEWAY_UPLOADER_PANIC
from tests.fake_cvmfs.server.repository import write_whitelist


def cmd_resign(ctx: Context, args: list[str]) -> None:
    """``resign [-d DAYS] [-p] [-f] REPO``."""
    opts, rest = parse_options(args, "d:pfw:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server resign [-d days] [-p] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    options = dict(opts)
    ctx.fault("start")
    ctx.lock_repo(repo)
    if ctx.storage_fault() == "unreachable":
        ctx.err(f"failed to upload the signature of {repo.name} (storage unreachable)\n")
        raise CommandExit(1)
    if "-p" in options and repo.is_gateway:  # not recorded: fails as the whitelist does
        ctx.err(GATEWAY_UPLOADER_PANIC)
        raise CommandExit(134)
    if "-p" in options:
        manifest = repo.manifest()
        manifest.timestamp = int(ctx.now())
        reflog = repo.reflog()
        reflog["resigned"] = manifest.timestamp
        data = json.dumps(reflog, sort_keys=True).encode()
        write_atomic(repo.storage / ".cvmfsreflog", data)
        manifest.reflog = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        (repo.spool / "reflog.chksum").write_text(manifest.reflog)
        repo.write_manifest(manifest)
        ctx.out("Signing .cvmfspublished... done\n")
        return
    if not repo.key("masterkey").is_file():
        ctx.err(f"Master key {repo.key('masterkey')} not found; cannot resign the whitelist\n")
        raise CommandExit(1)
    days = options.get("-d", "30")
    if days.isdigit() and int(days) > 30:
        ctx.out(
            "Warning: whitelist expiration is more than 30 days.\n"
            "Long expirations increase risk from repository key compromises!\n"
        )
    elif not days.isdigit():
        ctx.err(
            f"/usr/bin/cvmfs_server: 6037: [: Illegal number: {days}\n"
            f"date: invalid date '+{days} days'\n"
        )
    if repo.is_gateway:  # the upload needs a session token (maintenance 9, 21): SIGABRT
        ctx.out(f"Signing {days} day whitelist with master key... ")
        ctx.err(GATEWAY_UPLOADER_PANIC)
        raise CommandExit(134)
    write_whitelist(repo, ctx.now(), days)
    ctx.out(f"Signing {days} day whitelist with master key... done\n")
