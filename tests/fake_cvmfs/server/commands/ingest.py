"""``cvmfs_server ingest``: a tar (or only deletions) published in one revision of its own.

``ingest -t TAR|- -b BASE [-c] [-d PATH]... R`` and ``ingest --delete PATH R`` (m_ingest,
m2_ingest; gateway.md surprises 22-29). The arguments are read the way the shell function
reads them; ``ingest`` opens its own transaction (failing like ``transaction`` does, then
``Impossible to start a transaction``, exit 1), runs the tar through ``TarballSync`` and
commits like ``publish``: a new revision with its auto tag, ``trunk``/``trunk-previous``,
the signed manifest and, when due, the automatic gc. A failure before the commit undoes
everything as ``abort -f`` does (its remount chatter on stdout) and ends with
``Synchronization failed`` and the swissknife command line: no revision, no lock left.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

from tests.fake_cvmfs.server.catalog import Catalog, revision_record, store_catalog, store_history
from tests.fake_cvmfs.server.checks import cwd_inside, open_fds_under, require_repo

# ingest commits its revision with publish's own steps (auto tag, tags, served check, gc)
from tests.fake_cvmfs.server.commands.publish import (
    _auto_tag_name,
    _check_served,
    _publish_auto_gc,
    _publish_tags,
)
from tests.fake_cvmfs.server.commands.transaction import cmd_transaction
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.faults import command_costs
from tests.fake_cvmfs.server.garbage import auto_gc_due, auto_gc_threshold
from tests.fake_cvmfs.server.ingestion import DOT_INTERVAL, IngestFailure, TarballSync
from tests.fake_cvmfs.server.nested import RowIds
from tests.fake_cvmfs.server.recorded import (
    FUSE_CHATTER,
    INGEST_EVAL_NOT_FOUND,
    INGEST_MISSING_PARAMETERS,
)
from tests.fake_cvmfs.server.repository import Repo, record_refs
from tests.fake_cvmfs.server.storage import Manifest
from tests.fake_cvmfs.server.sync import PublishJob
from tests.fake_cvmfs.server.tarball import ArchiveOpenError, TarReader
from tests.fake_cvmfs.server.union import (
    StatInfo,
    load_snapshot,
    save_snapshot,
    scan_tree,
    sync_union,
)


@dataclass(frozen=True)
class IngestArguments:
    """What the shell function took from its arguments."""

    repo: str
    tar: str
    base: str
    deletes: tuple[str, ...]
    catalog: bool


def parse_arguments(args: list[str]) -> IngestArguments:
    """Read the arguments like ``cvmfs_server_ingest``'s loop ``while [ "$2" != "" ]``.

    Every position but the last is looked at as an option (a value is looked at too, so
    ``-t -c`` is a tar named ``-c`` and ``-c``); unknown words are skipped; an empty
    argument ends the loop; the argument where it ended is the repository (its part
    before a ``/``). ``-b`` is squeezed as ``echo $base | tr -s /`` squeezes it; several
    ``-d`` are joined with ``:`` (and split there again by swissknife).
    """
    tar = base = ""
    deletes: list[str] = []
    catalog = False
    index = 0
    while index + 1 < len(args) and args[index + 1] != "":
        option, value = args[index], args[index + 1]
        if option in ("-b", "--base_dir"):
            base = _echo(value)
            while "//" in base:
                base = base.replace("//", "/")
        elif option in ("-t", "--tar_file"):
            tar = value
        elif option in ("-d", "--delete"):
            deletes.append(value)
        elif option in ("-c", "--catalog"):
            catalog = True
        index += 1
    name = _echo(args[index]).split("/")[0] if index < len(args) else ""
    return IngestArguments(name, tar, base, tuple(deletes), catalog)


def _echo(word: str) -> str:
    """``$(echo $word)``: split at whitespace and joined with single spaces."""
    return " ".join(word.split())


def swissknife_ingest_command(repo: Repo, base_hash: str, args: IngestArguments) -> str:
    """The ``Executed Command:`` line printed after a failed ingest (m2_ingest 26, 51, 56)."""
    uid, gid = owner_ids(repo)
    parts = [
        "cvmfs_swissknife ingest",
        f"-u {repo.union}",
        f"-c {repo.spool}/rdonly",
        f"-t {repo.spool}/tmp",
        f"-b {base_hash}",
        f"-r {repo.conf.get('CVMFS_UPSTREAM_STORAGE', '')}",
        f"-w {repo.stratum0}",
        f"-o {repo.spool}/tmp/manifest",
        f"-K {repo.conf.get('CVMFS_PUBLIC_KEY', str(repo.key('pub')))}",
        f"-N {repo.name}",
        f"-U {uid}",
        f"-G {gid}",
    ]
    if args.tar:
        parts.append(f"-T {args.tar}")
    if args.base:
        parts.append(f"-B {args.base}")
    if args.deletes:
        parts.append(f"-D {':'.join(args.deletes)}")
    if args.catalog:
        parts.append("-C true")
    return " ".join(parts)


def owner_ids(repo: Repo) -> tuple[int, int]:
    """``id -u``/``id -g`` of ``CVMFS_USER``: the owner every ingested entry gets."""
    user = repo.conf.get("CVMFS_USER", "")
    try:
        import pwd

        record = pwd.getpwnam(user)
    except (ImportError, KeyError):
        return os.getuid(), os.getgid()
    return record.pw_uid, record.pw_gid


def cmd_ingest(ctx: Context, argv: list[str]) -> None:
    """``ingest -t TAR|- -b BASE [-c] [-d PATH]... R`` / ``ingest -d PATH... R``."""
    args = parse_arguments(argv)
    _check_arguments(ctx, args)
    repo = require_repo(ctx, args.repo)
    ctx.err(INGEST_EVAL_NOT_FOUND)
    try:
        cmd_transaction(ctx, [repo.name])
    except CommandExit as opened:
        if opened.code != 0:
            ctx.err("Impossible to start a transaction\n")
            raise CommandExit(1) from None
    snapshot = load_snapshot(repo)
    base_hash = repo.manifest().root_hash
    try:
        job = _prepare(ctx, repo)
        sync = _synchronise(ctx, args, job)
        _commit(ctx, job, sync)
    except IngestFailure as failure:
        ctx.err(failure.stderr)
        _undo(ctx, repo, snapshot)
        ctx.err(
            "Synchronization failed\n\nExecuted Command:\n"
            + swissknife_ingest_command(repo, base_hash, args)
            + "\n"
        )
        raise CommandExit(1) from None
    except _Die as failure:
        _undo(ctx, repo, snapshot)
        ctx.err(failure.message)
        raise CommandExit(1) from None
    except CommandExit:
        _undo(ctx, repo, snapshot)
        raise
    ctx.fault("end")


def _check_arguments(ctx: Context, args: IngestArguments) -> None:
    if not args.tar and not args.base and not args.deletes:
        ctx.err(INGEST_MISSING_PARAMETERS)
        raise CommandExit(1)
    if not args.tar and args.base:
        ctx.err(
            "Please provide the tarball to extract, use -t $TARBALL_PATH or --tar_file "
            "$TARBALL_PATH or don't provide the base directory to simply delete entities "
            "from the repository\n"
        )
        raise CommandExit(1)
    if args.tar and not args.base:
        ctx.err(
            "Please set the base directory where to extract the tarball, use -b $BASE_DIR "
            "or --base_dir $BASE_DIR or don't provide the base directory to simply delete "
            "entities from the repository\n"
        )
        raise CommandExit(1)


class _Die(Exception):
    """A check failed after the transaction was opened: ``abort -f``, then this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _prepare(ctx: Context, repo: Repo) -> PublishJob:
    """What the shell checks and prints between its transaction and swissknife."""
    if open_fds_under(repo.union)[0]:
        raise _Die(f"Open writable file descriptors on {repo.name}\n")
    if cwd_inside(repo.union):
        raise _Die(
            f"Current working directory is in {repo.union}.  Please release, e.g. by 'cd $HOME'.\n"
        )
    now = ctx.now()
    gc_threshold = auto_gc_threshold(ctx, repo, now)
    tag_name = ""
    if repo.flag("CVMFS_AUTO_TAG", default=True):
        tag_name = _auto_tag_name(repo, now)
        ctx.out(f"Using auto tag '{tag_name}'\n")
    return PublishJob(repo, repo.manifest(), tag_name, None, now, gc_threshold)


