"""Copying a staged file into the union directory while it is still the version planned.

:func:`copy_file` opens the source without following a symlink, checks it against its
Fingerprint before and after copying, and renames the copy into place.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cvmfs_syncd.fsops.descriptors import (
    DENIED_ERRNOS,
    NOT_A_DIR_ERRNOS,
    TEMP_FLAGS,
    create_temp,
    descend,
    lstat_at,
    open_root,
)
from cvmfs_syncd.fsops.union import DEFAULT_DIR_MODE, open_union_parent, place, unlink_quietly
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import split_repo_path

# O_NONBLOCK: if a FIFO is swapped in after the type check, open() returns at once instead
# of waiting for a writer; O_NOCTTY: a terminal device must never become our tty.
_SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

#: Bytes copied per system call (and between two ``chunk_callback`` calls).
COPY_CHUNK = 8 * 1024 * 1024

# Errors after which an in-kernel copy method is abandoned for the next, simpler one.
_COPY_FALLBACK_ERRNOS = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)


class CopyOutcome(enum.StrEnum):
    """What :func:`copy_file` did."""

    COPIED = "copied"
    #: The source is not the version planned (type, inode, size, mtime, mode differ, it
    #: changed while being copied, or a symlink appeared on its path): re-read it.
    CHANGED = "changed"
    #: The source (or a directory above it) no longer exists.
    VANISHED = "vanished"
    #: Permission denied reading the source.
    UNREADABLE = "unreadable"


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _source_failure(exc: OSError) -> CopyOutcome | None:
    """Map an error from opening the source to an outcome; None means unexpected."""
    if exc.errno == errno.ENOENT:
        return CopyOutcome.VANISHED
    if exc.errno in DENIED_ERRNOS:
        return CopyOutcome.UNREADABLE
    # ENOTDIR/ELOOP: a symlink or file appeared on the path; ENXIO: a socket;
    # EWOULDBLOCK: a lease holder is writing right now.
    if exc.errno in NOT_A_DIR_ERRNOS | {errno.ENXIO, errno.EWOULDBLOCK, errno.EISDIR}:
        return CopyOutcome.CHANGED
    return None


def matches(st: os.stat_result, expected: Fingerprint) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_ino == expected.inode
        and st.st_size == expected.size
        and st.st_mtime_ns == expected.mtime_ns
        and stat.S_IMODE(st.st_mode) == expected.mode
    )


def open_source(source_root: Path, parts: list[str], expected: Fingerprint) -> int | CopyOutcome:
    """Open the planned source file read-only, or return why it cannot be copied."""
    root_fd = open_root(source_root)
    try:
        try:
            parent_fd = descend(root_fd, parts[:-1])
        except OSError as exc:
            outcome = _source_failure(exc)
            if outcome is None:
                raise
            return outcome
    finally:
        os.close(root_fd)
    try:
        # Check the type before opening so that a device node is never opened at all;
        # the fstat below closes the race with the lstat.
        st = lstat_at(parent_fd, parts[-1])
        if not matches(st, expected):
            return CopyOutcome.CHANGED
        fd = os.open(parts[-1], _SOURCE_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        outcome = _source_failure(exc)
        if outcome is None:
            raise
        return outcome
    finally:
        os.close(parent_fd)
    try:
        if not matches(os.fstat(fd), expected):
            os.close(fd)
            return CopyOutcome.CHANGED
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_bytes(
    src: int, dst: int, size: int, chunk_size: int, callback: Callable[[int], None] | None
) -> int:
    """Copy up to ``size`` bytes from offset 0; return how many were copied.

    Tries copy_file_range (in-kernel, may share extents), then sendfile, then pread/pwrite,
    falling back per call when a method is not supported for these two files.
    """
    pos = 0
    method = 0  # 0: copy_file_range, 1: sendfile, 2: pread/pwrite
    while pos < size:
        want = min(chunk_size, size - pos)
        if method == 0:
            try:
                n = os.copy_file_range(src, dst, want, pos, pos)
            except OSError as exc:
                if exc.errno not in _COPY_FALLBACK_ERRNOS:
                    raise
                method = 1
                continue
        elif method == 1:
            try:
                os.lseek(dst, pos, os.SEEK_SET)
                n = os.sendfile(dst, src, pos, want)
            except OSError as exc:
                if exc.errno not in _COPY_FALLBACK_ERRNOS:
                    raise
                method = 2
                continue
        else:
            data = os.pread(src, want, pos)
            n = len(data)
            view = memoryview(data)
            written = 0
            while written < n:
                written += os.pwrite(dst, view[written:], pos + written)
        if n == 0:  # end of file before the planned size: the source shrank
            break
        pos += n
        if callback is not None:
            callback(pos)
    return pos


def copy_file(
    union_root: Path,
    repo_path: str,
    source_root: Path,
    rel_path: str,
    expected: Fingerprint,
    *,
    replace: bool = False,
    dir_mode: int = DEFAULT_DIR_MODE,
    chunk_size: int = COPY_CHUNK,
    chunk_callback: Callable[[int], None] | None = None,
    fsync: bool = False,
) -> CopyOutcome:
    """Copy the staged file ``source_root/rel_path`` to ``union_root/repo_path`` atomically.

    The source must still be the version ``expected`` describes (regular file, same inode,
    size, mtime_ns and permission bits) before and after the copy, and its ctime must not
    move while copying (ctime cannot be reset by the writer the way mtime can);
    otherwise the result is CHANGED and nothing is left behind in the union dir. The data
    goes to ``.cvmfs-syncd.<random>.tmp`` next to the destination, gets mode
    ``expected.mode & 0o777`` (setuid, setgid and sticky stripped: nothing published may
    gain privileges, and sticky means nothing on files) and mtime ``expected.mtime_ns``,
    and is then renamed over the destination. A destination directory is removed first
    (type change); a destination symlink is replaced, never written through. Missing
    parent directories are created with ``dir_mode``; see :func:`make_dir` for
    ``replace``. ``chunk_callback(bytes_copied)`` is called after each chunk of
    ``chunk_size`` bytes. With ``fsync`` the data is flushed before the rename.

    Return COPIED, CHANGED, VANISHED or UNREADABLE (see :class:`CopyOutcome`). Raise
    ValueError for unsafe paths or a non-file ``expected``; NotADirectoryError for a
    non-directory parent without ``replace``; OSError if either root cannot be opened, for
    failures writing the union dir (ENOSPC...) or reading the opened source (EIO). The
    union dir is not touched unless the source was opened and matched; parents created
    before a copy that ends CHANGED are left in place (the directory exists in staging).
    """
    if expected.type is not EntryType.FILE:
        raise ValueError(f"copy_file needs a file fingerprint, got {expected.type.value}")
    dest_parts = split_repo_path(repo_path)
    source_parts = split_repo_path(rel_path)
    if not dest_parts or not source_parts:
        raise ValueError("copy_file needs non-empty repository and source paths")

    opened = open_source(source_root, source_parts, expected)
    if isinstance(opened, CopyOutcome):
        return opened
    src = opened
    try:
        parent_fd = open_union_parent(union_root, dest_parts[:-1], replace, dir_mode)
        try:
            return _copy_into(
                parent_fd,
                dest_parts[-1],
                src,
                expected=expected,
                chunk_size=chunk_size,
                chunk_callback=chunk_callback,
                fsync=fsync,
            )
        finally:
            os.close(parent_fd)
    finally:
        os.close(src)


def _copy_into(
    parent_fd: int,
    name: str,
    src: int,
    *,
    expected: Fingerprint,
    chunk_size: int,
    chunk_callback: Callable[[int], None] | None,
    fsync: bool,
) -> CopyOutcome:
    """Copy ``src`` to a temporary file in ``parent_fd``, verify, and rename onto ``name``."""
    before = os.fstat(src)
    temp, opened = create_temp(
        parent_fd, lambda temp: os.open(temp, TEMP_FLAGS, 0o600, dir_fd=parent_fd)
    )
    dst: int | None = opened
    try:
        copied = _copy_bytes(src, opened, expected.size, chunk_size, chunk_callback)
        after = os.fstat(src)
        if (
            copied != expected.size
            or not matches(after, expected)
            or after.st_ctime_ns != before.st_ctime_ns
        ):
            os.close(opened)
            dst = None
            unlink_quietly(parent_fd, temp)
            return CopyOutcome.CHANGED
        os.fchmod(opened, expected.mode & 0o777)
        os.utime(opened, ns=(expected.mtime_ns, expected.mtime_ns))
        if fsync:
            os.fsync(opened)
        os.close(opened)
        dst = None
        place(parent_fd, temp, name)
    except BaseException:
        _close(dst)
        unlink_quietly(parent_fd, temp)
        raise
    return CopyOutcome.COPIED
