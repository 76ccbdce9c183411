"""The published tree: catalog entries and revisions as stored, tag rows, the client view.

The client view (``iter_file_content``) reads a file's content as a CVMFS client would:
every object verified against its name and inflated, ``OSError(EIO)`` where a client
fails.
"""

from __future__ import annotations

import errno
import json
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tests.fake_cvmfs.server.storage import inflate_complete, is_null_hash, verify_object_bytes

if TYPE_CHECKING:
    from tests.fake_cvmfs.server.repository import Repo


CATALOG_FORMAT = "fake-cvmfs-catalog/1"

# entry kinds besides file, dir and symlink (only ``ingest`` publishes them)
DEVICE_KINDS = ("chardev", "blockdev")
SPECIAL_KINDS = ("fifo", "socket", *DEVICE_KINDS)


class CatalogEntry:
    """One path of a published revision, as the fake's catalog records it.

    ``kind`` is "dir", "file" or "symlink", or one of ``SPECIAL_KINDS`` (published by
    ``ingest``, m2_ingest 28-33); files carry the content reference: ``hash``
    (the whole-file object, None for chunked files without a bulk hash), ``compression``
    and ``chunks`` as (hash, offset, size) triples (objects stored with the ``P`` suffix);
    device nodes carry ``rdev`` (``os.makedev(major, minor)``).
    """

    __slots__ = (
        "chunks",
        "compression",
        "gid",
        "graft",
        "hash",
        "kind",
        "mode",
        "mtime",
        "rdev",
        "size",
        "target",
        "uid",
    )

    def __init__(
        self,
        kind: str,
        mode: int,
        size: int,
        mtime: int,
        uid: int = 0,
        gid: int = 0,
        *,
        target: str | None = None,
        hash: str | None = None,
        compression: str = "zlib",
        chunks: list[tuple[str, int, int]] | None = None,
        graft: bool = False,
        rdev: int = 0,
    ) -> None:
        self.kind = kind
        self.mode = mode
        self.size = size
        self.mtime = mtime
        self.uid = uid
        self.gid = gid
        self.target = target
        self.hash = hash
        self.compression = compression
        self.chunks = chunks if chunks is not None else []
        self.graft = graft
        self.rdev = rdev

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CatalogEntry):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def __repr__(self) -> str:
        return f"CatalogEntry({self.to_json()!r})"

    def to_json(self) -> dict[str, object]:
        """Encode for the catalog JSON."""
        out: dict[str, object] = {
            "type": self.kind,
            "mode": self.mode,
            "size": self.size,
            "mtime": self.mtime,
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.kind == "symlink":
            out["target"] = self.target
        if self.kind == "file":
            out["hash"] = self.hash
            out["compression"] = self.compression
            out["chunks"] = [list(chunk) for chunk in self.chunks]
            if self.graft:
                out["graft"] = True
        if self.kind in DEVICE_KINDS:
            out["rdev"] = self.rdev
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CatalogEntry:
        """Decode a catalog JSON entry."""
        return cls(
            kind=str(raw["type"]),
            mode=int(raw["mode"]),
            size=int(raw["size"]),
            mtime=int(raw["mtime"]),
            uid=int(raw.get("uid", 0)),
            gid=int(raw.get("gid", 0)),
            target=raw.get("target"),
            hash=raw.get("hash"),
            compression=str(raw.get("compression", "zlib")),
            chunks=[(str(c[0]), int(c[1]), int(c[2])) for c in raw.get("chunks", [])],
            graft=bool(raw.get("graft", False)),
            rdev=int(raw.get("rdev", 0)),
        )

    def objects(self) -> list[str]:
        """Storage object names this entry references (bulk object and chunk objects)."""
        names: list[str] = []
        if self.kind != "file":
            return names
        if self.hash is not None:
            names.append(self.hash)
        names.extend(chunk[0] + "P" for chunk in self.chunks)
        return names


class Catalog:
    """A whole revision: every path (``/`` is the root) with its entry."""

    def __init__(
        self, repository: str, revision: int, timestamp: int, entries: dict[str, CatalogEntry]
    ) -> None:
        self.repository = repository
        self.revision = revision
        self.timestamp = timestamp
        self.entries = entries

    def encode(self) -> bytes:
        """Serialise (uncompressed)."""
        body = {
            "format": CATALOG_FORMAT,
            "repository": self.repository,
            "revision": self.revision,
            "timestamp": self.timestamp,
            "entries": {path: self.entries[path].to_json() for path in sorted(self.entries)},
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Catalog:
        """Parse a serialised catalog."""
        body = json.loads(data)
        if body.get("format") != CATALOG_FORMAT:
            raise ValueError("not a fake catalog")
        entries = {str(k): CatalogEntry.from_json(v) for k, v in body["entries"].items()}
        return cls(str(body["repository"]), int(body["revision"]), int(body["timestamp"]), entries)


def _client_object(repo: Repo, name: str, compression: str, size: int | None) -> bytes:
    try:
        payload = repo.read_object(name)
    except OSError as exc:
        raise OSError(errno.EIO, f"object {name} cannot be fetched") from exc
    if not verify_object_bytes(name, payload):
        raise OSError(errno.EIO, f"object {name} does not match its hash")
    if compression == "zlib":
        try:
            data = inflate_complete(payload)
        except ValueError as exc:
            raise OSError(errno.EIO, f"object {name} is not a complete zlib stream") from exc
    else:
        data = payload
    if size is not None and len(data) != size:
        raise OSError(errno.EIO, f"object {name} has {len(data)} bytes instead of {size}")
    return data


def iter_file_content(repo: Repo, entry: CatalogEntry) -> Iterator[bytes]:
    """Yield a file's content as a client reads it; raise ``OSError(EIO)`` like the client.

    Every object is looked up under its name (chunks with ``P``), its bytes are verified
    against the hash in the name, and it is inflated as one complete zlib stream when the
    catalog says ``zlib``.
    """
    if entry.kind != "file":
        raise OSError(errno.EISDIR if entry.kind == "dir" else errno.EINVAL, "not a file")
    if entry.chunks:
        for chunk_hash, _offset, chunk_size in entry.chunks:
            yield _client_object(repo, chunk_hash + "P", entry.compression, chunk_size)
        return
    if entry.hash is None or is_null_hash(entry.hash):
        if entry.size == 0 and not entry.graft:
            return
        raise OSError(errno.EIO, "file has no content hash")
    yield _client_object(repo, entry.hash, entry.compression, entry.size)


def read_file_content(repo: Repo, entry: CatalogEntry) -> bytes:
    """Read a whole file through the client view."""
    return b"".join(iter_file_content(repo, entry))


def store_history(repo: Repo, tags: list[dict[str, Any]]) -> str:
    """Store a tag database object (suffix H) and return its name."""
    payload = zlib.compress(json.dumps({"tags": tags}, sort_keys=True).encode())
    return repo.store_object(payload, "H")


def store_catalog(repo: Repo, catalog: Catalog) -> tuple[str, int]:
    """Store a catalog object (suffix C); return (root hash without suffix, size)."""
    raw = catalog.encode()
    name = repo.store_object(zlib.compress(raw), "C")
    return name[:-1], len(raw)


def tag_row(name: str, revision: dict[str, Any], description: str) -> dict[str, Any]:
    """A tag database row for a revision record (as kept in ``revisions.json``)."""
    return {
        "name": name,
        "hash": revision["root_hash"],
        "size": revision["catalog_size"],
        "revision": revision["revision"],
        "timestamp": revision["timestamp"],
        "branch": "",
        "description": description,
    }


def revision_record(catalog: Catalog, root_hash: str, size: int) -> dict[str, Any]:
    """The revision index's record (``Repo.revisions``) of a stored catalog."""
    return {
        "revision": catalog.revision,
        "root_hash": root_hash,
        "timestamp": catalog.timestamp,
        "catalog_size": size,
    }