def _open_archive(stack: contextlib.ExitStack, tar: str) -> TarReader:
    """libarchive's open: ``-`` is stdin; a failure is swissknife's initialisation error."""
    try:
        if tar == "-":
            stream: BinaryIO = sys.stdin.buffer
        else:
            path = os.path.abspath(tar)
            try:
                stream = stack.enter_context(open(path, "rb"))  # noqa: SIM115 (closed by the stack)
            except OSError:
                raise ArchiveOpenError(f"Failed to open '{path}'") from None
        return TarReader(stream)
    except ArchiveOpenError as exc:
        raise IngestFailure(
            f"Impossible to open the archive: {exc}\n"
            "Swissknife Ingest: Initialization of the synchronisation engine failed\n"
        ) from None


def _fault_failure(rule: dict[str, Any]) -> NoReturn:
    stderr = rule.get("stderr")
    default = "fake fault: ingest failed at upload\n"
    raise IngestFailure(str(stderr) if stderr is not None else default)


def _synchronise(ctx: Context, args: IngestArguments, job: PublishJob) -> TarballSync:
    """swissknife ingest up to the new catalogs (``IngestFailure`` where it fails)."""
    repo = job.repo
    (repo.spool / "is_publishing.lock").touch()
    ctx.out("Swissknife Ingest: Processing changes...\n")
    previous = repo.catalog(job.manifest.root_hash)
    rows = RowIds.load(repo, job.manifest.root_hash, previous.entries)
    sync = TarballSync(
        ctx,
        repo,
        dict(previous.entries),
        rows,
        base=args.base,
        now=job.now,
        owner=owner_ids(repo),
    )
    with contextlib.ExitStack() as stack:
        reader = _open_archive(stack, args.tar) if args.tar else None
        for path in ":".join(args.deletes).split(":") if args.deletes else ():
            sync.delete(path)
        if reader is not None:
            sync.read(reader)
            if args.catalog:
                sync.place_catalog_marker()
    if sync.changed >= DOT_INTERVAL:
        ctx.out("\n")
    ctx.out("Waiting for upload of files before committing...\n")
    ctx.fault("upload", _fault_failure)
    sync.link_hard_links()
    ctx.out("Committing file catalogs...\n")
    for mount, waste in rows.finish(sync.entries):
        ctx.out(
            f"Note: Catalog at {mount} gets defragmented ({waste * 100:.2f}% wasted row IDs)"
            "... done\n"
        )
    return sync


