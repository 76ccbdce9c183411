"""The file-system edge: reading staging directories and writing the repository's union dir.

Everything here runs as root on input that other people control, so every path is walked
one component at a time from a directory file descriptor with ``O_NOFOLLOW``: no symbolic
link inside a staging directory or inside the union directory is ever followed. Only the
configured roots themselves (``root``, ``source_root``, ``union_root``) are opened by
path, because they come from the administrator.

Path arguments are ``str`` as produced by :func:`os.fsdecode` (surrogate escapes stand for
bytes that are not UTF-8), ``/``-separated and relative to their root; they are checked
with :func:`cvmfs_syncd.paths.split_repo_path` and ValueError is raised for unsafe ones.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import operator
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.model import EntryType, Fingerprint
from cvmfs_syncd.paths import TEMP_PREFIX, TEMP_SUFFIX, split_repo_path

_T = TypeVar("_T")

# O_PATH gives a handle usable as dir_fd without needing read permission on the directory
# and without touching its atime; fall back to O_RDONLY where it does not exist.
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_WALK_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a FIFO is swapped in after the type check, open() returns at once instead
# of waiting for a writer; O_NOCTTY: a terminal device must never become our tty.
_SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: Bytes copied per system call (and between two ``chunk_callback`` calls).
COPY_CHUNK = 8 * 1024 * 1024
#: Directories deeper than this below a staging root are reported as ``Skipped("too-deep")``;
#: the walk keeps one descriptor open per level, so the depth bounds descriptor use.
MAX_DEPTH = 256
#: Mode given to directories created implicitly as parents of a written entry.
DEFAULT_DIR_MODE = 0o755

# Errors after which an in-kernel copy method is abandoned for the next, simpler one.
_COPY_FALLBACK_ERRNOS = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)
# A component along the path is no longer a directory (a symlink or file took its place).
_NOT_A_DIR_ERRNOS = frozenset({errno.ENOTDIR, errno.ELOOP})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry that exists but is not published.

    ``reason`` is one of ``"fifo"``, ``"socket"``, ``"device"``, ``"unknown-type"``,
    ``"unreadable"`` (permission denied on a directory or entry), ``"mount-point"`` (a
    directory on another file system) or ``"too-deep"``; ``detail`` is for humans.
    """

    reason: str
    detail: str = ""


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


