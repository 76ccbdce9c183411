"""One repository below ROOT (``Repo``): paths, ``server.conf``, storage and bookkeeping.

``Repo`` knows where everything of a repository lives (configuration, keys, union, spool,
the storage's data dir), stores and reads its objects and signed files, and keeps the
fake's own records of it below ``state_dir`` (mount state, revision index). The functions
after it write the whitelist and the reflog.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Any

from tests.fake_cvmfs.server.catalog import Catalog
from tests.fake_cvmfs.server.clock import utc
from tests.fake_cvmfs.server.files import read_json, write_atomic, write_json
from tests.fake_cvmfs.server.storage import (
    ALGORITHMS,
    Manifest,
    Whitelist,
    algorithm_suffix,
    hash_hex,
    object_path,
    signed_file,
)

REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_conf(text: str) -> dict[str, str]:
    """Parse a ``KEY=value`` shell-style configuration file."""
    conf: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        conf[key.strip()] = value
    return conf


class Repo:
    """Paths and configuration of one repository below a fake ROOT."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self._conf: dict[str, str] | None = None
        self._data_dir: str | None = None
        self._staging_dir: str | None = None

    # -- locations ------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        """``ROOT/etc/cvmfs``."""
        return self.root / "etc" / "cvmfs"

    @property
    def repo_conf_dir(self) -> Path:
        """``ROOT/etc/cvmfs/repositories.d/<repo>``."""
        return self.config_dir / "repositories.d" / self.name

    @property
    def server_conf(self) -> Path:
        """The repository's ``server.conf``."""
        return self.repo_conf_dir / "server.conf"

    def key(self, ext: str) -> Path:
        """A key file: ``ext`` is one of key, crt, pub, masterkey."""
        return self.config_dir / "keys" / f"{self.name}.{ext}"

    @property
    def union(self) -> Path:
        """The union directory (``CVMFS_UNION_DIR``)."""
        return Path(self.conf.get("CVMFS_UNION_DIR", str(self.root / "cvmfs" / self.name)))

    @property
    def spool(self) -> Path:
        """The spool directory (``CVMFS_SPOOL_DIR``)."""
        default = self.root / "var" / "spool" / "cvmfs" / self.name
        return Path(self.conf.get("CVMFS_SPOOL_DIR", str(default)))

    @property
    def state_dir(self) -> Path:
        """The fake's own bookkeeping for this repository (not part of CVMFS)."""
        return self.root / "fake" / "repos" / self.name

    @property
    def is_s3(self) -> bool:
        """Whether the upstream storage is of type S3."""
        return self.conf.get("CVMFS_UPSTREAM_STORAGE", "").startswith("S3,")

    @property
    def is_gateway(self) -> bool:
        """Whether this host publishes through a repository gateway (upstream type gw)."""
        return self.conf.get("CVMFS_UPSTREAM_STORAGE", "").startswith("gw,")

    @property
    def storage(self) -> Path:
        """The storage directory (for S3: a local directory standing in for the bucket; for a
        gateway publisher: the receiver's, ``TEST_CVMFS_RECEIVER_UPSTREAM_STORAGE``)."""
        upstream = self.conf.get("CVMFS_UPSTREAM_STORAGE", "")
        if upstream.startswith("gw,"):
            upstream = self.conf.get("TEST_CVMFS_RECEIVER_UPSTREAM_STORAGE", "")
        parts = upstream.split(",")
        if upstream.startswith("S3,") and len(parts) >= 3:
            s3conf = parts[2].partition("@")[2]
            bucket = "bucket"
            with contextlib.suppress(OSError):
                bucket = parse_conf(Path(s3conf).read_text()).get("CVMFS_S3_BUCKET", bucket)
            return self.root / "s3" / bucket / self.name
        if len(parts) >= 3:
            return Path(parts[2])
        # without a configuration (e.g. after rmfs) an S3 stand-in bucket outlives it
        for leftover in sorted((self.root / "s3").glob(f"*/{self.name}")):
            return leftover
        return self.root / "srv" / "cvmfs" / self.name

    @property
    def data(self) -> Path:
        """The storage's ``data`` directory."""
        return self.storage / "data"

    @property
    def stratum0(self) -> str:
        """``CVMFS_STRATUM0``."""
        return self.conf.get("CVMFS_STRATUM0", "")

    # -- configuration --------------------------------------------------------------
    def reload_conf(self) -> None:
        """Forget the parsed server.conf and the locations derived from it."""
        self._conf = None
        self._data_dir = None
        self._staging_dir = None

    def exists(self) -> bool:
        """Whether the repository has been created (its server.conf exists)."""
        return bool(REPO_NAME_RE.match(self.name)) and self.server_conf.is_file()

    @property
    def conf(self) -> dict[str, str]:
        """The parsed server.conf (empty when missing)."""
        if self._conf is None:
            try:
                self._conf = parse_conf(self.server_conf.read_text())
            except (FileNotFoundError, NotADirectoryError):
                self._conf = {}
        return self._conf

    def flag(self, key: str, default: bool = False) -> bool:
        """A boolean server.conf setting."""
        value = self.conf.get(key)
        if value is None:
            return default
        return value.lower() in ("true", "yes", "1")

    @property
    def hash_algorithm(self) -> str:
        """``CVMFS_HASH_ALGORITHM`` (sha1 by default)."""
        value = self.conf.get("CVMFS_HASH_ALGORITHM", "sha1")
        return value if value in ALGORITHMS else "sha1"

    @property
    def compression(self) -> str:
        """Effective compression of published files: zlib (default) or none."""
        value = self.conf.get("CVMFS_COMPRESSION_ALGORITHM", "default")
        return "none" if value == "none" else "zlib"

    # -- storage objects ------------------------------------------------------------
    def object_file(self, name: str) -> Path:
        """Path of a storage object."""
        return object_path(self.data, name)

    def data_dir(self) -> str:
        """The storage's ``data`` directory as a string (cached: object paths are hot)."""
        if self._data_dir is None:
            self._data_dir = str(self.data)
        return self._data_dir

    def store_object(self, payload: bytes, suffix: str = "") -> str:
        """Store ``payload`` content-addressed (via ``data/txn``) and return its name.

        This is the hot path of a publish with thousands of files, so it works on plain
        strings and ``os`` calls instead of ``pathlib``.
        """
        algorithm = self.hash_algorithm
        name = hash_hex(algorithm, payload) + algorithm_suffix(algorithm) + suffix
        if self._staging_dir is None:
            staging = self.spool / "tmp" if self.is_s3 else self.data / "txn"
            staging.mkdir(parents=True, exist_ok=True)
            self._staging_dir = str(staging)
        target = f"{self.data_dir()}/{name[:2]}/{name[2:]}"
        try:
            if os.stat(target).st_mode & stat.S_IROTH:
                return name
        except FileNotFoundError:
            pass
        # written anew (the real local uploader replaces what it uploads): an object left
        # unreadable by a publish under a restrictive umask gets this process's mode
        tmp = f"{self._staging_dir}/{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        return name

    def read_object(self, name: str) -> bytes:
        """Read a storage object's bytes as stored."""
        with open(f"{self.data_dir()}/{name[:2]}/{name[2:]}", "rb") as handle:
            return handle.read()

    def load_json_object(self, name: str) -> Any:
        """Read a zlib-compressed JSON object (catalog, history, meta-info)."""
        return json.loads(zlib.decompress(self.read_object(name)))

    # -- signed files -----------------------------------------------------------------
    def manifest(self) -> Manifest:
        """The published manifest."""
        return Manifest.parse((self.storage / ".cvmfspublished").read_bytes())

    def write_manifest(self, manifest: Manifest) -> None:
        """Sign and write ``.cvmfspublished``."""
        write_atomic(
            self.storage / ".cvmfspublished", signed_file(manifest.text(), self.key("key"))
        )

    def whitelist(self) -> Whitelist:
        """The current whitelist."""
        return Whitelist.parse((self.storage / ".cvmfswhitelist").read_bytes())

    def catalog(self, root_hash: str) -> Catalog:
        """Load the catalog of a root hash (raise FileNotFoundError when swept/missing)."""
        return Catalog.decode(zlib.decompress(self.read_object(root_hash + "C")))

    # -- fake bookkeeping ---------------------------------------------------------------
    def mount_state(self) -> dict[str, Any]:
        """Mount state: union_mounted, union_rw, rdonly_mounted."""
        state = read_json(self.state_dir / "mount.json", None)
        if not isinstance(state, dict):
            return {"union_mounted": True, "union_rw": False, "rdonly_mounted": True}
        return state

    def set_mount_state(self, **changes: bool) -> None:
        """Update the recorded mount state and the spool's ``cvmfs_io`` socket stand-in."""
        state = self.mount_state()
        state.update(changes)
        write_json(self.state_dir / "mount.json", state)
        io_file = self.spool / "cvmfs_io"
        if state["rdonly_mounted"] or state["union_mounted"]:
            if not io_file.exists():
                io_file.write_bytes(b"")
        else:
            io_file.unlink(missing_ok=True)

    def receiver(self) -> Repo:
        """The repository on the host whose storage this one publishes to: for a gateway
        publisher the gateway's host (its ROOT in ``gateway.json``), else itself."""
        link = read_json(self.state_dir / "gateway.json", None)
        root = link.get("receiver_root") if isinstance(link, dict) else None
        if not root or Path(str(root)) == self.root:
            return self
        return Repo(Path(str(root)), self.name)

    def mounted(self) -> tuple[int, str] | None:
        """(revision, root hash) the rdonly mount shows, when it is not simply the published
        one: a gateway publisher keeps its revision until it remounts (``mounted.json``)."""
        value = read_json(self.state_dir / "mounted.json", None)
        if not isinstance(value, dict):
            return None
        return int(value["revision"]), str(value["root_hash"])

    def set_mounted(self, revision: int, root_hash: str) -> None:
        """Record the revision the rdonly mount shows (gateway publishers)."""
        write_json(self.state_dir / "mounted.json", {"revision": revision, "root_hash": root_hash})

    def mounted_root_hash(self) -> str:
        """Root hash of the revision the union directory shows when no transaction is open."""
        mounted = self.mounted()
        return mounted[1] if mounted is not None else self.manifest().root_hash

    def revisions(self) -> list[dict[str, Any]]:
        """Every revision ever published: revision, root_hash, timestamp, catalog_size
        (kept by the host that writes the storage)."""
        owner = self.receiver()
        value = read_json(owner.state_dir / "revisions.json", [])
        return value if isinstance(value, list) else []

    def add_revision(self, catalog: Catalog, root_hash: str, size: int) -> None:
        """Record a new revision in the fake's revision index."""
        revs = [r for r in self.revisions() if r["revision"] != catalog.revision]
        revs.append(
            {
                "revision": catalog.revision,
                "root_hash": root_hash,
                "timestamp": catalog.timestamp,
                "catalog_size": size,
            }
        )
        revs.sort(key=lambda r: int(r["revision"]))
        write_json(self.receiver().state_dir / "revisions.json", revs)

    def in_transaction(self) -> bool:
        """Whether ``in_transaction.lock`` exists."""
        return (self.spool / "in_transaction.lock").exists()

    def tags(self) -> list[dict[str, Any]]:
        """The tag database referenced by the manifest (insertion order)."""
        raw = self.load_json_object(self.manifest().history)
        tags = raw.get("tags", []) if isinstance(raw, dict) else []
        return [t for t in tags if isinstance(t, dict)]

    def reflog(self) -> dict[str, Any]:
        """The parsed ``.cvmfsreflog``."""
        value = read_json(self.storage / ".cvmfsreflog", {"fqrn": self.name, "refs": []})
        return value if isinstance(value, dict) else {"fqrn": self.name, "refs": []}


