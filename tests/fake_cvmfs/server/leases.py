"""The repository gateway itself: its configuration, its lease database and its HTTP API.

The gateway of a fake gateway repository lives on the host that holds the storage (the
first publisher, as in the recordings): ``ROOT/etc/cvmfs/gateway/repo.json`` (repositories,
key ids and secrets) and ``user.json`` (``max_lease_time``, ``port``, ``work_dir``), read at
every request. Its lease database is ``<work_dir>/leases.json`` (token -> lease, changed
under a flock); the real one is SQLite, and like it the file outlives a gateway restart.
The gateway's clock is ``<work_dir>/fake-clock`` (the format of ``ROOT/fake-clock``), so a
test can let leases expire without waiting.

``GatewayApi.handle`` answers one request of the recorded API subset (gateway.md, "API
endpoints"; the replies' JSON is compact and keeps the recorded key order); the test
harness (``tests/fake_cvmfs/gateway.py``) serves it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.fake_cvmfs.server.clock import fake_now
from tests.fake_cvmfs.server.files import flocked, read_json, write_json

WELCOME = "You are in an open field on the west side of a white house with a boarded front door."
MAX_API_VERSION = 3
INVALID_LEASE = "invalid lease"

Reply = tuple[int, bytes]


def go_time(timestamp: float) -> str:
    """A lease's ``expires``: Go's ``time.Time.String`` of a time kept to the millisecond
    (``2026-12-03 12:38:43.592 +0000 UTC``; trailing zeros of the fraction dropped)."""
    seconds, millis = divmod(round(timestamp * 1000), 1000)
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    fraction = f"{millis:03d}".rstrip("0")
    return f"{text}{'.' + fraction if fraction else ''} +0000 UTC"


def _decimal(value: int, unit: int) -> str:
    whole, part = divmod(value, unit)
    fraction = f"{part:0{len(str(unit)) - 1}d}".rstrip("0")
    return f"{whole}.{fraction}" if fraction else str(whole)


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String`` (``29.812980102s``, ``1m5.5s``, ``450ms``), as the
    gateway writes ``time_remaining``."""
    nanos = round(seconds * 1e9)
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos == 0:
        return "0s"
    if nanos < 1000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{_decimal(nanos, 1000)}µs"
    if nanos < 1_000_000_000:
        return f"{sign}{_decimal(nanos, 1_000_000)}ms"
    hours, rest = divmod(nanos, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = sign + (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{text}{_decimal(rest, 10**9)}s"


def lease_name(repository: str, path: str) -> str:
    """The listing's key of a lease: ``<repo>/<path>``, ``<repo>/`` for the whole repository."""
    return f"{repository}/{path.strip('/')}"


def paths_conflict(one: str, other: str) -> bool:
    """Whether leases on two paths of one repository exclude each other: one contains the
    other (the whole repository, ``""``, contains everything; gateway.md 6)."""
    one, other = one.strip("/"), other.strip("/")
    return (
        not one
        or not other
        or one == other
        or other.startswith(one + "/")
        or one.startswith(other + "/")
    )


def signature(secret: str, body: bytes) -> str:
    """The signature part of an ``Authorization`` header: base64 of the hex HMAC-SHA1."""
    digest = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return base64.b64encode(digest.encode()).decode()


# -- configuration -------------------------------------------------------------------------


def write_gateway_config(
    config_dir: Path,
    repositories: list[str],
    key_id: str,
    secret: str,
    *,
    max_lease_time: float,
    port: int,
    work_dir: Path,
) -> None:
    """Write ``repo.json`` and ``user.json`` as the recorded set-up has them (gateway.md)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    repos = [{"domain": name, "keys": [{"id": key_id, "path": "/"}]} for name in repositories]
    keys = [{"type": "plain_text", "id": key_id, "secret": secret}]
    write_json(config_dir / "repo.json", {"version": 2, "repos": repos, "keys": keys})
    write_json(
        config_dir / "user.json",
        {
            "max_lease_time": max_lease_time,
            "port": port,
            "num_receivers": 1,
            "receiver_path": "/usr/bin/cvmfs_receiver",
            "log_level": "info",
            "log_timestamps": True,
            "work_dir": str(work_dir),
        },
    )


def update_user_config(config_dir: Path, **changes: Any) -> None:
    """Change keys of ``user.json`` (``max_lease_time``, ``port``)."""
    user = read_json(config_dir / "user.json", {})
    user.update(changes)
    write_json(config_dir / "user.json", user)


class GatewayConfig:
    """What the gateway reads from ``repo.json`` and ``user.json``."""

    def __init__(self, config_dir: Path) -> None:
        repo_doc = read_json(config_dir / "repo.json", {})
        user_doc = read_json(config_dir / "user.json", {})
        self.secrets: dict[str, str] = {
            str(k["id"]): str(k["secret"]) for k in repo_doc.get("keys", [])
        }
        self.repos: dict[str, dict[str, str]] = {
            str(r["domain"]): {str(k["id"]): str(k.get("path", "/")) for k in r.get("keys", [])}
            for r in repo_doc.get("repos", [])
        }
        self.max_lease_time = float(user_doc.get("max_lease_time", 7200))
        self.work_dir = Path(str(user_doc.get("work_dir", config_dir / "work")))

    def key_signs(self, authorization: str | None, body: bytes) -> str | None:
        """The key id when ``authorization`` (``<key id> <signature>``) signs ``body``."""
        key_id, _, given = (authorization or "").strip().partition(" ")
        secret = self.secrets.get(key_id)
        if secret is None or not hmac.compare_digest(signature(secret, body), given.strip()):
            return None
        return key_id


# -- the lease database ----------------------------------------------------------------------


@contextlib.contextmanager
def lease_table(work_dir: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """The leases by token, locked for the block and written back when changed.

    A lease: ``repository``, ``path`` (``""`` for the whole repository), ``key_id``,
    ``hostname``, ``expires_ms`` (the gateway's clock, milliseconds).
    """
    with flocked(work_dir / "leases.lock"):
        table = read_json(work_dir / "leases.json", {})
        if not isinstance(table, dict):
            table = {}
        before = json.dumps(table, sort_keys=True)
        yield table
        if json.dumps(table, sort_keys=True) != before:
            write_json(work_dir / "leases.json", table)


def _entry(lease: dict[str, Any]) -> dict[str, Any]:
    name = lease_name(str(lease["repository"]), str(lease["path"]))
    return {
        "key_id": lease["key_id"],
        "path": name,
        "expires": go_time(int(lease["expires_ms"]) / 1000),
        "hostname": lease["hostname"],
    }


def _json(status: int, document: dict[str, Any]) -> Reply:
    return status, json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


NOT_FOUND: Reply = (404, b"404 page not found\n")


def _error(reason: str, status: int = 200) -> Reply:
    return _json(status, {"reason": reason, "status": "error"})


class GatewayApi:
    """Answers requests of the recorded API subset from the configuration below
    ``config_dir`` and the lease database in its work dir."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    def now(self) -> float:
        """The gateway's clock."""
        return fake_now(GatewayConfig(self.config_dir).work_dir)

    def handle(
        self, method: str, target: str, authorization: str | None, body: bytes, client: str
    ) -> Reply:
        """One request: ``target`` is the request path, ``client`` the peer's ``ip:port``.

        Returns the HTTP status and the JSON body (a plain-text 404 for unknown routes).
        """
        config = GatewayConfig(self.config_dir)
        parts = [p for p in target.split("?", 1)[0].split("/") if p]
        if parts[:2] != ["api", "v1"] or len(parts) > 4:
            return NOT_FOUND
        route = parts[2] if len(parts) > 2 else ""
        argument = parts[3] if len(parts) > 3 else None
        token = argument or ""
        # POST /leases/<token> commits (the lease must be live), DELETE drops it (any lease
        # the database still has, expired or not: p_gateway_lease_expiry 10, 19); the HMAC
        # is over the body of a commit, over the token of a drop
        routes: dict[tuple[str, str, bool], Callable[[], Reply]] = {
            ("GET", "", False): lambda: _json(200, {"welcome": WELCOME}),
            ("GET", "repos", False): lambda: self._repos(config, None),
            ("GET", "repos", True): lambda: self._repos(config, argument),
            ("GET", "leases", False): lambda: self._list(config, None),
            ("GET", "leases", True): lambda: self._list(config, argument),
            ("POST", "leases", False): lambda: self._acquire(config, authorization, body, client),
            ("POST", "leases", True): lambda: self._release(
                config, token, config.key_signs(authorization, body), live_only=True
            ),
            ("DELETE", "leases", True): lambda: self._release(
                config, token, config.key_signs(authorization, token.encode()), live_only=False
            ),
            ("POST", "gc", False): lambda: _error(
                "gc is not modelled by the fake gateway"
                if authorization
                else "invalid_authorization_header",
                501 if authorization else 401,
            ),
        }
        handler = routes.get((method, route, argument is not None))
        return handler() if handler is not None else NOT_FOUND

    def _repos(self, config: GatewayConfig, name: str | None) -> Reply:
        data = {repo: {"keys": keys, "enabled": True} for repo, keys in config.repos.items()}
        if name is None:
            return _json(200, {"data": data, "status": "ok"})
        if name not in data:
            return _error("invalid_repo", 404)
        return _json(200, {"data": data[name], "status": "ok"})

    def _list(self, config: GatewayConfig, token: str | None) -> Reply:
        now_ms = int(fake_now(config.work_dir) * 1000)
        with lease_table(config.work_dir) as table:
            live = {t: lease for t, lease in table.items() if int(lease["expires_ms"]) > now_ms}
        if token is not None:
            if token not in live:
                return _error(INVALID_LEASE)
            return _json(200, {"data": _entry(live[token]), "status": "ok"})
        entries = sorted((_entry(lease) for lease in live.values()), key=lambda e: e["path"])
        return _json(200, {"data": {e["path"]: e for e in entries}, "status": "ok"})

    def _acquire(
        self, config: GatewayConfig, authorization: str | None, body: bytes, client: str
    ) -> Reply:
        key_id = config.key_signs(authorization, body)
        if key_id is None:
            return _error("invalid_hmac", 401)
        try:
            request = json.loads(body)
            repository, _, path = str(request["path"]).partition("/")
        except (ValueError, KeyError, TypeError):
            return _error("invalid_request", 400)
        if key_id not in config.repos.get(repository, {}):
            return _error("invalid_repo", 400)
        now = fake_now(config.work_dir)
        now_ms = int(now * 1000)
        remaining = 0.0
        with lease_table(config.work_dir) as table:
            for token, lease in list(table.items()):
                if lease["repository"] != repository or not paths_conflict(lease["path"], path):
                    continue
                if int(lease["expires_ms"]) <= now_ms:
                    del table[token]  # an expired lease gives way (p_gateway_lease_expiry 16)
                    continue
                remaining = max(remaining, int(lease["expires_ms"]) / 1000 - now)
            if remaining > 0:
                return _json(200, {"status": "path_busy", "time_remaining": go_duration(remaining)})
            token = os.urandom(20).hex()
            hostname = request.get("hostname") if isinstance(request, dict) else None
            table[token] = {
                "repository": repository,
                "path": path.strip("/"),
                "key_id": key_id,
                "hostname": str(hostname) if hostname else client,
                "expires_ms": now_ms + int(config.max_lease_time * 1000),
            }
        return _json(
            200, {"max_api_version": MAX_API_VERSION, "session_token": token, "status": "ok"}
        )

    def _release(
        self, config: GatewayConfig, token: str, key_id: str | None, *, live_only: bool
    ) -> Reply:
        if key_id is None:
            return _error("invalid_hmac", 401)
        now_ms = int(fake_now(config.work_dir) * 1000)
        with lease_table(config.work_dir) as table:
            lease = table.get(token)
            if lease is None or (live_only and int(lease["expires_ms"]) <= now_ms):
                return _error(INVALID_LEASE)
            del table[token]
        return _json(200, {"status": "ok"})