# --------------------------------------------------------------------------------------
# helpers


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _open_root(root: Path) -> int:
    """Open a configured root directory (following symlinks: the path is trusted)."""
    return os.open(root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _descend(start_fd: int, parts: list[str]) -> int:
    """Return a new descriptor for the directory ``parts`` below ``start_fd``, never following
    a symlink. Raise OSError (ENOENT, ENOTDIR/ELOOP for a non-directory, EACCES...)."""
    fd = os.dup(start_fd)
    try:
        for part in parts:
            child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


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


def _entry_at(dir_fd: int, name: str) -> Fingerprint | Skipped | None:
    """lstat + classify ``name`` in ``dir_fd``; None if it vanished."""
    # Retry once if the entry changes type between lstat and readlink.
    for _ in range(3):
        try:
            st = _lstat_at(dir_fd, name)
            return _classify(st, dir_fd, name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            if exc.errno != errno.EINVAL:  # EINVAL: readlink on what is no longer a link
                raise
    return None


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"


# --------------------------------------------------------------------------------------
# reading staging directories


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
    root_fd = _open_root(root)
    try:
        if not parts:
            st = os.fstat(root_fd)
            return _classify(st, root_fd, ".")
        try:
            parent_fd = _descend(root_fd, parts[:-1])
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in _NOT_A_DIR_ERRNOS:
                return None
            if exc.errno in _DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            raise
        try:
            return _entry_at(parent_fd, parts[-1])
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
    root_fd = os.open(root, _LIST_FLAGS & ~os.O_NOFOLLOW)
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
        parent_fd = _descend(root_fd, parts[:-1])
        try:
            return os.open(parts[-1], _LIST_FLAGS, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as exc:
        if exc.errno in _NOT_A_DIR_ERRNOS:
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
                st = _lstat_at(dir_fd, name)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                yield rel, Skipped("unreadable", exc.strerror or "permission denied")
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._directory(dir_fd, name, rel, st, depth)
            else:
                entry = _entry_at(dir_fd, name)
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
            child_fd = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in _DENIED_ERRNOS:
                yield rel, Skipped("unreadable", exc.strerror or "permission denied")
                return
            if exc.errno not in _NOT_A_DIR_ERRNOS:
                raise
            # Replaced by a symlink or file since the lstat: report what is there now.
            entry = _entry_at(dir_fd, name)
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


def scan_staging(
    root: Path, *, cross_mounts: bool = False, max_depth: int = MAX_DEPTH
) -> Iterator[tuple[bytes, os.stat_result | Fingerprint | Skipped]]:
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
    held: a directory is opened when it is reported and again when its turn comes to be
    listed, and skipped then if it is no longer the same directory (a watch event or the
    next scan sees the change). Entries that vanish during the scan are left out.

    Raise (when iteration starts) OSError if ``root`` is missing or unreadable.
    """
    root_fd = os.open(root, _LIST_FLAGS & ~os.O_NOFOLLOW)
    try:
        scanner = _Scanner(os.fstat(root_fd).st_dev, cross_mounts, max_depth)
        yield from scanner.scan(root_fd, b"", 1)
    finally:
        os.close(root_fd)


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


_FIRST = operator.itemgetter(0)


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

# What an item of a listed directory is, in :class:`_Scanner`.
_REGULAR, _DIRECTORY, _OTHER, _REPORT, _CONTENTS = range(5)

_ScanItem = tuple[bytes, os.stat_result | Skipped | None, str, int]


@dataclass(frozen=True, slots=True)
class _Scanner:
    root_dev: int
    cross_mounts: bool
    max_depth: int

    def scan(
        self, root_fd: int, prefix: bytes, depth: int
    ) -> Iterator[tuple[bytes, os.stat_result | Fingerprint | Skipped]]:
        # One generator and an explicit stack (no generator per level to pass each entry
        # through). A frame: directory fd, its sorted items, depth, the identities of the
        # subdirectories reported and not yet listed, whether the fd is ours to close.
        frames: list[tuple[int, Iterator[_ScanItem], int, dict[str, tuple[int, int]], bool]] = [
            (root_fd, iter(_listing(root_fd, prefix)), depth, {}, False)
        ]
        try:
            while frames:
                dir_fd, items, depth, opened, _ = frames[-1]
                for rel, what, name, kind in items:
                    if kind == _REGULAR:
                        yield rel, what  # type: ignore[misc]
                    elif kind == _CONTENTS:
                        identity = opened.pop(name, None)
                        child_fd = None if identity is None else _reopen(dir_fd, name, identity)
                        if child_fd is not None:
                            try:
                                listing = _listing(child_fd, rel)
                            except BaseException:
                                os.close(child_fd)
                                raise
                            frames.append((child_fd, iter(listing), depth + 1, {}, True))
                            break
                    elif kind == _DIRECTORY:
                        found = self._directory(dir_fd, name, cast(os.stat_result, what), depth)
                        if isinstance(found, os.stat_result):
                            opened[name] = (found.st_dev, found.st_ino)
                        if found is not None:
                            yield rel, found
                    elif kind == _REPORT:
                        yield rel, what  # type: ignore[misc]
                    else:
                        entry_found = _entry_at(dir_fd, name)
                        if entry_found is not None:
                            yield rel, entry_found
                else:
                    if frames.pop()[4]:
                        os.close(dir_fd)
        finally:
            for dir_fd, _, _, _, owned in frames:
                if owned:
                    os.close(dir_fd)

    def _directory(
        self, dir_fd: int, name: str, st: os.stat_result, depth: int
    ) -> os.stat_result | Fingerprint | Skipped | None:
        """Return what to report for a directory (its fstat if it is to be listed)."""
        if st.st_dev != self.root_dev and not self.cross_mounts:
            return Skipped("mount-point", "a different file system is mounted here")
        if depth >= self.max_depth:
            return Skipped("too-deep", f"more than {self.max_depth} directory levels")
        try:
            child_fd = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _DENIED_ERRNOS:
                return Skipped("unreadable", exc.strerror or "permission denied")
            if exc.errno not in _NOT_A_DIR_ERRNOS:
                raise
            # Replaced by a symlink or file since the lstat: report what is there now.
            return _entry_at(dir_fd, name)
        try:
            return os.fstat(child_fd)
        finally:
            os.close(child_fd)


def _listing(dir_fd: int, prefix: bytes) -> list[_ScanItem]:
    """List a directory: every entry with its lstat (one system call each), and for each
    subdirectory a second item, ``<name>/``, where its contents fall in byte order."""
    items: list[_ScanItem] = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            rel = prefix + name.encode(_FS_ENCODING, _FS_ERRORS)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                items.append((rel, Skipped("unreadable", exc.strerror or ""), name, _REPORT))
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                items.append((rel, st, name, _REGULAR))
            elif stat.S_ISDIR(mode):
                items.append((rel, st, name, _DIRECTORY))
                items.append((rel + b"/", None, name, _CONTENTS))
            else:
                items.append((rel, st, name, _OTHER))
    items.sort(key=_FIRST)
    return items


def _reopen(dir_fd: int, name: str, identity: tuple[int, int]) -> int | None:
    """Open a directory reported earlier for listing; None if it is gone or another one."""
    try:
        child_fd = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT or exc.errno in _NOT_A_DIR_ERRNOS | _DENIED_ERRNOS:
            return None  # gone or replaced since it was reported
        raise
    st = os.fstat(child_fd)
    if (st.st_dev, st.st_ino) != identity:
        os.close(child_fd)
        return None  # another directory took the name since it was reported
    return child_fd


# --------------------------------------------------------------------------------------
# writing the union directory


def _mkdir_at(dir_fd: int, name: str, mode: int) -> None:
    """Create directory ``name`` in ``dir_fd`` with exactly ``mode & 0o777`` (umask aside)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    _chmod_dir_at(dir_fd, name, mode)


def _chmod_dir_at(dir_fd: int, name: str, mode: int) -> None:
    # chmod by path cannot refuse symlinks on Linux; opening with O_NOFOLLOW then fchmod can.
    fd = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode & 0o777)
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> bool:
    """Remove ``name`` (file, symlink or whole tree) without following symlinks.

    Return False if it did not exist.
    """
    try:
        st = _lstat_at(dir_fd, name)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        # shutil.rmtree walks with descriptors and verifies each directory it opens is the
        # one it lstat'ed, so a symlink swapped in mid-way is never followed.
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
    return True


def _union_parent(
    union_fd: int, parts: list[str], *, create: bool, replace: bool, dir_mode: int
) -> int:
    """Return a descriptor for the directory ``parts`` below ``union_fd``.

    With ``create``, missing directories are made with ``dir_mode``; a non-directory in the
    way (file or symlink) is removed and replaced by a directory when ``replace`` is True,
    else NotADirectoryError is raised. Symlinks are never followed.
    """
    fd = os.dup(union_fd)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                _mkdir_at(fd, part, dir_mode)
                child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in _NOT_A_DIR_ERRNOS or not create:
                    raise
                where = "/".join(parts[: i + 1])
                if not replace:
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        f"{where!r} in the repository is a file or symlink where a directory "
                        "is needed (pass replace=True to replace it)",
                        where,
                    ) from None
                _remove_at(fd, part)
                _mkdir_at(fd, part, dir_mode)
                child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_union_parent(union_root: Path, parts: list[str], replace: bool, dir_mode: int) -> int:
    """Return a descriptor of the directory ``parts`` below the union dir, creating it."""
    union_fd = _open_root(union_root)
    try:
        return _union_parent(union_fd, parts, create=True, replace=replace, dir_mode=dir_mode)
    finally:
        os.close(union_fd)


def _place(dir_fd: int, temp: str, name: str) -> None:
    """Atomically move ``temp`` onto ``name`` in ``dir_fd``.

    A directory at ``name`` is removed first (a type change); a symlink or file is replaced
    by the rename itself, which never touches a symlink's target.
    """
    try:
        st = _lstat_at(dir_fd, name)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _source_failure(exc: OSError) -> CopyOutcome | None:
    """Map an error from opening the source to an outcome; None means unexpected."""
    if exc.errno == errno.ENOENT:
        return CopyOutcome.VANISHED
    if exc.errno in _DENIED_ERRNOS:
        return CopyOutcome.UNREADABLE
    # ENOTDIR/ELOOP: a symlink or file appeared on the path; ENXIO: a socket;
    # EWOULDBLOCK: a lease holder is writing right now.
    if exc.errno in _NOT_A_DIR_ERRNOS | {errno.ENXIO, errno.EWOULDBLOCK, errno.EISDIR}:
        return CopyOutcome.CHANGED
    return None


def _matches(st: os.stat_result, expected: Fingerprint) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_ino == expected.inode
        and st.st_size == expected.size
        and st.st_mtime_ns == expected.mtime_ns
        and stat.S_IMODE(st.st_mode) == expected.mode
    )


