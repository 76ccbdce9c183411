"""``cvmfs_server check``: verify the catalog's objects (``-i``: every stored object)."""

from __future__ import annotations

from tests.fake_cvmfs.server.catalog import Catalog
from tests.fake_cvmfs.server.checks import manifest_problem, require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options
from tests.fake_cvmfs.server.nested import catalog_tree
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.storage import verify_object_bytes


def cmd_check(ctx: Context, args: list[str]) -> None:
    """``check [-i] [-c] [-t TAG] REPO``."""
    opts, rest = parse_options(args, "icst:r:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server check [-i] [-c] <repository name>\n")
        raise CommandExit(1)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0], period=False)
    flags = {key for key, _ in opts}
    values = dict(opts)
    ctx.fault("start")
    if "-i" in flags and repo.is_s3:
        # faults.md F3, p_gateway_maintenance 8: only local storage is scanned
        ctx.out("Storage integrity check only works locally. skipping.\n")
    elif "-i" in flags:
        ctx.out(f"\nChecking storage integrity of {repo.name} ... (may take a while)\n")
        bad = _scan_storage_integrity(repo)
        if bad:
            ctx.err(
                "".join(f"mismatch of file name and content hash | at: {path}\n" for path in bad)
                + "FAIL!\n"
            )
            raise CommandExit(1)
    ctx.out(f"Verifying integrity of {repo.name}...\n")
    problem = manifest_problem(ctx, repo)
    if problem is not None:
        ctx.err(
            f"failed to fetch repository manifest ({problem})\nfailed to load repository manifest\n"
        )
        raise CommandExit(1)
    ctx.out("Inspecting log of references\nInspecting tag database\n")
    root_hash = repo.manifest().root_hash
    if "-t" in values:
        tag = next((t for t in repo.tags() if t.get("name") == values["-t"]), None)
        if tag is None:
            ctx.err(f"tag '{values['-t']}' does not exist\n")
            raise CommandExit(1)
        root_hash = str(tag["hash"])
    ctx.out(f"[inspecting catalog] {root_hash} at /\n")
    try:
        catalog = repo.catalog(root_hash)
    except (OSError, ValueError):
        ctx.err(
            f"failed to download object {root_hash} (9)\n"
            f"failed to load catalog {root_hash}\nfailed to open catalog {root_hash}\n"
            "CATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
        )
        raise CommandExit(1) from None
    for _, mountpoint, digest in catalog_tree(catalog)[1:]:
        ctx.out(f"[inspecting catalog] {digest} at {mountpoint}\n")
    problems = [] if "-c" in flags else _missing_objects(repo, catalog)
    if problems:
        ctx.err("".join(problems) + "CATALOG PROBLEMS OR OTHER ERRORS FOUND\n")
        raise CommandExit(1)
    ctx.out("no problems found\n")


def _scan_storage_integrity(repo: Repo) -> list[str]:
    bad: list[str] = []
    for sub in sorted(p for p in repo.data.iterdir() if p.is_dir() and len(p.name) == 2):
        for item in sorted(sub.iterdir()):
            if not item.is_file():
                continue
            if not verify_object_bytes(sub.name + item.name, item.read_bytes()):
                bad.append(str(item))
    return bad


def _missing_objects(repo: Repo, catalog: Catalog) -> list[str]:
    problems: list[str] = []
    for path in sorted(catalog.entries):
        entry = catalog.entries[path]
        if entry.kind != "file":
            continue
        if entry.hash is not None and not repo.object_file(entry.hash).is_file():
            problems.append(f"data chunk {entry.hash} ({path}) missing\n")
        for chunk_hash, offset, size in entry.chunks:
            if not repo.object_file(chunk_hash + "P").is_file():
                problems.append(
                    f"partial data chunk {chunk_hash}P ({path} -> offset: "
                    f"{offset} | size: {size}) missing\n"
                )
    return problems
