"""The repository gateway as a publisher sees it: the upstream setting, the key, the lease API.

A publisher of a gateway repository has ``CVMFS_UPSTREAM_STORAGE=gw,<spool tmp>,<API URL>``
in its server.conf (the later assignment wins).  ``cvmfs_server transaction R/path`` takes a
lease on ``R/path`` through the gateway and keeps the lease's token in the spool's
``session_token`` file; publish and ``abort -f`` drop it.  When a daemon dies between the
grant and its bookkeeping, the lease stays at the gateway until it expires, so recovery drops
it itself: ``DELETE /api/v1/leases/<token>``, signed with the repository's gateway key
(``/etc/cvmfs/keys/<repo>.gw``: ``plain_text <key id> <secret>``).

The HTTP API (gateway.md, "API endpoints"): ``GET /api/v1/leases`` (no authentication) lists
every lease as ``{"data": {"<repo>/<path>": {"key_id", "path", "expires", "hostname"}}}``,
never with its token; a whole-repository lease has the key ``"<repo>/"``.  Requests that
change something carry ``Authorization: <key id> base64(hex(HMAC-SHA1(secret, body)))``, where
the body of a DELETE is the token.  Host names are not a publisher's identity (two hosts may
both be "vm"), so a lease is found by its path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cvmfs_syncd.errors import RepositoryConfigError

GATEWAY_STORAGE = "gw"
"""The storage type of a gateway publisher's ``CVMFS_UPSTREAM_STORAGE``."""

SESSION_TOKEN_FILE = "session_token"  # noqa: S105 (a file name, not a secret)
"""The file in a publisher's spool directory that holds the open lease's token."""

_HTTP_TIMEOUT = 10.0


class GatewayError(Exception):
    """The gateway could not be reached or answered something unexpected."""