def list_repositories(root: Path) -> list[str]:
    """Names of the repositories configured below ROOT, sorted."""
    base = root / "etc" / "cvmfs" / "repositories.d"
    try:
        return sorted(p.name for p in base.iterdir() if (p / "server.conf").is_file())
    except FileNotFoundError:
        return []


def fingerprint(repo: Repo) -> str:
    """SHA-1 fingerprint of the repository certificate, as listed in the whitelist."""
    digest = hashlib.sha1(repo.key("crt").read_bytes(), usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 40, 2)).upper()


def write_whitelist(repo: Repo, now: float, days: str) -> None:
    """Sign a whitelist valid for ``days`` days (a non-number gives an empty E line)."""
    created = utc("%Y%m%d%H%M%S", now)
    expires = utc("%Y%m%d%H%M%S", now + int(days) * 86400) if days.isdigit() else ""
    whitelist = Whitelist(created, expires, repo.name, [fingerprint(repo)])
    write_atomic(
        repo.storage / ".cvmfswhitelist", signed_file(whitelist.text(), repo.key("masterkey"))
    )


def record_refs(
    repo: Repo, refs: list[tuple[str, int]], when: float, drop: set[str] | None = None
) -> str:
    """Add object references to ``.cvmfsreflog`` (dropping ``drop``); return its hash."""
    reflog = repo.reflog()
    entries = [r for r in reflog.get("refs", []) if not drop or r[0] not in drop]
    known = {r[0] for r in entries}
    for name, kind in refs:
        if name not in known:
            entries.append([name, kind, int(when)])
            known.add(name)
    reflog["refs"] = entries
    reflog["fqrn"] = repo.name
    data = json.dumps(reflog, sort_keys=True).encode()
    write_atomic(repo.storage / ".cvmfsreflog", data)
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    (repo.spool / "reflog.chksum").write_text(digest)
    return digest
