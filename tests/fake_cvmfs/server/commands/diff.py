"""``cvmfs_server diff``: what changed between ``trunk-previous`` and ``trunk``."""

from __future__ import annotations

from tests.fake_cvmfs.server.catalog import SPECIAL_KINDS, Catalog, CatalogEntry
from tests.fake_cvmfs.server.checks import require_repo, split_repo_arg
from tests.fake_cvmfs.server.context import CommandExit, Context, parse_options


def cmd_diff(ctx: Context, args: list[str]) -> None:
    """``diff [-m] REPO``: what changed between trunk-previous and trunk."""
    opts, rest = parse_options(args, "ms:d:")
    if len(rest) != 1:
        ctx.err("usage: cvmfs_server diff [-m] <repository name>\n")
        raise CommandExit(1)
    machine = any(key == "-m" for key, _ in opts)
    repo = require_repo(ctx, split_repo_arg(rest[0])[0])
    tags = {str(t["name"]): t for t in repo.tags()}
    new = repo.catalog(str(tags["trunk"]["hash"]))
    old_tag = tags.get("trunk-previous")
    old = repo.catalog(str(old_tag["hash"])) if old_tag else Catalog(repo.name, 0, 0, {})
    labels = {"file": ("file", "F"), "dir": ("directory", "D"), "symlink": ("symlink", "S")}
    # FIFOs, sockets and devices (published by ingest) count as files: a guess
    labels.update(dict.fromkeys(SPECIAL_KINDS, labels["file"]))
    counts = {"file": 0, "symlink": 0, "dir": 0}
    lines: list[str] = []
    for path in sorted(set(old.entries) | set(new.entries)):
        before = old.entries.get(path)
        after = new.entries.get(path)
        if path == "/":
            continue
        if before is None and after is not None:
            counts[_counted(after.kind)] += 1
            word, letter = labels[after.kind]
            suffix = "" if after.kind == "dir" else f" +{after.size}"
            lines.append(
                f"A {letter} {path}{suffix}\n"
                if machine
                else f"{path} add {word} +{after.size} bytes\n"
            )
        elif after is None and before is not None:
            counts[_counted(before.kind)] -= 1
            word, letter = labels[before.kind]
            suffix = "" if before.kind == "dir" else f" -{before.size}"
            lines.append(
                f"R {letter} {path}{suffix}\n"
                if machine
                else f"{path} remove {word} -{before.size} bytes\n"
            )
        elif before is not None and after is not None and _content_changed(before, after):
            word, letter = labels[after.kind]
            delta = after.size - before.size
            lines.append(
                f"M {letter} {path} {delta:+d}\n"
                if machine
                else f"{path} modify {word} {delta:+d} bytes\n"
            )
    if machine:
        ctx.out(
            f"S F {counts['file']}\nS S {counts['symlink']}\nS D {counts['dir']}\nS N 0\n"
            + "".join(lines)
        )
        return
    ctx.out(
        f"d(# regular files): {counts['file']}\nd(# symlinks): {counts['symlink']}\n"
        f"d(# directories): {counts['dir']}\nd(# catalogs): 0\n" + "".join(lines)
    )


def _counted(kind: str) -> str:
    return "file" if kind in SPECIAL_KINDS else kind


def _content_changed(before: CatalogEntry, after: CatalogEntry) -> bool:
    if before.kind != after.kind:
        return True
    if after.kind == "dir":
        return before.mode != after.mode
    return (before.hash, before.chunks, before.target, before.size, before.mode) != (
        after.hash,
        after.chunks,
        after.target,
        after.size,
        after.mode,
    )