def _commit(ctx: Context, job: PublishJob, sync: TarballSync) -> None:
    """The new revision: catalog, tags, signed manifest, automatic gc, the union; then the
    transaction closes (after the calibrated duration, when costs are set)."""
    repo = job.repo
    revision = job.manifest.revision + 1
    catalog = Catalog(repo.name, revision, int(job.now), sync.entries)
    root_hash, size = store_catalog(repo, catalog)
    ctx.out(
        "Swissknife Ingest: Wait for all uploads to finish\n"
        "Swissknife Ingest: Exporting repository manifest\n"
        f"Statistics stored at: {repo.spool}/stats.db\n"
        f"Tagging {repo.name}\n"
    )
    _check_served(ctx, repo, root_hash + "C")
    tags = _publish_tags(repo, job, revision_record(catalog, root_hash, size))
    history = store_history(repo, tags)
    ctx.out("Flushing file system buffers\nSigning new manifest\n")
    reflog = record_refs(repo, [(root_hash + "C", 0), (history, 2)], job.now)
    repo.add_revision(catalog, root_hash, size)
    manifest = job.manifest
    repo.write_manifest(
        Manifest(
            root_hash,
            size,
            revision,
            manifest.garbage_collectable,
            repo.name,
            manifest.certificate,
            history,
            int(job.now),
            manifest.meta_info,
            reflog,
        )
    )
    (repo.spool / "client.local").write_text(f"CVMFS_ROOT_HASH={root_hash}\n")
    sync.rows.save(repo, root_hash)
    if auto_gc_due(ctx, repo):
        _publish_auto_gc(ctx, job)
    ctx.out("Remounting newly created repository revision\n")
    sync.settle_union()
    save_snapshot(repo, scan_tree(repo.union))
    costs = command_costs(ctx.root, "ingest")
    ctx.pad_until(costs.get("base", 0.0) + sync.files * costs.get("per_file", 0.0))
    (repo.spool / "is_publishing.lock").unlink(missing_ok=True)
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False)


def _undo(ctx: Context, repo: Repo, snapshot: dict[str, StatInfo]) -> None:
    """``cvmfs_server abort -f``: the union shows the published revision again, the locks
    go, the remount chatter is printed."""
    catalog = repo.catalog(repo.manifest().root_hash)
    sync_union(repo, catalog, snapshot)
    save_snapshot(repo, scan_tree(repo.union))
    (repo.spool / "is_publishing.lock").unlink(missing_ok=True)
    (repo.spool / "in_transaction.lock").unlink(missing_ok=True)
    (repo.state_dir / "transaction.json").unlink(missing_ok=True)
    repo.set_mount_state(union_rw=False, union_mounted=True, rdonly_mounted=True)
    ctx.out(FUSE_CHATTER.format(rdonly=repo.spool / "rdonly"))