def _open_source(source_root: Path, parts: list[str], expected: Fingerprint) -> int | CopyOutcome:
    """Open the planned source file read-only, or return why it cannot be copied."""
    root_fd = _open_root(source_root)
    try:
        try:
            parent_fd = _descend(root_fd, parts[:-1])
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
        st = _lstat_at(parent_fd, parts[-1])
        if not _matches(st, expected):
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
        if not _matches(os.fstat(fd), expected):
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

    opened = _open_source(source_root, source_parts, expected)
    if isinstance(opened, CopyOutcome):
        return opened
    src = opened
    try:
        parent_fd = _open_union_parent(union_root, dest_parts[:-1], replace, dir_mode)
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


def _create_temp(parent_fd: int, create: Callable[[str], _T]) -> tuple[str, _T]:
    """Call ``create(name)`` with fresh temporary names until one does not exist yet."""
    for _ in range(10):
        temp = _temp_name()
        try:
            return temp, create(temp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", parent_fd)


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
    temp, opened = _create_temp(
        parent_fd, lambda temp: os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=parent_fd)
    )
    dst: int | None = opened
    try:
        copied = _copy_bytes(src, opened, expected.size, chunk_size, chunk_callback)
        after = os.fstat(src)
        if (
            copied != expected.size
            or not _matches(after, expected)
            or after.st_ctime_ns != before.st_ctime_ns
        ):
            os.close(opened)
            dst = None
            _unlink_quietly(parent_fd, temp)
            return CopyOutcome.CHANGED
        os.fchmod(opened, expected.mode & 0o777)
        os.utime(opened, ns=(expected.mtime_ns, expected.mtime_ns))
        if fsync:
            os.fsync(opened)
        os.close(opened)
        dst = None
        _place(parent_fd, temp, name)
    except BaseException:
        _close(dst)
        _unlink_quietly(parent_fd, temp)
        raise
    return CopyOutcome.COPIED


