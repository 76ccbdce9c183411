"""What ``cvmfs_swissknife ingest`` makes of ``--delete`` paths and a tar's members.

``TarballSync`` follows CVMFS's ``SyncUnionTarball``: deletions first, then every member
in archive order, merged into the published entries (what the tar lacks stays, what it
has replaces what was there), then the ``-c`` marker and the hard links. File contents
are stored as objects as they are read, and the union directory is written along (the
fake's union shows what is published; a failed ingest is undone by restoring it, as the
real one is by ``abort -f``). Failures raise ``IngestFailure`` with swissknife's stderr.

Member names, as ``SyncUnionTarball::ProcessArchiveEntry`` handles them: one leading
``./`` or ``/`` is dropped and the rest goes below the base (m2_ingest 14-15); the parent
directories are created as needed (mode 0755, owner ``-U``/``-G``; an existing directory
keeps its attributes, one created in this run takes those of its own member when it
comes); a name with a ``..`` component (or ``.``, a guess) is dropped without a word
(m2 17-18); symlinks keep their target and mode (m2 20-21); FIFOs, sockets and devices are
published as such (m2 29-33); a regular ``.cvmfscatalog`` makes its directory a nested
catalog (m2 35-36); a hard link becomes an independent copy of its target, looked up as
``<base>/<link name>`` once everything else is in, and a target that is not there aborts
the ingest (m2 23-27). Owners become ``-U``/``-G``, modes are kept (m2 44-45).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

from tests.fake_cvmfs.server.catalog import CatalogEntry
from tests.fake_cvmfs.server.context import Context
from tests.fake_cvmfs.server.nested import MARKER, RowIds
from tests.fake_cvmfs.server.recorded import INGEST_SOURCE_PLACEHOLDER
from tests.fake_cvmfs.server.repository import Repo
from tests.fake_cvmfs.server.tarball import (
    ArchiveDataError,
    ArchiveFatal,
    Damaged,
    TarMember,
    TarReader,
)
from tests.fake_cvmfs.server.union import materialise

DOT_INTERVAL = 100  # SyncMediator prints a dot per this many changed entries
_DOTS = (b".", b"..")
_KEPT_BY_DELETE = ("dir", "file", "symlink")


class IngestFailure(Exception):
    """swissknife ingest failed; ``stderr`` is what it printed (the shell's ``Aborted``
    included)."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def _panic(location: str, message: str) -> IngestFailure:
    return IngestFailure(
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        f"  what():  PANIC: {INGEST_SOURCE_PLACEHOLDER}/cvmfs/{location}\n"
        f"{message}\nAborted\n"
    )


def squeeze(path: str) -> str:
    """A repository path as ``ingest`` takes it: slashes collapsed, none at either end."""
    return "/".join(part for part in path.split("/") if part)


