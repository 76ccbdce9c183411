"""Reading a staging tree in directory order, one entry or all of them, following no symlink.

:func:`stat_entry` describes one entry, :func:`walk_staging` every entry below a directory;
each comes as a Fingerprint, or as :class:`Skipped` when it is never published.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_syncd.fsops.descriptors import (
    DENIED_ERRNOS,
    LIST_FLAGS,
    NOT_A_DIR_ERRNOS,
    descend,
    lstat_at,
    open_root,
)
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import split_repo_path

#: Directories deeper than this below a staging root are reported as ``Skipped("too-deep")``;
#: the walk keeps one descriptor open per level, so the depth bounds descriptor use.
MAX_DEPTH = 256


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry that exists but is not published.

    ``reason`` is one of ``"fifo"``, ``"socket"``, ``"device"``, ``"unknown-type"``,
    ``"unreadable"`` (permission denied on a directory or entry), ``"mount-point"`` (a
    directory on another file system) or ``"too-deep"``; ``detail`` is for humans.
    """

    reason: str
    detail: str = ""


_SPECIAL_TYPES = (
    (stat.S_ISFIFO, Skipped("fifo", "named pipes are never read")),
    (stat.S_ISSOCK, Skipped("socket", "sockets are not files")),
    (stat.S_ISCHR, Skipped("device", "device nodes are never opened")),
    (stat.S_ISBLK, Skipped("device", "device nodes are never opened")),
)


