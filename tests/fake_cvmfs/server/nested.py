"""Nested catalogs, read from ``.cvmfscatalog`` markers, and the catalogs' SQLite row ids.

The fake stores one catalog object per revision; as in CVMFS, a directory holding a
regular file ``.cvmfscatalog`` is the mountpoint of a nested catalog, which owns the
entries below it (down to the next mountpoint). ``check`` and ``list-catalogs`` list the
catalogs with a hash derived from the entries each one owns (no object is stored for it).

``RowIds`` models the one SQLite detail the recordings show: a catalog is defragmented
when more than a quarter of its row ids are unused (``1 - rows / max(rowid)`` above 0.25,
m2_ingest 8: 37.50 %), and VACUUM numbers its rows 1..n again. New rows take
``max(rowid) + 1``; an updated file is deleted and inserted again; directories updated in
place keep theirs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from tests.fake_cvmfs.server.catalog import Catalog, CatalogEntry
from tests.fake_cvmfs.server.files import read_json, write_json
from tests.fake_cvmfs.server.repository import Repo

MARKER = ".cvmfscatalog"
# VacuumDatabaseIfNecessary: more than this share of unused row ids → defragment
MAX_ROW_ID_WASTE = 0.25


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _sort_key(path: str) -> tuple[str, ...]:
    """Depth-first order: a directory, then what is below it, then its next sibling."""
    return tuple(path.split("/")[1:]) if path != "/" else ()


def _numbered(paths: list[str]) -> dict[str, int]:
    return {path: index + 1 for index, path in enumerate(paths)}


def mountpoints(entries: Mapping[str, CatalogEntry]) -> list[str]:
    """``/`` and every directory holding a regular ``.cvmfscatalog``, depth first."""
    found = ["/"]
    for path, entry in entries.items():
        parent, _, name = path.rpartition("/")
        if name == MARKER and entry.kind == "file" and parent:
            holder = entries.get(parent)
            if holder is not None and holder.kind == "dir":
                found.append(parent)
    return sorted(found, key=_sort_key)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def owner(path: str, mounts: set[str]) -> str:
    """The catalog that holds ``path`` (a mountpoint is its own catalog's root)."""
    current = path
    while current != "/":
        if current in mounts:
            return current
        current = _parent(current)
    return "/"


def partition(entries: Mapping[str, CatalogEntry], mounts: list[str]) -> dict[str, list[str]]:
    """The paths each catalog owns (a nested mountpoint belongs to its own catalog)."""
    known = set(mounts)
    owned: dict[str, list[str]] = {mount: [] for mount in mounts}
    for path in entries:
        owned[owner(path, known)].append(path)
    return owned


def catalog_tree(catalog: Catalog) -> list[tuple[int, str, str]]:
    """Every catalog of a revision, depth first: (nesting level, mountpoint, hash).

    The root catalog's hash is not known here; it is reported as ``""``.
    """
    mounts = mountpoints(catalog.entries)
    owned = partition(catalog.entries, mounts)
    known = set(mounts)
    tree: list[tuple[int, str, str]] = []
    for mount in mounts:
        if mount == "/":
            tree.append((0, "/", ""))
            continue
        level = 1
        current = _parent(mount)
        while current != "/":
            level += current in known
            current = _parent(current)
        body = {path: catalog.entries[path].to_json() for path in sorted(owned[mount])}
        text = json.dumps({"mountpoint": mount, "entries": body}, sort_keys=True)
        digest = hashlib.sha1(text.encode(errors="surrogateescape"), usedforsecurity=False)
        tree.append((level, mount, digest.hexdigest()))
    return tree


class RowIds:
    """Row ids of every catalog's rows (path → rowid per mountpoint), see the module doc.

    Changes are recorded against the catalogs as they were (``add``, ``remove``);
    ``finish`` then moves rows into catalogs created or merges those removed, and returns
    the catalogs to defragment.
    """

    def __init__(self, catalogs: dict[str, dict[str, int]]) -> None:
        self.catalogs = catalogs
        self.mounts = set(catalogs)
        self._max: dict[str, int | None] = dict.fromkeys(catalogs)
        self._touched: set[str] = set()

    @classmethod
    def fresh(cls, entries: Mapping[str, CatalogEntry]) -> RowIds:
        """Row ids as after a VACUUM: each catalog's rows numbered in path order (a nested
        mountpoint has a row in its parent catalog too)."""
        mounts = mountpoints(entries)
        owned = partition(entries, mounts)
        known = set(mounts)
        for mount in mounts[1:]:
            owned[owner(_parent(mount), known)].append(mount)
        return cls({mount: _numbered(sorted(owned[mount], key=_sort_key)) for mount in mounts})

    @classmethod
    def load(cls, repo: Repo, root_hash: str, entries: Mapping[str, CatalogEntry]) -> RowIds:
        """The row ids recorded for ``root_hash`` (by the last ``ingest``), else fresh."""
        raw = read_json(repo.state_dir / "rowids.json", {})
        if isinstance(raw, dict) and raw.get("root_hash") == root_hash:
            stored = raw.get("catalogs")
            if isinstance(stored, dict):
                return cls(
                    {
                        str(m): {str(p): int(r) for p, r in rows.items()}
                        for m, rows in stored.items()
                    }
                )
        return cls.fresh(entries)

    def save(self, repo: Repo, root_hash: str) -> None:
        """Record the row ids of the revision ``root_hash``."""
        state = {"root_hash": root_hash, "catalogs": self.catalogs}
        write_json(repo.state_dir / "rowids.json", state)

    def _owners(self, path: str) -> list[str]:
        mount = owner(path, self.mounts)
        if mount == path and path != "/":
            return [mount, owner(_parent(path), self.mounts)]
        return [mount]

    def _top(self, mount: str) -> int:
        top = self._max.get(mount)
        if top is None:
            top = max(self.catalogs[mount].values(), default=0)
            self._max[mount] = top
        return top

    def add(self, path: str) -> None:
        """A row inserted for ``path``."""
        for mount in self._owners(path):
            top = self._top(mount) + 1
            self.catalogs[mount][path] = top
            self._max[mount] = top
            self._touched.add(mount)

    def remove(self, path: str) -> None:
        """The row of ``path`` deleted."""
        for mount in self._owners(path):
            rowid = self.catalogs[mount].pop(path, None)
            if rowid is not None and rowid == self._max.get(mount):
                self._max[mount] = None
            self._touched.add(mount)

    def finish(self, entries: Mapping[str, CatalogEntry]) -> list[tuple[str, float]]:
        """Apply the catalogs created and removed; return (mountpoint, unused share) of the
        changed catalogs to defragment, deepest first, and number their rows anew."""
        final = set(mountpoints(entries))
        for mount in sorted(self.mounts - final, key=_depth):
            rows = self.catalogs.pop(mount)
            self.mounts.discard(mount)
            parent = owner(_parent(mount), self.mounts)
            for path in sorted(rows, key=_sort_key):
                if path != mount and path not in self.catalogs[parent]:
                    self._max[parent] = self._top(parent) + 1
                    self.catalogs[parent][path] = self._top(parent)
            self._touched.add(parent)
        for mount in sorted(final - self.mounts, key=_depth):
            parent = owner(_parent(mount), self.mounts)
            prefix = mount + "/"
            moved = [p for p in self.catalogs[parent] if p.startswith(prefix)]
            for path in moved:
                del self.catalogs[parent][path]
            self._max[parent] = None
            self._touched.add(parent)
            paths = sorted([mount, *moved], key=_sort_key)
            self.catalogs[mount] = _numbered(paths)
            self._max[mount] = len(paths)
            self.mounts.add(mount)
        notes: list[tuple[str, float]] = []
        for mount in sorted(self._touched & self.mounts, key=lambda m: (-_depth(m), m)):
            rows = self.catalogs[mount]
            top = self._top(mount)
            if not rows or not top:
                continue
            waste = 1 - len(rows) / top
            if waste > MAX_ROW_ID_WASTE:
                notes.append((mount, waste))
                self.catalogs[mount] = _numbered(sorted(rows, key=rows.__getitem__))
                self._max[mount] = len(rows)
        return notes
