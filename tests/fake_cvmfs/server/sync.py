"""What ``cvmfs_swissknife sync`` does for ``publish``: catalog, uploads, grafts, union.

``plan_catalog`` builds the new catalog from the union directory (unchanged files keep
their entries, graft markers become grafted entries), ``Ingester`` stores the new and
changed files, ``finish_union`` leaves the union showing the published revision.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import zlib
from pathlib import Path
from typing import Any, NoReturn

from tests.fake_cvmfs.server.catalog import (
    SPECIAL_KINDS,
    Catalog,
    CatalogEntry,
    iter_file_content,
)
from tests.fake_cvmfs.server.context import CommandExit, Context
from tests.fake_cvmfs.server.recorded import SOURCE_PLACEHOLDER
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.storage import HASH_RE, Manifest, is_null_hash
from tests.fake_cvmfs.server.union import (
    StatInfo,
    materialise,
    save_snapshot,
    snapshot_key,
    stat_info,
)


def swissknife_command(repo: Repo, root_hash: str, tag: str, message: str | None) -> str:
    """The ``Executed Command:`` line cvmfs_server prints after a failed sync."""
    conf = repo.conf
    parts = [
        "cvmfs_swissknife sync",
        f"-u {repo.union}",
        f"-s {repo.spool}/scratch/current",
        f"-c {repo.spool}/rdonly",
        f"-t {repo.spool}/tmp",
        f"-b {root_hash}",
        f"-r {conf.get('CVMFS_UPSTREAM_STORAGE', '')}",
        f"-w {repo.stratum0}",
        f"-o {repo.spool}/tmp/manifest",
        f"-e {repo.hash_algorithm}",
        f"-Z {conf.get('CVMFS_COMPRESSION_ALGORITHM', 'default')}",
        f"-N {repo.name}",
        f"-K {repo.key('pub')}",
        "-L",
    ]
    if tag:
        parts.append(f"-D {tag}")
    if message:
        parts.append(f"-J {message}")
    parts += [
        "-f overlayfs",
        "-p",
        f"-l {conf.get('CVMFS_MIN_CHUNK_SIZE', '4194304')}",
        f"-a {conf.get('CVMFS_AVG_CHUNK_SIZE', '8388608')}",
        f"-h {conf.get('CVMFS_MAX_CHUNK_SIZE', '16777216')}",
        "-i",
    ]
    return " ".join(parts)


class PublishJob:
    """Everything one ``publish`` run needs."""

    def __init__(
        self,
        repo: Repo,
        manifest: Manifest,
        tag_name: str,
        message: str | None,
        now: float,
        gc_threshold: float,
    ) -> None:
        self.repo = repo
        self.manifest = manifest
        self.tag_name = tag_name
        self.message = message
        self.now = now
        self.gc_threshold = gc_threshold
        self.uploaded: list[str] = []
        self.copied = 0
        self.grafts = 0
        self.auto_gc = False

    def cost(self, costs: dict[str, float], *, locked: bool) -> float:
        """Calibrated duration of this publish (``locked``: the part before the transaction
        lock is released)."""
        per_file = costs.get("per_file", 0.0)
        if locked:
            per_file = max(0.0, per_file - costs.get("unlocked_per_file", 0.0))
        return (
            costs.get("base", 0.0)
            + self.copied * per_file
            + self.grafts * costs.get("per_graft", 0.0)
            + (costs.get("auto_gc", 0.0) if self.auto_gc else 0.0)
        )


def plan_catalog(
    ctx: Context,
    job: PublishJob,
    previous: Catalog,
    snap: dict[str, StatInfo],
    current: dict[str, StatInfo],
) -> tuple[dict[str, CatalogEntry], list[tuple[str, StatInfo]]]:
    """Build the new catalog's entries; return them and the files that need uploading."""
    entries: dict[str, CatalogEntry] = {}
    todo: list[tuple[str, StatInfo]] = []
    uid = os.getuid()
    gid = os.getgid()
    grafting = GraftReader(ctx, job)
    for path in sorted(current):
        info = current[path]
        kind, mode, size, mtime_ns = info[0], info[1], info[2], info[3]
        mtime = mtime_ns // 1_000_000_000
        base = path.rsplit("/", 1)[1]
        if kind == "dir":
            entries[path] = CatalogEntry("dir", mode, 4096, mtime, uid, gid)
        elif kind == "symlink":
            entries[path] = CatalogEntry(
                "symlink", 0o777, len(os.fsencode(info[6])), mtime, uid, gid, target=info[6]
            )
        elif kind in SPECIAL_KINDS:
            # only kept unchanged (ingest publishes them; publish does not add new ones)
            old = previous.entries.get(path)
            before = snap.get(path)
            if (
                old is not None
                and old.kind == kind
                and before is not None
                and snapshot_key(before) == snapshot_key(info)
            ):
                entries[path] = old
        elif kind != "file" or base.startswith(".cvmfsgraft-"):
            continue
        else:
            marker = f"{path.rsplit('/', 1)[0]}/.cvmfsgraft-{base}"
            if marker in current and current[marker][0] == "file":
                entries[path] = grafting.entry(path, marker, info)
                job.grafts += 1
                continue
            old = previous.entries.get(path)
            before = snap.get(path)
            if (
                old is not None
                and old.kind == "file"
                and before is not None
                and snapshot_key(before) == snapshot_key(info)
            ):
                entries[path] = old
            else:
                entries[path] = CatalogEntry("file", mode, size, mtime, uid, gid)
                todo.append((path, info))
    if "/" not in entries:
        entries["/"] = CatalogEntry("dir", 0o755, 4096, int(job.now), uid, gid)
    if snap:
        _keep_unshown(previous, snap, current, entries)
    return entries, todo