def _classify(st: os.stat_result, dir_fd: int, name: str) -> Fingerprint | Skipped:
    """Turn an lstat result into a Fingerprint or Skipped; raise OSError from readlink."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return Fingerprint(EntryType.FILE, mode, st.st_size, st.st_mtime_ns, st.st_ino)
    if stat.S_ISDIR(st.st_mode):
        # A directory's st_size is a file-system artefact, not content: leave it out.
        return Fingerprint(EntryType.DIRECTORY, mode, 0, st.st_mtime_ns, st.st_ino)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        return Fingerprint(
            EntryType.SYMLINK, mode, st.st_size, st.st_mtime_ns, st.st_ino, target=target
        )
    for test, skipped in _SPECIAL_TYPES:
        if test(st.st_mode):
            return skipped
    return Skipped("unknown-type", f"file type {stat.S_IFMT(st.st_mode):o} is not supported")


def entry_at(dir_fd: int, name: str) -> Fingerprint | Skipped | None:
    """lstat + classify ``name`` in ``dir_fd``; None if it vanished."""
    # Retry once if the entry changes type between lstat and readlink.
    for _ in range(3):
        try:
            st = lstat_at(dir_fd, name)
            return _classify(st, dir_fd, name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            if exc.errno != errno.EINVAL:  # EINVAL: readlink on what is no longer a link
                raise
    return None


def stat_entry(root: Path, rel_path: str) -> Fingerprint | Skipped | None:
    """Describe the entry at ``rel_path`` below ``root`` without following any symlink.

    ``rel_path`` ``""`` describes ``root`` itself. Return a Fingerprint for a regular file,
    directory or symlink (``mode`` holds all permission bits as found, setuid included;
    ``target`` the symlink's target verbatim; ``size`` is 0 for directories), Skipped for a
    FIFO, socket, device or an entry that permission checks hide, and None when there is
    no such entry reachable without following a symlink: it vanished, or a directory on
    its path is now a symlink or file (that symlink is reported under its own path).

    Raise ValueError for an unsafe ``rel_path``; OSError if ``root`` cannot be opened or
    on unexpected I/O errors.
    """
    parts = split_repo_path(rel_path)
    root_fd = open_root(root)
    try:
        if not parts:
            st = os.fstat(root_fd)
            return _classify(st, root_fd, ".")
        try:
            parent_fd = descend(root_fd, parts[:-1])
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in NOT_A_DIR_ERRNOS:
                return None
            if exc.errno in DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            raise
        try:
            return entry_at(parent_fd, parts[-1])
        finally:
            os.close(parent_fd)
    finally:
        os.close(root_fd)


def _list_dir(fd: int) -> list[str]:
    with os.scandir(fd) as it:
        return sorted(entry.name for entry in it)


def walk_staging(
    root: Path,
    *,
    subdir: str = "",
    prune: Callable[[str], bool] | None = None,
    cross_mounts: bool = False,
    max_depth: int = MAX_DEPTH,
) -> Iterator[tuple[str, Fingerprint | Skipped]]:
    """Yield ``(rel_path, Fingerprint | Skipped)`` for every entry below ``root``.

    ``rel_path`` is relative to ``root``. With ``subdir`` (a ``/``-separated path below
    ``root``, reached without following any symlink) only the entries below that directory
    are yielded, still with paths relative to ``root``; use it for subtree rescans instead
    of passing ``root / subdir``, which would follow a symlinked component.

    Order: names sorted within a directory, a directory before its contents. Symlinks are
    reported as symlinks and never descended into. Names are ``os.fsdecode`` strings.
    ``prune(rel_path)`` returning True drops an entry and, for a directory, everything
    below it (use it for ignore patterns). A directory on another file system than
    ``root`` is reported as ``Skipped("mount-point")`` and not entered unless
    ``cross_mounts``: teams cannot mount things, so a mount inside staging is an
    administrator's and must not be published by accident (bind mounts of the same file
    system are not detected). A directory that cannot be opened or listed is reported as
    ``Skipped("unreadable")`` in place of its fingerprint and the walk goes on. Entries that
    vanish during the walk are left out.

    Raise (when iteration starts) OSError if ``root`` or ``subdir`` is missing or
    unreadable, NotADirectoryError if ``subdir`` is not a directory (a symlink included),
    OSError(EXDEV) if ``subdir`` is on another file system without ``cross_mounts``, and
    ValueError for an unsafe ``subdir``: an empty result must never be mistaken for
    "everything was deleted".
    """
    parts = split_repo_path(subdir)
    root_fd = os.open(root, LIST_FLAGS & ~os.O_NOFOLLOW)
    try:
        root_dev = os.fstat(root_fd).st_dev
        start_fd = _open_subdir(root_fd, parts) if parts else root_fd
        try:
            if os.fstat(start_fd).st_dev != root_dev and not cross_mounts:
                raise OSError(errno.EXDEV, "on another file system than the staging root", subdir)
            walker = _Walker(root_dev, prune, cross_mounts, max_depth)
            yield from walker.walk(start_fd, subdir, _list_dir(start_fd), len(parts) + 1)
        finally:
            if start_fd != root_fd:
                os.close(start_fd)
    finally:
        os.close(root_fd)


def _open_subdir(root_fd: int, parts: list[str]) -> int:
    """Open ``parts`` below ``root_fd`` for listing, never following a symlink."""
    try:
        parent_fd = descend(root_fd, parts[:-1])
        try:
            return os.open(parts[-1], LIST_FLAGS, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as exc:
        if exc.errno in NOT_A_DIR_ERRNOS:
            where = "/".join(parts)
            raise NotADirectoryError(
                errno.ENOTDIR, "not a directory (or reached through a symlink)", where
            ) from None
        raise


@dataclass(frozen=True, slots=True)
class _Walker:
    root_dev: int
    prune: Callable[[str], bool] | None
    cross_mounts: bool
    max_depth: int

    def walk(
        self, dir_fd: int, prefix: str, names: list[str], depth: int
    ) -> Iterator[tuple[str, Fingerprint | Skipped]]:
        for name in names:
            rel = f"{prefix}/{name}" if prefix else name
            if self.prune is not None and self.prune(rel):
                continue
            try:
                st = lstat_at(dir_fd, name)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                yield rel, Skipped("unreadable", exc.strerror or "permission denied")
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._directory(dir_fd, name, rel, st, depth)
            else:
                entry = entry_at(dir_fd, name)
                if entry is not None:
                    yield rel, entry

    def _directory(
        self, dir_fd: int, name: str, rel: str, st: os.stat_result, depth: int
    ) -> Iterator[tuple[str, Fingerprint | Skipped]]:
        if st.st_dev != self.root_dev and not self.cross_mounts:
            yield rel, Skipped("mount-point", "a different file system is mounted here")
            return
        if depth >= self.max_depth:
            yield rel, Skipped("too-deep", f"more than {self.max_depth} directory levels")
            return
        try:
            child_fd = os.open(name, LIST_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in DENIED_ERRNOS:
                yield rel, Skipped("unreadable", exc.strerror or "permission denied")
                return
            if exc.errno not in NOT_A_DIR_ERRNOS:
                raise
            # Replaced by a symlink or file since the lstat: report what is there now.
            entry = entry_at(dir_fd, name)
            if entry is not None:
                yield rel, entry
            return
        try:
            try:
                child_names = _list_dir(child_fd)
            except PermissionError as exc:
                yield rel, Skipped("unreadable", exc.strerror or "permission denied")
                return
            # Fingerprint what was actually opened (it may have been swapped since lstat).
            yield rel, _classify(os.fstat(child_fd), dir_fd, name)
            yield from self.walk(child_fd, rel, child_names, depth + 1)
        finally:
            os.close(child_fd)
