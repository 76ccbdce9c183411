"""Staged entries in place: opened while unchanged, probed for writers, removed once published.

Reading for preparing (:func:`open_staged`, :func:`still_matches`), the lease probe
(:func:`has_writers`), and inbox mode's removal (:func:`remove_staged`,
:func:`remove_marker_if_alone`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.fsops.copying import CopyOutcome, matches, open_source
from cvmfs_syncd.fsops.descriptors import (
    NOT_A_DIR_ERRNOS,
    create_temp,
    descend,
    lstat_at,
    open_root,
)
from cvmfs_syncd.fsops.walk import walk_staging
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import split_repo_path


def _same_entry(st: os.stat_result, expected: Fingerprint, dir_fd: int, name: str) -> bool:
    if st.st_ino != expected.inode:
        return False
    if expected.type is EntryType.FILE:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == expected.size
            and st.st_mtime_ns == expected.mtime_ns
        )
    if expected.type is EntryType.SYMLINK:
        if not stat.S_ISLNK(st.st_mode):
            return False
        try:
            return os.readlink(name, dir_fd=dir_fd) == expected.target
        except OSError:
            return False
    return stat.S_ISDIR(st.st_mode)


def remove_staged(source_root: Path, rel_path: str, expected: Fingerprint) -> bool:
    """Remove a published entry from a staging directory if it is still that version.

    Files and symlinks are removed only if inode, size and mtime_ns (and the symlink
    target) still match ``expected``; directories only if the inode matches and they are
    empty. To avoid deleting a newer version that is renamed onto the name at the last
    moment, the entry is first renamed to a private temporary name, checked there, and
    put back (by hard link, never overwriting) if it is not the expected one. Never
    follows a symlink.

    Return True if the entry was removed, False if it was left (changed, missing, not
    empty, or a directory above it is gone or not a directory). Raise ValueError for an
    unsafe path or ``""``; OSError for unexpected I/O failures.
    """
    parts = split_repo_path(rel_path)
    if not parts:
        raise UnsafeName("refusing to remove the staging root")
    root_fd = open_root(source_root)
    try:
        try:
            parent_fd = descend(root_fd, parts[:-1])
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in NOT_A_DIR_ERRNOS:
                return False
            raise
    finally:
        os.close(root_fd)
    try:
        return _remove_staged_at(parent_fd, parts[-1], expected)
    finally:
        os.close(parent_fd)


def _remove_staged_at(parent_fd: int, name: str, expected: Fingerprint) -> bool:
    try:
        st = lstat_at(parent_fd, name)
    except FileNotFoundError:
        return False
    if not _same_entry(st, expected, parent_fd, name):
        return False
    if expected.type is EntryType.DIRECTORY:
        return _rmdir_if_empty(parent_fd, name)
    try:
        temp, _ = create_temp(
            parent_fd,
            lambda temp: os.rename(name, temp, src_dir_fd=parent_fd, dst_dir_fd=parent_fd),
        )
    except FileNotFoundError:
        return False
    grabbed = lstat_at(parent_fd, temp)
    if _same_entry(grabbed, expected, parent_fd, temp):
        os.unlink(temp, dir_fd=parent_fd)
        return True
    # A newer version took the name just before the rename: put it back unless an even
    # newer one is there already (then the one we hold is superseded anyway).
    with contextlib.suppress(FileExistsError):
        os.link(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
    os.unlink(temp, dir_fd=parent_fd)
    return False


def _rmdir_if_empty(parent_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            return False
        raise
    return True


def open_staged(source_root: Path, rel_path: str, expected: Fingerprint) -> int | CopyOutcome:
    """Open the staged file ``rel_path`` read-only if it is still the version ``expected``.

    Return the descriptor (the caller closes it) or why it cannot be read (CHANGED,
    VANISHED, UNREADABLE), with the same checks as :func:`copy_file`: no symlink is followed
    anywhere on the path, a FIFO or device is never opened. Call :func:`still_matches` on
    the descriptor after reading to detect a change during the read. Raise ValueError for
    an unsafe path, OSError if the root cannot be opened.
    """
    if expected.type is not EntryType.FILE:
        raise ValueError(f"open_staged needs a file fingerprint, got {expected.type.value}")
    parts = split_repo_path(rel_path)
    if not parts:
        raise ValueError("open_staged needs a non-empty path")
    return open_source(source_root, parts, expected)


def still_matches(fd: int, expected: Fingerprint) -> bool:
    """Return True if the opened file is still the version ``expected`` describes."""
    return matches(os.fstat(fd), expected)


def has_writers(source_root: Path, rel_path: str, expected: Fingerprint) -> bool | None:
    """Return whether any process has the staged file open for writing.

    Asks the kernel with a read lease (``F_SETLEASE``), which is refused exactly while some
    descriptor of the file is open for writing; the lease is dropped at once. Return None
    when that cannot be known (the file changed or vanished, leases are not supported by
    the file system, or the daemon may not take them). Never follows a symlink.
    """
    opened = open_staged(source_root, rel_path, expected)
    if isinstance(opened, CopyOutcome):
        return None
    try:
        fcntl.fcntl(opened, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None  # EINVAL (no lease support), EACCES/EPERM (not owner, no CAP_LEASE)
    else:
        fcntl.fcntl(opened, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(opened)


def remove_marker_if_alone(source_root: Path, top: str, marker: str) -> bool:
    """Remove the ready marker ``top/marker`` if nothing but directories is left beside it.

    Inbox mode calls this after a publish: a file of the directory that could not be
    published yet keeps the marker, so it is published later instead of waiting for a
    marker that will never come again. Never follows a symlink: ``top`` is opened with
    O_NOFOLLOW and the marker removed relative to it, only if it is a regular file.
    Return True if the marker was removed.
    """
    parts = split_repo_path(top)
    if len(parts) != 1 or not marker or "/" in marker:
        raise ValueError("remove_marker_if_alone needs a top-level directory and a file name")
    try:
        entries = list(walk_staging(source_root, subdir=top))
    except OSError:
        return False
    others = [
        rel
        for rel, found in entries
        if rel != f"{top}/{marker}"
        and not (isinstance(found, Fingerprint) and found.type is EntryType.DIRECTORY)
    ]
    if others:
        return False
    root_fd = open_root(source_root)
    try:
        try:
            top_fd = descend(root_fd, parts)
        except OSError:
            return False
    finally:
        os.close(root_fd)
    try:
        try:
            st = lstat_at(top_fd, marker)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(marker, dir_fd=top_fd)
        return True
    finally:
        os.close(top_fd)