def _keep_unshown(
    previous: Catalog,
    snap: dict[str, StatInfo],
    current: dict[str, StatInfo],
    entries: dict[str, CatalogEntry],
) -> None:
    """Keep the published entries the union directory never showed (absent from the last
    snapshot too: a name too long for the file system, a device node the fake may not
    make), as long as their directory is kept; the real union shows them, so they stay."""
    for path in sorted(previous.entries):
        if path in entries or path in current or path in snap:
            continue
        parent = path.rsplit("/", 1)[0] or "/"
        kept = entries.get(parent)
        if kept is not None and kept.kind == "dir":
            entries[path] = previous.entries[path]


class GraftReader:
    """Turns placeholders with a ``.cvmfsgraft-*`` marker into catalog entries.

    One publish may read thousands of markers, so the locations are worked out once and
    the markers are opened by string path.
    """

    def __init__(self, ctx: Context, job: PublishJob) -> None:
        self.ctx = ctx
        self.job = job
        self.union = str(job.repo.union)
        self.scratch = f"{job.repo.spool}/scratch/current"
        self.compression = job.repo.compression
        self.uid = os.getuid()
        self.gid = os.getgid()

    def entry(self, path: str, marker: str, info: StatInfo) -> CatalogEntry:
        """The graft entry for placeholder ``path`` (PANIC like the real tool when invalid)."""
        try:
            with open(self.union + marker, "rb") as handle:
                text = handle.read().decode(errors="replace")
            size, bulk, compression, chunks = parse_graft(
                text, self.compression, self.scratch + marker
            )
        except (GraftError, OSError) as exc:
            self.fail(path, exc.detail if isinstance(exc, GraftError) else None)
        return CatalogEntry(
            "file",
            info[1],
            size,
            info[3] // 1_000_000_000,
            self.uid,
            self.gid,
            hash=bulk,
            compression=compression,
            chunks=chunks,
            graft=True,
        )

    def fail(self, path: str, detail: str | None) -> NoReturn:
        """The real tool's PANIC about invalid grafting information; the transaction stays."""
        ctx = self.ctx
        job = self.job
        if detail:
            ctx.out(detail + "\n")
        ctx.err(
            "terminate called after throwing an instance of 'ECvmfsException'\n"
            f"  what():  PANIC: {SOURCE_PLACEHOLDER}/cvmfs/sync_mediator.cc : 965\n"
            f"Encountered a grafted file ({path[1:]}) with invalid grafting information; "
            "check contents of .cvmfsgraft-* file.  Aborting publish.\n"
            "Killed\nSynchronization failed\n\nExecuted Command:\n"
            + swissknife_command(job.repo, job.manifest.root_hash, job.tag_name, job.message)
            + "\n"
        )
        raise CommandExit(1)


