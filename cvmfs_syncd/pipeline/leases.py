"""No lease left behind: a gateway lease the spool still names, with no transaction of ours.

``cvmfs_server transaction R/path`` first takes a lease at the gateway (its token goes into
the spool's ``session_token``), then sets up the local transaction.  A daemon killed between
the two, or a command stopped there by recovery, leaves a lease with no local transaction:
it blocks every publisher of that path (and, for a parent path, of everything below it)
until it expires.  Recovery drops it at once through the gateway's API, signed with the
repository's gateway key.  With a local transaction open the lease belongs to it, and
``abort -f`` drops both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from cvmfs_syncd.cvmfs.gateway import (
    SESSION_TOKEN_FILE,
    GatewayClient,
    GatewayError,
    load_key,
    read_session_token,
)
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.errors import RepositoryConfigError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LeaseRelease:
    """What became of a lease left without a transaction: ``dropped`` at the gateway, or
    ``gone`` already (expired, dropped by the tool); ``error`` when the gateway could not
    be asked (then the lease may still exist)."""

    dropped: bool = False
    gone: bool = False
    error: str = ""


def key_file(config_dir: Path, repo: str) -> Path:
    """The repository's gateway key: ``<config_dir>/keys/<repo>.gw``."""
    return config_dir / "keys" / f"{repo}.gw"


def release_left_lease(
    layout: RepositoryLayout, config_dir: Path, *, timeout: float = 10.0
) -> LeaseRelease | None:
    """Drop the lease the spool names when no transaction is open; None when there is none
    to drop (no gateway, a transaction open, no token)."""
    url = layout.gateway_url
    if url is None or layout.in_transaction():
        return None
    try:
        token = read_session_token(layout.spool_dir)
    except GatewayError as exc:
        return LeaseRelease(error=str(exc))
    if token is None:
        return None
    try:
        key = load_key(key_file(config_dir, layout.name))
        dropped = GatewayClient(url, timeout=timeout).drop(token, key)
    except (GatewayError, RepositoryConfigError) as exc:
        failure = str(exc)
    else:
        failure = ""
    if failure:
        log.error(
            "a lease left without a transaction could not be dropped; it blocks its path "
            "until it expires",
            repository=layout.name,
            error=failure,
        )
        return LeaseRelease(error=failure)
    with contextlib.suppress(FileNotFoundError):
        (layout.spool_dir / SESSION_TOKEN_FILE).unlink()
    log.warning(
        "dropped a gateway lease left without a transaction",
        repository=layout.name,
        dropped=dropped,
    )
    return LeaseRelease(dropped=dropped, gone=not dropped)


def read_lease_expiry(
    layout: RepositoryLayout, scope: str, *, timeout: float = 10.0
) -> float | None:
    """When the gateway says our lease on ``scope`` expires (epoch seconds), or None when it
    cannot be read.  Leases are matched by path: host names collide (gateway.md 21)."""
    url = layout.gateway_url
    if url is None:
        return None
    try:
        lease = GatewayClient(url, timeout=timeout).lease_on(layout.name, scope)
    except GatewayError as exc:
        log.info("lease expiry not readable; using lease_seconds", error=str(exc))
        return None
    return None if lease is None else lease.expires_at