def make_dir(
    union_root: Path,
    repo_path: str,
    mode: int = DEFAULT_DIR_MODE,
    *,
    replace: bool = False,
    dir_mode: int = DEFAULT_DIR_MODE,
) -> None:
    """Make ``repo_path`` a directory with permission bits ``mode & 0o777``.

    An existing directory keeps its contents and gets the mode; an existing file or
    symlink at ``repo_path`` is replaced (the caller asked for a directory there). Missing
    parents are created with ``dir_mode``. A parent that is a file or symlink is replaced
    by a directory when ``replace`` is True; otherwise NotADirectoryError is raised.
    setuid/setgid/sticky are stripped: they mean nothing in a read-only repository.
    ``repo_path`` ``""`` (the repository root) is left alone.

    Raise ValueError for an unsafe path, OSError for I/O failures.
    """
    parts = split_repo_path(repo_path)
    if not parts:
        return
    parent_fd = _open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        name = parts[-1]
        try:
            st = _lstat_at(parent_fd, name)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent_fd)
        _mkdir_at(parent_fd, name, mode)
    finally:
        os.close(parent_fd)


def make_symlink(
    union_root: Path,
    repo_path: str,
    target: str,
    *,
    mtime_ns: int | None = None,
    replace: bool = False,
    dir_mode: int = DEFAULT_DIR_MODE,
) -> None:
    """Make ``repo_path`` a symlink whose target is ``target``, stored verbatim.

    The target is never resolved or checked for where it points: a symlink in the
    repository only has meaning on clients. The link is created under a temporary name and
    renamed into place, replacing a file or symlink atomically; a directory there is
    removed first. ``mtime_ns`` sets the link's own mtime. Parents as for :func:`make_dir`.

    Raise ValueError for an unsafe path or an empty target or one containing NUL;
    NotADirectoryError or OSError as for :func:`make_dir`.
    """
    if not target or "\0" in target:
        raise UnsafeName(f"symlink target {target!r} is empty or contains NUL")
    parts = split_repo_path(repo_path)
    if not parts:
        raise UnsafeName("the repository root cannot be a symlink")
    parent_fd = _open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        temp, _ = _create_temp(parent_fd, lambda temp: os.symlink(target, temp, dir_fd=parent_fd))
        try:
            if mtime_ns is not None:
                os.utime(temp, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            _place(parent_fd, temp, parts[-1])
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise
    finally:
        os.close(parent_fd)


def delete(union_root: Path, repo_path: str) -> bool:
    """Remove the file, symlink or whole directory tree at ``repo_path``.

    Symlinks are removed, never followed, at every level of a tree. Return True if
    something was removed, False if there was nothing at that path (including when a
    directory above it is missing or is itself a file or symlink).

    Raise ValueError for an unsafe path or ``""`` (the repository root is never deleted);
    OSError for I/O failures.
    """
    parts = split_repo_path(repo_path)
    if not parts:
        raise UnsafeName("refusing to delete the repository root")
    union_fd = _open_root(union_root)
    try:
        try:
            parent_fd = _union_parent(union_fd, parts[:-1], create=False, replace=False, dir_mode=0)
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in _NOT_A_DIR_ERRNOS:
                return False
            raise
    finally:
        os.close(union_fd)
    try:
        return _remove_at(parent_fd, parts[-1])
    finally:
        os.close(parent_fd)


# --------------------------------------------------------------------------------------
# inbox mode


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
    root_fd = _open_root(source_root)
    try:
        try:
            parent_fd = _descend(root_fd, parts[:-1])
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in _NOT_A_DIR_ERRNOS:
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
        st = _lstat_at(parent_fd, name)
    except FileNotFoundError:
        return False
    if not _same_entry(st, expected, parent_fd, name):
        return False
    if expected.type is EntryType.DIRECTORY:
        return _rmdir_if_empty(parent_fd, name)
    try:
        temp, _ = _create_temp(
            parent_fd,
            lambda temp: os.rename(name, temp, src_dir_fd=parent_fd, dst_dir_fd=parent_fd),
        )
    except FileNotFoundError:
        return False
    grabbed = _lstat_at(parent_fd, temp)
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


# --------------------------------------------------------------------------------------
# grafting: reading a staged file once, writing small files into the union directory


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
    return _open_source(source_root, parts, expected)


def still_matches(fd: int, expected: Fingerprint) -> bool:
    """Return True if the opened file is still the version ``expected`` describes."""
    return _matches(os.fstat(fd), expected)


def write_file(
    union_root: Path,
    repo_path: str,
    data: bytes,
    *,
    mode: int = 0o644,
    mtime_ns: int | None = None,
    replace: bool = True,
    dir_mode: int = DEFAULT_DIR_MODE,
) -> None:
    """Write ``data`` as the file ``repo_path`` under the union dir, atomically.

    The bytes go to a temporary name created with O_EXCL|O_NOFOLLOW next to the
    destination, get ``mode & 0o777`` and ``mtime_ns`` (if given), and are renamed over the
    destination (a directory there is removed first, a symlink replaced, never followed).
    Raise ValueError for an unsafe path, OSError for I/O failures.
    """
    if not split_repo_path(repo_path):
        raise ValueError("write_file needs a non-empty repository path")
    write_stream(
        union_root,
        repo_path,
        [data],
        mode=mode,
        mtime_ns=mtime_ns,
        replace=replace,
        dir_mode=dir_mode,
    )


def write_stream(
    union_root: Path,
    repo_path: str,
    pieces: Iterable[bytes],
    *,
    size: int | None = None,
    mode: int = 0o644,
    mtime_ns: int | None = None,
    replace: bool = True,
    dir_mode: int = DEFAULT_DIR_MODE,
) -> bool:
    """Write the concatenated ``pieces`` as the file ``repo_path`` under the union dir.

    For content that arrives in parts (a download): nothing larger than one piece is held
    in memory. Placement is as for :func:`write_file` (a temporary name created with
    O_EXCL|O_NOFOLLOW, ``mode & 0o777``, ``mtime_ns``, renamed over the destination, no
    symlink followed). If ``size`` is given and the pieces add up to a different number of
    bytes, the temporary file is removed, the destination is left as it was and False is
    returned; otherwise True. An exception raised while iterating ``pieces`` propagates
    after the temporary file is removed. Raise ValueError for an unsafe path, OSError for
    I/O failures.
    """
    parts = split_repo_path(repo_path)
    if not parts:
        raise ValueError("write_stream needs a non-empty repository path")
    parent_fd = _open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        temp, fd = _create_temp(
            parent_fd, lambda name: os.open(name, _TEMP_FLAGS, 0o600, dir_fd=parent_fd)
        )
        try:
            try:
                written = 0
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
                    written += len(piece)
                complete = size is None or written == size
                if complete:
                    os.fchmod(fd, mode & 0o777)
                    if mtime_ns is not None:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            if not complete:
                _unlink_quietly(parent_fd, temp)
                return False
            _place(parent_fd, temp, parts[-1])
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise
    finally:
        os.close(parent_fd)
    return True


class UnionWriter:
    """Writes many small files into the union directory, opening each parent only once.

    For graft placeholders and markers: a file is created in place with
    O_EXCL|O_NOFOLLOW (no temporary name while nothing is there yet) and otherwise
    written to a temporary name and renamed over the old entry, as :func:`write_file`
    does. Parent descriptors are kept until :meth:`close`: nothing may remove or replace
    a directory below the union dir while the writer is open.
    """

    def __init__(self, union_root: Path, *, dir_mode: int = DEFAULT_DIR_MODE) -> None:
        self._root_fd = _open_root(union_root)
        self._dir_mode = dir_mode
        self._parents: dict[tuple[str, ...], int] = {}

    def __enter__(self) -> UnionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parent(self, parts: tuple[str, ...]) -> int:
        fd = self._parents.get(parts)
        if fd is None:
            if len(self._parents) >= 1024:
                self._close_parents()
            fd = _union_parent(
                self._root_fd, list(parts), create=True, replace=True, dir_mode=self._dir_mode
            )
            self._parents[parts] = fd
        return fd

    def write(self, repo_path: str, data: bytes, *, mode: int, mtime_ns: int | None = None) -> None:
        """Write ``data`` as ``repo_path`` with ``mode & 0o777`` (and ``mtime_ns``)."""
        parts = split_repo_path(repo_path)
        if not parts:
            raise ValueError("UnionWriter.write needs a non-empty repository path")
        parent = self._parent(tuple(parts[:-1]))
        name = parts[-1]
        try:
            fd = os.open(name, _TEMP_FLAGS, 0o600, dir_fd=parent)
            temp = ""
        except FileExistsError:
            temp, fd = _create_temp(parent, lambda t: os.open(t, _TEMP_FLAGS, 0o600, dir_fd=parent))
        try:
            try:
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fchmod(fd, mode & 0o777)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            if temp:
                _place(parent, temp, name)
        except BaseException:
            _unlink_quietly(parent, temp or name)
            raise

    def _close_parents(self) -> None:
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        self._close_parents()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


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
    root_fd = _open_root(source_root)
    try:
        try:
            top_fd = _descend(root_fd, parts)
        except OSError:
            return False
    finally:
        os.close(root_fd)
    try:
        try:
            st = _lstat_at(top_fd, marker)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(marker, dir_fd=top_fd)
        return True
    finally:
        os.close(top_fd)