class TarballSync:
    """One ingest's changes to the published entries (see the module docstring)."""

    def __init__(
        self,
        ctx: Context,
        repo: Repo,
        entries: dict[str, CatalogEntry],
        rows: RowIds,
        *,
        base: str,
        now: float,
        owner: tuple[int, int],
    ) -> None:
        self.ctx = ctx
        self.repo = repo
        self.entries = entries
        self.rows = rows
        self.base = os.fsencode(squeeze(base))
        self.now = int(now)
        self.uid, self.gid = owner
        self.union = str(repo.union)
        self.changed = 0
        self.files = 0
        self._known: set[str] = set()
        self._created: set[str] = set()
        self._hardlinks: list[tuple[str, str]] = []
        self._touched_dirs: set[str] = set()
        self._chunk_size = int(repo.conf.get("CVMFS_AVG_CHUNK_SIZE", "8388608"))
        self._chunking = repo.flag("CVMFS_USE_FILE_CHUNKING", default=True)
        self._compression = repo.compression

    # -- the catalog ----------------------------------------------------------------------
    def _count(self) -> None:
        self.changed += 1
        if self.changed % DOT_INTERVAL == 0:
            self.ctx.out(".")

    def _add(self, path: str, entry: CatalogEntry, *, counted: bool = True) -> None:
        self.entries[path] = entry
        self.rows.add(path)
        self._touched_dirs.add(path.rsplit("/", 1)[0] or "/")
        if counted:
            self._count()

    def _remove(self, path: str) -> None:
        entry = self.entries.pop(path)
        doomed = [path]
        if entry.kind == "dir":
            prefix = path + "/"
            below = sorted((p for p in self.entries if p.startswith(prefix)), reverse=True)
            for child in below:
                del self.entries[child]
            doomed = [*below, path]
        for gone in doomed:
            self.rows.remove(gone)
            self._count()
            self._known.discard(gone)
            self._created.discard(gone)
        self._union_remove(path)

    def delete(self, text: str) -> None:
        """``--delete``: remove a directory tree, a file or a symlink; anything else (a
        missing path, a device) is the recorded warning (m_ingest 12, 18)."""
        path = "/" + squeeze(text)
        entry = self.entries.get(path) if path != "/" else None
        if entry is None or entry.kind not in _KEPT_BY_DELETE:
            self.ctx.err(f"[WARNING] '{text}' cannot be deleted. Unrecognized file type.\n")
            return
        self._remove(path)

    def _ensure_dir(self, path: str) -> None:
        """``CreateDirectories`` for one directory: known, existing or created (0755)."""
        if path in self._known:
            return
        existing = self.entries.get(path)
        if existing is not None and existing.kind != "dir":
            self._remove(path)
            existing = None
        if existing is None:
            self._add(path, CatalogEntry("dir", 0o755, 4096, self.now, self.uid, self.gid))
            self._created.add(path)
            self._union_mkdir(path)
        self._known.add(path)

    # -- members --------------------------------------------------------------------------
    def read(self, reader: TarReader) -> None:
        """Apply every member of the archive; raise ``IngestFailure`` where swissknife
        aborts."""
        while True:
            try:
                member = reader.next_member()
            except ArchiveFatal as exc:
                raise IngestFailure(
                    f"Fatal error in reading the archive.\n{exc}\n\nAborted\n"
                ) from None
            if member is None:
                return
            if isinstance(member, Damaged):
                self.ctx.out(f"Error in reading the header, retrying.\n{member.message}\n\n")
                continue
            self._member(member, reader)

    def _member(self, member: TarMember, reader: TarReader) -> None:
        name = member.name
        if name.startswith(b"./"):
            name = name[2:]
        elif name.startswith(b"/"):
            name = name[1:]
        complete = self.base + b"/" + name
        if complete.endswith(b"/"):
            complete = complete[:-1]
        parts = [part for part in complete.split(b"/") if part]
        for index, part in enumerate(parts[:-1]):
            if part in _DOTS:
                break
            self._ensure_dir("/" + os.fsdecode(b"/".join(parts[: index + 1])))
        if not parts or any(part in _DOTS for part in parts):
            for _ in self._content(reader, "/" + os.fsdecode(complete)):
                pass
            return
        path = "/" + os.fsdecode(b"/".join(parts))
        if member.kind == "hardlink":
            source = b"/".join(p for p in (self.base + b"/" + member.linkname).split(b"/") if p)
            self._hardlinks.append((path, os.fsdecode(source)))
            return
        if member.kind == "dir":
            self._directory(path, member)
            return
        if parts[-1] == os.fsencode(MARKER) and member.kind != "file":
            raise IngestFailure(
                f"Found entity called as a catalog marker '{path[1:]}' that however is not "
                "a regular file, abort\nAborted\n"
            )
        if path in self.entries:
            self._remove(path)
        mode, mtime = member.mode, member.mtime
        if member.kind == "file":
            entry = self._store(path, member, reader)
        elif member.kind == "symlink":
            target = os.fsdecode(member.linkname)
            entry = CatalogEntry(
                "symlink", mode, len(member.linkname), mtime, self.uid, self.gid, target=target
            )
            with contextlib.suppress(OSError):
                os.symlink(target, self.union + path)
        else:
            rdev = os.makedev(member.devmajor, member.devminor)
            entry = CatalogEntry(member.kind, mode, 0, mtime, self.uid, self.gid, rdev=rdev)
            with contextlib.suppress(OSError):
                materialise(self.repo, Path(self.union + path), entry)
        self._add(path, entry)

    def _directory(self, path: str, member: TarMember) -> None:
        if path in self._known:
            if path in self._created:
                old = self.entries[path]
                self.entries[path] = CatalogEntry(
                    "dir", member.mode, 4096, member.mtime, old.uid, old.gid
                )
                self._touched_dirs.add(path)
            return
        existing = self.entries.get(path)
        if existing is not None and existing.kind == "dir":
            self._known.add(path)
            return
        if existing is not None:
            self._remove(path)
        entry = CatalogEntry("dir", member.mode, 4096, member.mtime, self.uid, self.gid)
        self._add(path, entry)
        self._union_mkdir(path)
        self._known.add(path)
        self._created.add(path)
        self._touched_dirs.add(path)

    @staticmethod
    def _content(reader: TarReader, path: str) -> Iterator[bytes]:
        """The member's content pieces; a cut one is task_read's PANIC (m2_ingest 51)."""
        try:
            yield from reader.content()
        except ArchiveDataError as exc:
            raise IngestFailure(
                f"failed to read data from the tar entry: {path} (-1)\n {exc}\n"
                + _panic("ingestion/task_read.cc : 54", f"failed to read {path} (-1)").stderr
            ) from None

    def _store(self, path: str, member: TarMember, reader: TarReader) -> CatalogEntry:
        """Store a regular file's content (chunked above the average chunk size) and write
        it into the union."""
        compress = self._compression == "zlib"
        entry = CatalogEntry(
            "file",
            member.mode,
            0,
            member.mtime,
            self.uid,
            self.gid,
            compression=self._compression,
        )
        chunked = self._chunking and member.size > self._chunk_size
        pending = bytearray()
        size = 0
        with _UnionFile(self.union + path) as union_file:
            for piece in self._content(reader, path):
                union_file.write(piece)
                pending += piece
                size += len(piece)
                while chunked and len(pending) >= self._chunk_size:
                    self._store_chunk(entry, bytes(pending[: self._chunk_size]), compress)
                    del pending[: self._chunk_size]
            if chunked:
                if pending:
                    self._store_chunk(entry, bytes(pending), compress)
            else:
                data = bytes(pending)
                entry.hash = self.repo.store_object(zlib.compress(data) if compress else data)
            union_file.finish(member.mode, member.mtime)
        entry.size = size
        self.files += 1
        return entry

    def _store_chunk(self, entry: CatalogEntry, piece: bytes, compress: bool) -> None:
        offset = entry.chunks[-1][1] + entry.chunks[-1][2] if entry.chunks else 0
        name = self.repo.store_object(zlib.compress(piece) if compress else piece, "P")
        entry.chunks.append((name[:-1], offset, len(piece)))

    # -- after the last member ------------------------------------------------------------
    def place_catalog_marker(self) -> None:
        """``-c``: a ``.cvmfscatalog`` (0664, empty) at the base makes it a nested catalog
        (m2_ingest 10-11). An archive that created nothing below the base fails
        SyncUnionTarball's assertion (a guess at the text: not recorded)."""
        base = "/" + os.fsdecode(self.base)
        if base not in self._known:
            raise IngestFailure(
                "cvmfs_swissknife: "
                f"{INGEST_SOURCE_PLACEHOLDER}/cvmfs/sync_union_tarball.cc: "
                "Assertion `dirs_.find(*dir) != dirs_.end()' failed.\nAborted\n"
            )
        path = f"{base}/{MARKER}"
        if path in self.entries:
            self._remove(path)
        compression = self._compression
        empty = self.repo.store_object(zlib.compress(b"") if compression == "zlib" else b"")
        entry = CatalogEntry(
            "file", 0o664, 0, self.now, self.uid, self.gid, hash=empty, compression=compression
        )
        self._add(path, entry)
        with _UnionFile(self.union + path) as union_file:
            union_file.finish(entry.mode, entry.mtime)

    def link_hard_links(self) -> None:
        """``PostUpload``: each hard link becomes a copy of its target's entry (m2 23-24);
        a target that is not a file or symlink of the new tree is the recorded PANIC
        (m2 26; for a directory target the text is a guess)."""
        for path, source in self._hardlinks:
            target = self.entries.get("/" + source)
            if target is None or target.kind == "dir":
                raise _panic(
                    "catalog_mgr_rw.cc : 304",
                    f"catalog for file '{source}' cannot be found, aborting",
                )
            if path in self.entries:
                self._remove(path)
            copy = CatalogEntry.from_json(target.to_json())
            self._add(path, copy, counted=False)
            with contextlib.suppress(OSError):
                materialise(self.repo, Path(self.union + path), copy)

    def settle_union(self) -> None:
        """Give the union's directories the catalog's modes and times again (deepest
        first), after their content changed."""
        for path in sorted(self._touched_dirs, key=lambda p: -p.count("/")):
            entry = self.entries.get(path)
            if entry is None or entry.kind != "dir":
                continue
            target = self.union if path == "/" else self.union + path
            with contextlib.suppress(OSError):
                if path in self._created:
                    os.chmod(target, entry.mode)
                os.utime(target, (entry.mtime, entry.mtime))

    # -- the union directory ----------------------------------------------------------------
    def _union_mkdir(self, path: str) -> None:
        """A directory in the union; one the union cannot hold (a name too long for the
        file system, a parent left out) is left out, as everything below it."""
        with contextlib.suppress(OSError):
            os.mkdir(self.union + path, 0o755)

    def _union_remove(self, path: str) -> None:
        target = self.union + path
        with contextlib.suppress(OSError):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)


class _UnionFile:
    """A file written into the union beside its place and renamed over it at the end;
    silently nothing where the union cannot hold it."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.tmp = f"{dest.rsplit('/', 1)[0]}/.fake-ingest.{os.getpid()}"
        self.fd: int | None = None

    def __enter__(self) -> _UnionFile:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return self

    def write(self, data: bytes) -> None:
        if self.fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            self._drop()

    def finish(self, mode: int, mtime: int) -> None:
        if self.fd is None:
            return
        try:
            os.fchmod(self.fd, mode)
            os.utime(self.fd, (mtime, mtime))
            os.close(self.fd)
            self.fd = None
            os.rename(self.tmp, self.dest)
        except OSError:
            self._drop()

    def _drop(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def __exit__(self, *exc: object) -> None:
        self._drop()
