"""``cvmfs_server tag``: list, inspect, add and remove named tags (F1 for removals)."""

from __future__ import annotations

from typing import Any

from tests.fake_cvmfs.server.catalog import store_history, tag_row
from tests.fake_cvmfs.server.checks import manifest_problem, require_repo, split_repo_arg
from tests.fake_cvmfs.server.clock import utc
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.gateway import remount_if_stale
from tests.fake_cvmfs.server.recorded import SESSION_FILE_MISSING
from tests.fake_cvmfs.server.repository import Repo, record_refs


def cmd_tag(ctx: Context, args: list[str]) -> None:
    """``tag [-l] [-x] [-i NAME] [-a NAME [-m MSG] [-h HASH]] [-r NAME] [-f] REPO``."""
    opts, rest = parse_options(args, "lxi:a:m:h:r:fb:B:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server tag [options] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    ctx.fault("start")
    remount_if_stale(ctx, repo, style="check")
    problem = manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(
            f"failed to fetch repository manifest ({problem})\n"
            "failed to load manifest file\nfailed to init environment\n"
        )
        raise CommandExit(1)
    flags = {key for key, _ in opts}
    values = dict(opts)
    removals = [value for key, value in opts if key == "-r"]
    if "-a" in values:
        ctx.lock_repo(repo)
        if repo.is_gateway:  # tags need the session token of a transaction (maintenance 4)
            ctx.err(SESSION_FILE_MISSING)
            raise CommandExit(1)
        _tag_add(ctx, repo, values["-a"], values.get("-m", ""), values.get("-h"))
    elif removals:
        ctx.lock_repo(repo)
        _tag_remove(ctx, repo, removals, force="-f" in flags)
    elif "-i" in values:
        _tag_inspect(ctx, repo, values["-i"])
    elif "-x" in flags:
        for tag in _tags_machine_order(repo.tags()):
            ctx.out(
                f"{tag['name']} {tag['hash']} {tag['size']} {tag['revision']} "
                f"{tag['timestamp']} (default) {tag.get('description', '')}\n"
            )
    else:
        _tag_table(ctx, list(reversed(_tags_machine_order(repo.tags()))))


def _tags_machine_order(tags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    indexed = list(enumerate(tags))
    indexed.sort(key=lambda pair: (-int(pair[1]["revision"]), pair[0]))
    return [tag for _, tag in indexed]


def _listing_time(timestamp: float) -> str:
    """A tag's time as the listing shows it: the day without padding (basic 18)."""
    return utc("%d %b %Y %H:%M:%S", timestamp).removeprefix("0")


def _tag_table(ctx: Context, tags: list[dict[str, Any]]) -> None:
    width = max([4, *(len(str(t["name"])) for t in tags)])
    stamps = [_listing_time(float(t["timestamp"])) for t in tags]
    stamp_width = max([9, *(len(stamp) for stamp in stamps)])
    ctx.out(f"{'Name':<{width}} │ Revision │ {'Timestamp':<{stamp_width}} │ Branch │ Description\n")
    rule = ["─" * (width + 1), "─" * 10, "─" * (stamp_width + 2), "─" * 8, "─" * 13]
    ctx.out("┼".join(rule) + "\n")
    for tag, stamp in zip(tags, stamps, strict=True):
        ctx.out(
            f"{tag['name']:<{width}} │ {tag['revision']:>8} │ {stamp} │ "
            f"{tag.get('branch', ''):<6} │ {tag.get('description', '')}\n"
        )
    ctx.out("┴".join(rule) + "\n")
    ctx.out(f"listing contains {len(tags)} tags\n")


def _tag_inspect(ctx: Context, repo: Repo, name: str) -> None:
    tag = next((t for t in repo.tags() if t.get("name") == name), None)
    if tag is None:
        ctx.err(f"tag '{name}' does not exist\n")
        raise CommandExit(1)
    stamp = _listing_time(float(tag["timestamp"]))
    ctx.out(
        f"Name:         {tag['name']}\nRevision:     {tag['revision']}\n"
        f"Timestamp:    {stamp}\nBranch:       {tag.get('branch', '')}\n"
        f"Root Hash:    {tag['hash']}\n"
        f"Catalog Size: {int(tag['size']) / 1024:.3f} kiB\n"
        f"{tag.get('description', '')}\n"
    )


def _save_tags(ctx: Context, repo: Repo, tags: list[dict[str, Any]]) -> None:
    manifest = repo.manifest()
    history = store_history(repo, tags)
    manifest.history = history
    manifest.reflog = record_refs(repo, [(history, 2)], ctx.now())
    repo.write_manifest(manifest)


def _tag_add(ctx: Context, repo: Repo, name: str, message: str, root_hash: str | None) -> None:
    tags = repo.tags()
    if name in ("trunk", "trunk-previous") or any(t.get("name") == name for t in tags):
        ctx.err(f"a tag with the name '{name}' already exists\n")
        raise CommandExit(1)
    trunk = next(t for t in tags if t.get("name") == "trunk")
    source = trunk
    if root_hash is not None:
        match = next((t for t in tags if t.get("hash") == root_hash), None)
        rev = next((r for r in repo.revisions() if r["root_hash"] == root_hash), None)
        if match is None and rev is None:
            ctx.err(f"root hash {root_hash} is not a revision of {repo.name}\n")
            raise CommandExit(1)
        if match is None and rev is not None:
            match = tag_row("", rev, "")
        source = match or trunk
    tags.append(dict(source, name=name, description=message, branch=""))
    _save_tags(ctx, repo, tags)


# Linux's limit on the length of one argument (MAX_ARG_STRLEN, the terminating NUL
# included): execve fails with E2BIG beyond it (faults.md F1).
MAX_ARG_STRLEN = 131072


# Line of /usr/bin/cvmfs_server that runs the tag_edit shell; faults.md F1 elides it, so
# this number is a stand-in, not a recorded value.
TAG_REMOVE_SCRIPT_LINE = 1203


def tag_remove_shell_argument(repo: Repo, names: list[str]) -> str:
    """The single ``sh -c`` argument ``cvmfs_server tag -r`` builds for ``tag_edit``.

    cvmfs_server_tag.sh writes the command inside one double-quoted string continued with
    backslash-newlines, so the padding of its source lines stays in the argument; every
    name of the call goes into ``-d '<name> <name> ...'`` (faults.md F1).
    """
    try:
        base_hash = repo.manifest().root_hash
    except (OSError, ValueError):
        base_hash = ""
    lines = (
        "/usr/bin/cvmfs_swissknife tag_edit        ",
        f"      -w {repo.stratum0}                                 ",
        f"      -t {repo.spool}/tmp                          ",
        f"      -p {repo.key('pub')}                     ",
        f"      -z {repo.repo_conf_dir}/trusted_certs ",
        f"      -f {repo.name}                                           ",
        f"      -r {repo.conf.get('CVMFS_UPSTREAM_STORAGE', '')}                         ",
        f"      -m {repo.spool}/tmp/manifest                                   ",
        f"      -b {base_hash}                                      ",
        f"      -e {repo.hash_algorithm}                                 ",
        "      -d '" + " ".join(names) + "'",
    )
    return "".join(lines)


def _tag_remove(ctx: Context, repo: Repo, names: list[str], *, force: bool) -> None:
    """``tag -r NAME [-r NAME ...]``: all names or none (faults.md F1, swissknife's
    ``RemoveTags``): any undo tag or any missing name and nothing is removed."""
    tags = repo.tags()
    if not force:
        ctx.out(f"You are about to remove {len(names)} tag(s) of {repo.name}. Are you sure (y/N)? ")
        answer = ctx.ask()
        if answer is None or answer.lower() not in ("y", "yes"):
            raise CommandExit(1)
    if repo.is_gateway:  # maintenance 6
        ctx.err(SESSION_FILE_MISSING + "Did not remove anything\n")
        raise CommandExit(1)
    argument = tag_remove_shell_argument(repo, names)
    if len(argument.encode("utf-8", "surrogateescape")) + 1 > MAX_ARG_STRLEN:
        ctx.err(
            f"/usr/bin/cvmfs_server: {TAG_REMOVE_SCRIPT_LINE}: eval: sh: Argument list too long\n"
            "Did not remove anything\n"
        )
        raise CommandExit(1)
    if any(name in ("trunk", "trunk-previous") for name in names):
        ctx.err("undo tags are handled internally and cannot be deleted\nDid not remove anything\n")
        raise CommandExit(1)
    by_name = {str(t.get("name")): t for t in tags}
    missing = [name for name in names if name not in by_name]
    if missing:
        ctx.err("".join(f"tag '{name}' does not exist\n" for name in missing))
        ctx.err("Did not remove anything\n")
        raise CommandExit(1)
    condemned: set[str] = set()
    for name in names:
        if name in condemned:
            continue
        ctx.out(f"deleting '{name}' ({by_name[name]['hash']})\n")
        condemned.add(name)
    _save_tags(ctx, repo, [t for t in tags if str(t.get("name")) not in condemned])
