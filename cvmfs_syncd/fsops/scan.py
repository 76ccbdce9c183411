"""Scanning a staging tree in the byte order of its paths, for the reconciliation with the index.

:func:`scan_staging` yields entry by entry, :func:`scan_staging_runs` a run of one directory
at a time as compact records; :func:`file_fingerprint` and :func:`fingerprint_of` turn what
they found into Fingerprints.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cvmfs_syncd.fsops.descriptors import DENIED_ERRNOS, LIST_FLAGS, NOT_A_DIR_ERRNOS
from cvmfs_syncd.fsops.walk import MAX_DEPTH, Skipped, entry_at
from cvmfs_syncd.model import EntryType, Fingerprint

#: What :func:`scan_staging` and :func:`scan_staging_runs` found for an entry: the lstat of
#: a regular file, the fstat of a directory as opened, a symlink's Fingerprint, or Skipped.
ScanFound = os.stat_result | Fingerprint | Skipped


def scan_staging(
    root: Path, *, cross_mounts: bool = False, max_depth: int = MAX_DEPTH
) -> Iterator[tuple[bytes, ScanFound]]:
    """Yield every entry below ``root`` in bytewise order of its relative path.

    For a reconciliation scan that merges the tree with the index, whose paths are BLOBs
    in ``memcmp`` order: ``a`` < ``a.b`` < ``a/b`` (``.`` sorts before ``/``), so a
    directory's contents may come after some of its siblings. Paths are relative to
    ``root``, as bytes. Each regular file and directory comes with its ``os.stat_result``
    (the lstat of a file; for a directory, the fstat of the directory as opened, not
    following symlinks; turn it into a Fingerprint with :func:`fingerprint_of`), a
    symlink with its Fingerprint, and everything else as in :func:`walk_staging`:
    Skipped for FIFOs, sockets, devices, entries permission checks hide, directories on
    another file system (unless ``cross_mounts``) and directories too deep. One lstat per
    entry; no symbolic link is followed, and no more than one descriptor per level is
    held: a directory is opened when it is listed with its parent and again when its
    turn comes to be listed, and skipped then if it is no longer the same directory (a
    watch event or the next scan sees the change). Entries that vanish during the scan
    are left out.

    Raise (when iteration starts) OSError if ``root`` is missing or unreadable.
    """
    for records, found in _scan(root, cross_mounts, max_depth, keep_files=True):
        for rel in records.split(b"\0")[:-1:2]:
            yield rel, found[rel]


def scan_staging_runs(
    root: Path, *, cross_mounts: bool = False, max_depth: int = MAX_DEPTH
) -> Iterator[tuple[bytes, dict[bytes, ScanFound]]]:
    """Yield the entries of :func:`scan_staging` (same order, same checks) a run at a time,
    each as a compact record, for a comparison that settles a whole run at once.

    A run is a stretch of that order taken from one directory: its entries up to the
    point where the contents of one of its subdirectories fall in. It comes as
    ``(records, found)``. ``records`` holds, for each entry of the run, its relative
    path, a NUL, its key and a NUL. The key of a regular file is ``f<mode> <size>
    <mtime_ns> <inode>`` (decimal; the mode's permission bits; from its lstat, and all
    that is kept of it: see :func:`file_fingerprint`), that of a directory that is
    listed ``d<mode>`` (from its fstat as opened), and empty for anything else (symlinks,
    Skipped). ``found`` maps the relative path of every entry of the run's directory that
    is not a regular file to what :func:`scan_staging` yields for it.

    Raise (when iteration starts) OSError if ``root`` is missing or unreadable.
    """
    return _scan(root, cross_mounts, max_depth, keep_files=False)


def file_fingerprint(key: bytes) -> Fingerprint:
    """Return the Fingerprint of a regular file from its key in a record of
    :func:`scan_staging_runs`."""
    mode, size, mtime_ns, inode = (int(field) for field in key[1:].split(b" "))
    return Fingerprint(EntryType.FILE, mode, size, mtime_ns, inode)


def fingerprint_of(st: os.stat_result) -> Fingerprint:
    """Return the Fingerprint of a regular file or directory :func:`scan_staging` yielded."""
    if stat.S_ISREG(st.st_mode):
        return Fingerprint(
            EntryType.FILE, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino
        )
    if stat.S_ISDIR(st.st_mode):
        return Fingerprint(
            EntryType.DIRECTORY, stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_ino
        )
    raise ValueError(f"not a regular file or directory: mode {st.st_mode:o}")


def _scan(
    root: Path, cross_mounts: bool, max_depth: int, *, keep_files: bool
) -> Iterator[tuple[bytes, dict[bytes, ScanFound]]]:
    root_fd = os.open(root, LIST_FLAGS & ~os.O_NOFOLLOW)
    try:
        scanner = _Scanner(os.fstat(root_fd).st_dev, cross_mounts, max_depth, keep_files)
        yield from scanner.runs(root_fd)
    finally:
        os.close(root_fd)


_FS_ENCODING = sys.getfilesystemencoding()

_FS_ERRORS = sys.getfilesystemencodeerrors()


def _encoded(text: str) -> bytes:
    return text.encode(_FS_ENCODING, _FS_ERRORS)


@dataclass(frozen=True, slots=True)
class _Scanner:
    root_dev: int
    cross_mounts: bool
    max_depth: int
    #: Keep the lstat of every regular file in ``found`` (costs the time to keep a Python
    #: object per file).
    keep_files: bool

    def runs(self, root_fd: int) -> Iterator[tuple[bytes, dict[bytes, ScanFound]]]:
        # An explicit stack of directories being listed. A frame: the directory's fd, the
        # length of its path prefix, its sorted records (with a marker ``<rel>/`` where a
        # subdirectory's contents fall), what was found by path, its depth, whether the
        # fd is ours to close. Records are built as text (an f-string is the cheapest way
        # to format the key, and sorting text is faster than sorting bytes) and encoded a
        # run at a time.
        records, found = self._listing(root_fd, "", 1)
        frames: list[tuple[int, int, Iterator[str], dict[bytes, ScanFound], int, bool]] = [
            (root_fd, 0, iter(records), found, 1, False)
        ]
        try:
            while frames:
                dir_fd, prefix_len, items, found, depth, _ = frames[-1]
                run: list[str] = []
                for record in items:
                    if record[-1] != "/":
                        run.append(record)
                        continue
                    if run:
                        yield _encoded("".join(run)), found
                        run = []
                    rel = record[:-1]
                    listed = cast(os.stat_result, found[_encoded(rel)])  # listable ones only
                    child_fd = _reopen(dir_fd, rel[prefix_len:], (listed.st_dev, listed.st_ino))
                    if child_fd is None:
                        continue
                    try:
                        child_records, child_found = self._listing(child_fd, record, depth + 1)
                    except BaseException:
                        os.close(child_fd)
                        raise
                    frames.append(
                        (child_fd, len(record), iter(child_records), child_found, depth + 1, True)
                    )
                    break
                else:
                    if run:
                        yield _encoded("".join(run)), found
                    if frames.pop()[5]:
                        os.close(dir_fd)
        finally:
            for frame in frames:
                if frame[5]:
                    os.close(frame[0])

    def _listing(
        self, dir_fd: int, prefix: str, depth: int
    ) -> tuple[list[str], dict[bytes, ScanFound]]:
        """List a directory: one lstat per entry, and for each directory the open and fstat
        of :meth:`_directory`. Return its records in byte order, with ``<rel>/`` after
        each directory to be listed (where its contents fall), and what was found."""
        records: list[str] = []
        found: dict[bytes, ScanFound] = {}
        append = records.append
        keep_files = self.keep_files
        is_reg, is_dir = stat.S_ISREG, stat.S_ISDIR
        with os.scandir(dir_fd) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except PermissionError as exc:
                    rel = prefix + entry.name
                    found[_encoded(rel)] = Skipped(
                        "unreadable", exc.strerror or "permission denied"
                    )
                    append(f"{rel}\0\0")
                    continue
                mode = st.st_mode
                if is_reg(mode):
                    append(
                        f"{prefix}{entry.name}\0"
                        f"f{mode & 0o7777} {st.st_size} {st.st_mtime_ns} {st.st_ino}\0"
                    )
                    if keep_files:
                        found[_encoded(prefix + entry.name)] = st
                    continue
                name = entry.name
                rel = prefix + name
                if is_dir(mode):
                    what = self._directory(dir_fd, name, st, depth)
                    if isinstance(what, os.stat_result):
                        found[_encoded(rel)] = what
                        append(f"{rel}\0d{what.st_mode & 0o7777}\0")
                        append(rel + "/")
                        continue
                else:
                    what = entry_at(dir_fd, name)
                if what is None:
                    continue  # vanished
                found[_encoded(rel)] = what
                append(f"{rel}\0\0")
        # Text sorts in code point order, which is the byte order of the names' UTF-8;
        # names that are not UTF-8 (surrogate escapes) need the bytes.
        if "".join(records).isascii():
            records.sort()
        else:
            records.sort(key=_encoded)
        return records, found

    def _directory(
        self, dir_fd: int, name: str, st: os.stat_result, depth: int
    ) -> ScanFound | None:
        """Return what to report for a directory (its fstat if it is to be listed)."""
        if st.st_dev != self.root_dev and not self.cross_mounts:
            return Skipped("mount-point", "a different file system is mounted here")
        if depth >= self.max_depth:
            return Skipped("too-deep", f"more than {self.max_depth} directory levels")
        try:
            child_fd = os.open(name, LIST_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            if exc.errno not in NOT_A_DIR_ERRNOS:
                raise
            # Replaced by a symlink or file since the lstat: report what is there now.
            return entry_at(dir_fd, name)
        try:
            return os.fstat(child_fd)
        finally:
            os.close(child_fd)


def _reopen(dir_fd: int, name: str, identity: tuple[int, int]) -> int | None:
    """Open a directory reported earlier for listing; None if it is gone or another one."""
    try:
        child_fd = os.open(name, LIST_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT or exc.errno in NOT_A_DIR_ERRNOS | DENIED_ERRNOS:
            return None  # gone or replaced since it was reported
        raise
    st = os.fstat(child_fd)
    if (st.st_dev, st.st_ino) != identity:
        os.close(child_fd)
        return None  # another directory took the name since it was reported
    return child_fd
