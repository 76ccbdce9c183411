"""Descriptor-level steps the fsops modules share: open a root, descend, lstat, temp names.

Every path below a configured root is reached one component at a time with ``O_NOFOLLOW``
(:func:`descend`); the ``open`` flags and ``errno`` groups those steps need live here too.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cvmfs_syncd.paths import TEMP_PREFIX, TEMP_SUFFIX

_T = TypeVar("_T")

# O_PATH gives a handle usable as dir_fd without needing read permission on the directory
# and without touching its atime; fall back to O_RDONLY where it does not exist.
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
WALK_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# A component along the path is no longer a directory (a symlink or file took its place).
NOT_A_DIR_ERRNOS = frozenset({errno.ENOTDIR, errno.ELOOP})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def open_root(root: Path) -> int:
    """Open a configured root directory (following symlinks: the path is trusted)."""
    return os.open(root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def descend(start_fd: int, parts: list[str]) -> int:
    """Return a new descriptor for the directory ``parts`` below ``start_fd``, never following
    a symlink. Raise OSError (ENOENT, ENOTDIR/ELOOP for a non-directory, EACCES...)."""
    fd = os.dup(start_fd)
    try:
        for part in parts:
            child = os.open(part, WALK_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"


def create_temp(parent_fd: int, create: Callable[[str], _T]) -> tuple[str, _T]:
    """Call ``create(name)`` with fresh temporary names until one does not exist yet."""
    for _ in range(10):
        temp = _temp_name()
        try:
            return temp, create(temp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", parent_fd)
