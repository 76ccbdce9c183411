"""A repository's own CVMFS configuration and state, read from files (never from constants).

Everything here reads: ``server.conf`` under ``<config_dir>/repositories.d/<repo>/``, the
spool's lock files, and the signed ``.cvmfspublished`` / ``.cvmfswhitelist`` from the
repository's storage (a local directory, or HTTP for S3-backed repositories).
"""

from __future__ import annotations

import calendar
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cvmfs_syncd.cvmfs.gateway import gateway_url
from cvmfs_syncd.errors import RepositoryConfigError

_HTTP_TIMEOUT = 10.0


def parse_shell_assignments(text: str) -> dict[str, str]:
    """Given ``KEY=VALUE`` lines as cvmfs writes them, return the mapping (quotes removed)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


@dataclass(frozen=True)
class RepositoryLayout:
    """Where a repository lives on this host, as its server.conf says."""

    name: str
    union_dir: Path
    spool_dir: Path
    stratum0: str
    upstream_storage: str
    settings: dict[str, str]

    @property
    def storage_type(self) -> str:
        """``local`` or ``S3`` (the first field of CVMFS_UPSTREAM_STORAGE)."""
        return self.upstream_storage.split(",", 1)[0]

    @property
    def gateway_url(self) -> str | None:
        """The gateway's API URL when this host publishes through a repository gateway."""
        return gateway_url(self.upstream_storage)

    @property
    def local_storage(self) -> Path | None:
        """The storage directory of a local repository, or None for S3."""
        parts = self.upstream_storage.split(",")
        if parts[0] == "local" and len(parts) >= 3:
            return Path(parts[2])
        return None

    def flag(self, key: str, default: bool = False) -> bool:
        """Return a boolean setting (``true``/``yes``/``1``) of server.conf."""
        value = self.settings.get(key)
        if value is None or value == "":
            return default
        return value.lower() in ("true", "yes", "1", "on")

    @property
    def in_transaction_lock(self) -> Path:
        """The lock file that exists while a transaction (or gc) is open."""
        return self.spool_dir / "in_transaction.lock"

    def in_transaction(self) -> bool:
        """Return True if the spool says a transaction (ours, an operator's, gc's) is open."""
        return self.in_transaction_lock.exists()

    def is_collecting(self) -> bool:
        """Return True while ``cvmfs_server gc`` runs (it holds its own transaction)."""
        return (self.spool_dir / "is_collecting.lock").exists()

    def is_publishing(self) -> bool:
        """Return True while ``cvmfs_server publish`` runs."""
        return (self.spool_dir / "is_publishing.lock").exists()

    def read_storage_file(self, name: str) -> bytes:
        """Return a top-level storage file (``.cvmfspublished``, ``.cvmfswhitelist``).

        Raise RepositoryConfigError if it cannot be read.
        """
        local = self.local_storage
        try:
            if local is not None:
                return (local / name).read_bytes()
            url = f"{self.stratum0.rstrip('/')}/{name}"
            if not url.startswith(("http://", "https://", "file://")):
                raise RepositoryConfigError(f"{self.name}: cannot read {name} from {url!r}")
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT) as response:  # noqa: S310 (scheme checked above)
                data: bytes = response.read()
                return data
        except OSError as exc:
            raise RepositoryConfigError(f"{self.name}: cannot read {name}: {exc}") from exc

    def manifest(self) -> Manifest:
        """Return the published manifest; raise RepositoryConfigError."""
        return Manifest.parse(self.read_storage_file(".cvmfspublished"))

    def whitelist(self) -> Whitelist:
        """Return the whitelist; raise RepositoryConfigError."""
        return Whitelist.parse(self.read_storage_file(".cvmfswhitelist"))


def load_layout(config_dir: Path, name: str) -> RepositoryLayout:
    """Read ``<config_dir>/repositories.d/<name>/server.conf``; raise RepositoryConfigError."""
    path = config_dir / "repositories.d" / name / "server.conf"
    try:
        settings = parse_shell_assignments(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryConfigError(
            f"repository {name}: {path} does not exist (is it created on this host?)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryConfigError(f"repository {name}: cannot read {path}: {exc}") from None
    missing = [
        k
        for k in ("CVMFS_UNION_DIR", "CVMFS_SPOOL_DIR", "CVMFS_UPSTREAM_STORAGE")
        if not settings.get(k)
    ]
    if missing:
        raise RepositoryConfigError(f"repository {name}: {path} lacks {', '.join(missing)}")
    return RepositoryLayout(
        name=name,
        union_dir=Path(settings["CVMFS_UNION_DIR"]),
        spool_dir=Path(settings["CVMFS_SPOOL_DIR"]),
        stratum0=settings.get("CVMFS_STRATUM0", ""),
        upstream_storage=settings["CVMFS_UPSTREAM_STORAGE"],
        settings=settings,
    )


def _text_part(data: bytes) -> list[str]:
    head, _, _ = data.partition(b"\n--\n")
    return head.decode("utf-8", "replace").splitlines()


def _utc_stamp(value: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(value, "%Y%m%d%H%M%S")))
    except ValueError:
        return None


@dataclass(frozen=True)
class Manifest:
    """The fields of ``.cvmfspublished`` the daemon uses."""

    revision: int
    root_hash: str
    published_at: float
    fields: dict[str, str]

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse a signed manifest; raise RepositoryConfigError if it has no revision."""
        fields = {line[0]: line[1:] for line in _text_part(data) if line}
        try:
            revision = int(fields["S"])
        except (KeyError, ValueError):
            raise RepositoryConfigError("manifest has no revision (S) line") from None
        published = float(fields["T"]) if fields.get("T", "").isdigit() else 0.0
        return cls(revision, fields.get("C", ""), published, fields)


@dataclass(frozen=True)
class Whitelist:
    """The fields of ``.cvmfswhitelist``: creation and expiry (UTC seconds)."""

    created_at: float | None
    expires_at: float | None
    name: str

    @classmethod
    def parse(cls, data: bytes) -> Whitelist:
        """Parse a whitelist; an unreadable E line gives ``expires_at`` None."""
        lines = _text_part(data)
        created = _utc_stamp(lines[0]) if lines else None
        expires: float | None = None
        name = ""
        seen: set[str] = set()
        for line in lines[1:]:
            # Only the first E and N lines count: the certificate fingerprints that follow
            # are hex pairs and may start with E too ("E3:EF:57:…").
            key = line[:1]
            if key in seen or key not in ("E", "N"):
                continue
            seen.add(key)
            if key == "E":
                expires = _utc_stamp(line[1:])
            else:
                name = line[1:]
        return cls(created, expires, name)