class GraftError(Exception):
    """An invalid ``.cvmfsgraft-*`` file; ``detail`` is the ``(fs traversal)`` line, if any."""

    def __init__(self, detail: str | None) -> None:
        super().__init__(detail or "invalid graft")
        self.detail = detail


def parse_graft(
    text: str, default_compression: str, marker_for_messages: str
) -> tuple[int, str | None, str, list[tuple[str, int, int]]]:
    """Parse a graft file: (size, bulk hash or None, compression, chunks)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    raw_size = values.get("size")
    if raw_size is None:
        raise GraftError(None)
    if not raw_size.isdigit():
        raise GraftError(
            f"(fs traversal) Failed to parse value of size={raw_size} to "
            "integer: Invalid argument (errno=22)"
        )
    size = int(raw_size)
    checksum = values.get("checksum")
    if checksum is None or not HASH_RE.match(checksum):
        raise GraftError(None)
    compression = values.get("compression", default_compression)
    if compression not in ("zlib", "none"):
        raise GraftError(None)
    chunks: list[tuple[str, int, int]] = []
    if "chunk_offsets" in values or "chunk_checksums" in values:
        chunks = _parse_graft_chunks(values, size, marker_for_messages)
    bulk = None if is_null_hash(checksum) else checksum
    return size, bulk, compression, chunks


def _parse_graft_chunks(
    values: dict[str, str], size: int, marker: str
) -> list[tuple[str, int, int]]:
    try:
        offsets = [int(v) for v in values.get("chunk_offsets", "").split(",")]
    except ValueError as exc:
        raise GraftError(None) from exc
    sums = values.get("chunk_checksums", "").split(",")
    if len(offsets) != len(sums) or any(not HASH_RE.match(s) for s in sums):
        raise GraftError(None)
    if any(b <= a for a, b in itertools.pairwise(offsets)):
        raise GraftError(
            "(fs traversal) Chunk offsets must be sorted in strictly increasing "
            f"order (in graft marker {marker})."
        )
    if offsets[0] != 0 or offsets[-1] >= max(size, 1):
        raise GraftError(None)
    ends = [*offsets[1:], size]
    return [(s, o, e - o) for s, o, e in zip(sums, offsets, ends, strict=True)]


def upload_failure(ctx: Context, job: PublishJob, rule: dict[str, Any]) -> NoReturn:
    """The recorded failure of the ``upload`` fault point (an S3 upload that failed)."""
    repo = job.repo
    key = job.uploaded[-1] if job.uploaded else "0" * 40 + "P"
    location = f"{repo.name}/data/{key[:2]}/{key[2:]}"
    if repo.is_s3:
        staged = repo.spool / f"tmp.{os.urandom(4).hex()[:6]}"
        staged.write_bytes(zlib.compress(os.urandom(1024)))
    ctx.fail_with(
        rule,
        "",
        f"Upload job for '{location}' failed. (error code: 5 - S3: host connection problem)\n"
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        f"  what():  PANIC: {SOURCE_PLACEHOLDER}/cvmfs/ingestion/task_write.cc : 32\n"
        "chunk upload failed (code: 99)\nKilled\nSynchronization failed\n\n"
        "Executed Command:\n"
        + swissknife_command(repo, job.manifest.root_hash, job.tag_name, job.message)
        + "\n",
        1,
    )


class Ingester:
    """Compresses and stores regular files for one publish (settings looked up once)."""

    def __init__(self, job: PublishJob) -> None:
        repo = job.repo
        self.job = job
        self.repo = repo
        self.chunk_size = int(repo.conf.get("CVMFS_AVG_CHUNK_SIZE", "8388608"))
        self.chunking = repo.flag("CVMFS_USE_FILE_CHUNKING", default=True)
        self.compression = repo.compression
        self.uid = os.getuid()
        self.gid = os.getgid()

    def ingest(self, path: str, info: StatInfo) -> CatalogEntry:
        """Store one regular file (chunked when larger than the average chunk)."""
        repo = self.repo
        compress = self.compression == "zlib"
        uploaded = self.job.uploaded
        entry = CatalogEntry(
            "file",
            info[1],
            0,
            info[3] // 1_000_000_000,
            self.uid,
            self.gid,
            compression=self.compression,
        )
        with open(path, "rb") as handle:
            if not self.chunking or info[2] <= self.chunk_size:
                data = handle.read()
                entry.size = len(data)
                entry.hash = repo.store_object(zlib.compress(data) if compress else data)
                uploaded.append(entry.hash)
                return entry
            offset = 0
            while True:
                piece = handle.read(self.chunk_size)
                if not piece:
                    break
                name = repo.store_object(zlib.compress(piece) if compress else piece, "P")
                uploaded.append(name)
                entry.chunks.append((name[:-1], offset, len(piece)))
                offset += len(piece)
            entry.size = offset
        return entry


def finish_union(repo: Repo, catalog: Catalog, current: dict[str, StatInfo]) -> None:
    """After a publish: drop graft markers, show grafted content, snapshot the union.

    The snapshot is ``current`` (the scan the catalog was built from) with the removed
    paths left out and the paths changed here (grafted files, directories) stat'ed
    again; the real union is read-only from here on, so anything else that changed
    since the scan is a change outside the transaction.
    """
    union = str(repo.union)
    snap = dict(current)
    consumed: set[str] = set()
    leftover: list[str] = []
    changed: list[str] = []
    for path, entry in catalog.entries.items():
        if entry.graft:
            parent, _, base = path.rpartition("/")
            marker = f"{parent}/.cvmfsgraft-{base}"
            if _graft_into_marker(repo, union + marker, union + path, entry):
                consumed.add(marker)
                del snap[marker]
            else:
                leftover.append(path)
            changed.append(path)
    for path, info in current.items():
        kind = info[0]
        if path in consumed:
            continue
        if (kind == "file" and path.rpartition("/")[2].startswith(".cvmfsgraft-")) or (
            kind not in ("file", "dir", "symlink") and path != "/" and path not in catalog.entries
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(union + path)
            del snap[path]
    for path in leftover:
        with contextlib.suppress(OSError):
            materialise(repo, Path(union + path), catalog.entries[path])
    directories = sorted((p for p, e in catalog.entries.items() if e.kind == "dir"), reverse=True)
    for path in directories:
        mtime = catalog.entries[path].mtime
        with contextlib.suppress(OSError):
            os.utime(union if path == "/" else union + path, (mtime, mtime))
    for path in itertools.chain(changed, directories):
        try:
            snap[path] = stat_info(os.lstat(union if path == "/" else union + path), "")
        except FileNotFoundError:
            snap.pop(path, None)
    save_snapshot(repo, snap)


def _graft_into_marker(repo: Repo, marker: str, dest: str, entry: CatalogEntry) -> bool:
    """Show a grafted file's content at ``dest`` by turning its marker into the file.

    The marker is rewritten with the content (unreadable content leaves it empty, as
    ``materialise`` does), given the entry's mode and mtime and renamed over the
    placeholder: the union ends up as after ``materialise`` plus removing the marker, but
    the marker's storage is reused instead of freed and allocated again, which on some
    file systems is by far the dearest part of a publish of many small grafts. Returns
    False when the marker cannot be reused (not a single-link regular file, or any
    error before the rename); the caller then removes it and materialises.
    """
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        written = 0
        try:
            for piece in iter_file_content(repo, entry):
                view = memoryview(piece)
                while view:
                    done = os.pwrite(fd, view, written)
                    written += done
                    view = view[done:]
        except OSError as exc:
            if exc.errno != errno.EIO:
                return False
            written = 0
        if written < st.st_size:
            os.ftruncate(fd, written)
        os.fchmod(fd, entry.mode)
        os.utime(fd, (entry.mtime, entry.mtime))
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rename(marker, dest)
    except OSError:
        return False
    return True
