"""Writing the union directory atomically and without following a symlink.

Directories (:func:`make_dir`), symlinks (:func:`make_symlink`), removal (:func:`delete`),
files and streams (:func:`write_file`, :func:`write_stream`) and many small files through
one :class:`UnionWriter`; plus the placing steps :mod:`cvmfs_syncd.fsops.copying` shares.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.fsops.descriptors import (
    LIST_FLAGS,
    NOT_A_DIR_ERRNOS,
    TEMP_FLAGS,
    WALK_FLAGS,
    create_temp,
    lstat_at,
    open_root,
)
from cvmfs_syncd.paths import split_repo_path

#: Mode given to directories created implicitly as parents of a written entry.
DEFAULT_DIR_MODE = 0o755


def _mkdir_at(dir_fd: int, name: str, mode: int) -> None:
    """Create directory ``name`` in ``dir_fd`` with exactly ``mode & 0o777`` (umask aside)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    _chmod_dir_at(dir_fd, name, mode)


def _chmod_dir_at(dir_fd: int, name: str, mode: int) -> None:
    # chmod by path cannot refuse symlinks on Linux; opening with O_NOFOLLOW then fchmod can.
    fd = os.open(name, LIST_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode & 0o777)
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> bool:
    """Remove ``name`` (file, symlink or whole tree) without following symlinks.

    Return False if it did not exist.
    """
    try:
        st = lstat_at(dir_fd, name)
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
                child = os.open(part, WALK_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                _mkdir_at(fd, part, dir_mode)
                child = os.open(part, WALK_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in NOT_A_DIR_ERRNOS or not create:
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
                child = os.open(part, WALK_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_union_parent(union_root: Path, parts: list[str], replace: bool, dir_mode: int) -> int:
    """Return a descriptor of the directory ``parts`` below the union dir, creating it."""
    union_fd = open_root(union_root)
    try:
        return _union_parent(union_fd, parts, create=True, replace=replace, dir_mode=dir_mode)
    finally:
        os.close(union_fd)


def place(dir_fd: int, temp: str, name: str) -> None:
    """Atomically move ``temp`` onto ``name`` in ``dir_fd``.

    A directory at ``name`` is removed first (a type change); a symlink or file is replaced
    by the rename itself, which never touches a symlink's target.
    """
    try:
        st = lstat_at(dir_fd, name)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


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
    parent_fd = open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        name = parts[-1]
        try:
            st = lstat_at(parent_fd, name)
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
    parent_fd = open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        temp, _ = create_temp(parent_fd, lambda temp: os.symlink(target, temp, dir_fd=parent_fd))
        try:
            if mtime_ns is not None:
                os.utime(temp, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            place(parent_fd, temp, parts[-1])
        except BaseException:
            unlink_quietly(parent_fd, temp)
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
    union_fd = open_root(union_root)
    try:
        try:
            parent_fd = _union_parent(union_fd, parts[:-1], create=False, replace=False, dir_mode=0)
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in NOT_A_DIR_ERRNOS:
                return False
            raise
    finally:
        os.close(union_fd)
    try:
        return _remove_at(parent_fd, parts[-1])
    finally:
        os.close(parent_fd)


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
    parent_fd = open_union_parent(union_root, parts[:-1], replace, dir_mode)
    try:
        temp, fd = create_temp(
            parent_fd, lambda name: os.open(name, TEMP_FLAGS, 0o600, dir_fd=parent_fd)
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
                unlink_quietly(parent_fd, temp)
                return False
            place(parent_fd, temp, parts[-1])
        except BaseException:
            unlink_quietly(parent_fd, temp)
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
        self._root_fd = open_root(union_root)
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
            fd = os.open(name, TEMP_FLAGS, 0o600, dir_fd=parent)
            temp = ""
        except FileExistsError:
            temp, fd = create_temp(parent, lambda t: os.open(t, TEMP_FLAGS, 0o600, dir_fd=parent))
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
                place(parent, temp, name)
        except BaseException:
            unlink_quietly(parent, temp or name)
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