def gateway_url(upstream_storage: str) -> str | None:
    """Return the API URL of a ``gw,<tmp>,<url>`` upstream, None for any other storage."""
    kind, _, rest = upstream_storage.partition(",")
    if kind != GATEWAY_STORAGE:
        return None
    _, _, url = rest.partition(",")
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RepositoryConfigError(
            f"gateway upstream storage has no API URL: {upstream_storage!r}"
        )
    return url


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A gateway key: its id and the shared secret."""

    key_id: str
    secret: str

    def __repr__(self) -> str:
        return f"GatewayKey(key_id={self.key_id!r}, secret=<redacted>)"

    def authorization(self, body: bytes) -> str:
        """The ``Authorization`` header value for a request with ``body``."""
        digest = hmac.new(self.secret.encode("utf-8"), body, hashlib.sha1).hexdigest()
        return f"{self.key_id} {base64.b64encode(digest.encode('ascii')).decode('ascii')}"


def load_key(path: Path) -> GatewayKey:
    """Read a gateway key file (``plain_text <key id> <secret>``); raise RepositoryConfigError."""
    try:
        words = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryConfigError(f"cannot read gateway key {path}: {exc}") from None
    if len(words) != 3 or words[0] != "plain_text":
        raise RepositoryConfigError(f"gateway key {path} is not 'plain_text <key id> <secret>'")
    return GatewayKey(words[1], words[2])


def parse_expires(text: str) -> float:
    """Seconds since the epoch of a lease's ``expires`` (``2026-12-03 12:38:43.592 +0000 UTC``)."""
    stamp = text.strip().removesuffix(" UTC")
    for fmt in ("%Y-%m-%d %H:%M:%S.%f %z", "%Y-%m-%d %H:%M:%S %z"):
        try:
            return datetime.strptime(stamp, fmt).timestamp()
        except ValueError:
            continue
    raise GatewayError(f"unreadable lease expiry {text!r}")


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease the gateway lists: on ``repo`` at ``path`` (``""`` for the whole repository)."""

    repo: str
    path: str
    key_id: str
    expires_at: float
    hostname: str

    def covers(self, path: str) -> bool:
        """Whether this lease conflicts with one on ``path``: one contains the other."""
        mine = self.path.strip("/")
        other = path.strip("/")
        return (
            not mine
            or not other
            or mine == other
            or other.startswith(mine + "/")
            or mine.startswith(other + "/")
        )


def parse_leases(payload: bytes) -> list[Lease]:
    """Read the body of ``GET /api/v1/leases``; raise GatewayError when it is not one."""
    try:
        document = json.loads(payload)
        data = document["data"] if document.get("status") == "ok" else None
    except (ValueError, AttributeError, KeyError, TypeError):
        data = None
    if not isinstance(data, dict):
        raise GatewayError(f"unexpected lease listing: {payload[:200]!r}")
    leases = []
    for key, item in data.items():
        repo, _, path = str(key).partition("/")
        if not isinstance(item, dict):
            raise GatewayError(f"unexpected lease entry for {key!r}: {item!r}")
        leases.append(
            Lease(
                repo=repo,
                path=path.strip("/"),
                key_id=str(item.get("key_id", "")),
                expires_at=parse_expires(str(item.get("expires", ""))),
                hostname=str(item.get("hostname", "")),
            )
        )
    return leases


class GatewayClient:
    """The few calls of the gateway's HTTP API a publisher needs."""

    def __init__(self, url: str, *, timeout: float = _HTTP_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise RepositoryConfigError(f"gateway URL must be http(s): {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def leases(self, repo: str | None = None) -> list[Lease]:
        """Every lease the gateway holds (of ``repo`` only, if given); raise GatewayError."""
        body = self._request("GET", "/leases")
        return [lease for lease in parse_leases(body) if repo is None or lease.repo == repo]

    def lease_on(self, repo: str, path: str) -> Lease | None:
        """The lease on exactly ``repo/path``, if the gateway lists one; raise GatewayError."""
        wanted = path.strip("/")
        for lease in self.leases(repo):
            if lease.path == wanted:
                return lease
        return None

    def drop(self, token: str, key: GatewayKey) -> bool:
        """Drop the lease with ``token``: True when the gateway dropped it, False when it
        knows no such lease (expired or dropped already); raise GatewayError otherwise."""
        if not token or "/" in token or not token.isprintable():
            raise GatewayError("invalid session token")
        body = self._request(
            "DELETE",
            f"/leases/{token}",
            headers={"Authorization": key.authorization(token.encode("utf-8"))},
            accept_error=True,
        )
        try:
            reply = json.loads(body)
        except ValueError:
            raise GatewayError(f"unexpected reply to a lease drop: {body[:200]!r}") from None
        if reply.get("status") == "ok":
            return True
        if "invalid" in str(reply.get("reason", "")) and "hmac" not in str(reply.get("reason")):
            return False
        raise GatewayError(f"gateway refused to drop the lease: {reply!r}")

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        accept_error: bool = False,
    ) -> bytes:
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked in __init__)
            self.url + path, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            if accept_error:
                return bytes(exc.read())
            raise GatewayError(f"{method} {self.url}{path}: HTTP {exc.code}") from None
        except (OSError, urllib.error.URLError) as exc:
            raise GatewayError(f"{method} {self.url}{path}: {exc}") from None


def read_session_token(spool_dir: Path) -> str | None:
    """The token of the lease the spool says this publisher holds, or None."""
    try:
        token = (spool_dir / SESSION_TOKEN_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayError(f"cannot read {spool_dir / SESSION_TOKEN_FILE}: {exc}") from None
    return token or None


def served_by_gateway_here(config_dir: Path, repo: str) -> bool:
    """Whether this host runs the repository gateway for ``repo``: its configuration
    (``<config_dir>/gateway/repo.json``, version 2: ``{"repos": [{"domain": …}]}``) lists it.
    An unreadable file counts as no."""
    try:
        document = json.loads((config_dir / "gateway" / "repo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    repos = document.get("repos", []) if isinstance(document, dict) else []
    return any(
        (entry.get("domain") if isinstance(entry, dict) else entry) == repo for entry in repos
    )
