"""The union directory: stat scans, the snapshot of the last publish or abort, and restoring it."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from tests.fake_cvmfs.server.catalog import Catalog, CatalogEntry, iter_file_content
from tests.fake_cvmfs.server.files import read_json, write_atomic
from tests.fake_cvmfs.server.repository import Repo

# kind, mode, size, mtime_ns, ino, ctime_ns, symlink target
StatInfo = tuple[str, int, int, int, int, int, str]

# the catalog's names of the special file types (``catalog.SPECIAL_KINDS``)
_SPECIAL_KINDS = {
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


def stat_info(st: os.stat_result, target: str) -> StatInfo:
    """The ``StatInfo`` of an ``lstat`` result (``target``: a symlink's target, else "")."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode), "other")
    return (kind, mode & 0o7777, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, target)


def scan_tree(top: Path) -> dict[str, StatInfo]:
    """Map every path below ``top`` (``/`` for ``top`` itself) to its stat information."""
    result: dict[str, StatInfo] = {}
    try:
        result["/"] = stat_info(top.lstat(), "")
    except FileNotFoundError:
        return result
    pending: list[tuple[str, str]] = [(str(top), "")]
    is_reg = stat.S_ISREG
    while pending:
        directory, rel = pending.pop()
        try:
            iterator = os.scandir(directory)
        except OSError:
            continue
        with iterator:
            for item in iterator:
                path = f"{rel}/{item.name}"
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mode = st.st_mode
                if is_reg(mode):
                    # the common case, without a call per entry
                    result[path] = (
                        "file",
                        mode & 0o7777,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ino,
                        st.st_ctime_ns,
                        "",
                    )
                    continue
                target = ""
                if stat.S_ISLNK(mode):
                    with contextlib.suppress(OSError):
                        target = str(Path(item.path).readlink())
                info = stat_info(st, target)
                result[path] = info
                if info[0] == "dir":
                    pending.append((item.path, path))
    return result


def snapshot_key(info: StatInfo) -> tuple[object, ...]:
    """The part of the stat information whose change counts as a modification."""
    kind = info[0]
    if kind == "dir":
        return (kind, info[1])
    if kind == "symlink":
        return (kind, info[6])
    return info[:6]


def load_snapshot(repo: Repo) -> dict[str, StatInfo]:
    """The union directory's stat snapshot taken after the last publish/abort/restore."""
    raw = read_json(repo.state_dir / "snapshot.json", {})
    if not isinstance(raw, dict):
        return {}
    return {
        str(k): (str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), str(v[6]))
        for k, v in raw.items()
    }


def save_snapshot(repo: Repo, snap: dict[str, StatInfo]) -> None:
    """Persist a union snapshot."""
    write_atomic(repo.state_dir / "snapshot.json", json.dumps(snap, separators=(",", ":")).encode())


def diff_tree(snap: dict[str, StatInfo], current: dict[str, StatInfo]) -> list[str]:
    """Describe the differences between a snapshot and the current union tree."""
    changes: list[str] = []
    for path in sorted(set(snap) | set(current)):
        before = snap.get(path)
        after = current.get(path)
        if before is None:
            changes.append(f"added {path}")
        elif after is None:
            changes.append(f"removed {path}")
        elif snapshot_key(before) != snapshot_key(after):
            changes.append(f"modified {path}")
    return changes


_DEVICE_TYPES = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def materialise(repo: Repo, dest: Path, entry: CatalogEntry) -> None:
    """Create ``dest`` as ``entry`` shows it; file content comes through the client view
    (left empty where a client could not read it).

    Raise OSError where the union cannot show the entry (a name longer than the file
    system allows, a device node without the privilege to make one); a socket is not
    made at all."""
    if entry.kind == "dir":
        dest.mkdir(exist_ok=True)
        dest.chmod(entry.mode)
        return
    if entry.kind == "symlink":
        dest.symlink_to(entry.target or "")
        return
    if entry.kind == "socket":
        return
    if entry.kind == "fifo" or entry.kind in _DEVICE_TYPES:
        if entry.kind == "fifo":
            os.mkfifo(dest, 0o600)
        else:
            os.mknod(dest, 0o600 | _DEVICE_TYPES[entry.kind], entry.rdev)
        dest.chmod(entry.mode)
        os.utime(dest, (entry.mtime, entry.mtime))
        return
    tmp = dest.with_name(f".{dest.name}.fake-restore")
    with tmp.open("wb") as handle:
        try:
            for piece in iter_file_content(repo, entry):
                handle.write(piece)
        except OSError:
            handle.seek(0)
            handle.truncate()
    tmp.chmod(entry.mode)
    tmp.replace(dest)
    os.utime(dest, (entry.mtime, entry.mtime))


def sync_union(repo: Repo, catalog: Catalog, snap: dict[str, StatInfo]) -> list[str]:
    """Make the union directory show ``catalog`` again; return the paths it had to fix.

    Entries whose stat information still matches ``snap`` are kept; everything else is
    removed or rewritten from the storage through the client view (unreadable files are
    left empty; entries the union cannot show are left out).
    """
    union = repo.union
    union.mkdir(parents=True, exist_ok=True)
    current = scan_tree(union)
    fixed: list[str] = []
    for path in sorted(current, reverse=True):
        if path == "/":
            continue
        info = current[path]
        entry = catalog.entries.get(path)
        keep = entry is not None and entry.kind == info[0]
        if keep and info[0] != "dir":
            before = snap.get(path)
            keep = before is not None and snapshot_key(before) == snapshot_key(info)
        if not keep:
            _remove_path(union / path[1:])
            fixed.append(path)
            del current[path]
    for path in sorted(catalog.entries):
        entry = catalog.entries[path]
        dest = union if path == "/" else union / path[1:]
        present = current.get(path)
        if present is None:
            try:
                materialise(repo, dest, entry)
            except OSError:
                continue
            fixed.append(path)
        elif entry.kind == "dir" and present[1] != entry.mode:
            dest.chmod(entry.mode)
    for path in sorted((p for p, e in catalog.entries.items() if e.kind == "dir"), reverse=True):
        dest = union if path == "/" else union / path[1:]
        entry = catalog.entries[path]
        with contextlib.suppress(OSError):
            os.utime(dest, (entry.mtime, entry.mtime))
    return sorted(set(fixed))
