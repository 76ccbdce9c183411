"""The gateway's lease API as a publisher uses it, against an HTTP server replaying the
recorded replies (gateway.md, "API endpoints"; p_gateway_* ``gateway_leases``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.gateway import (
    GatewayClient,
    GatewayError,
    GatewayKey,
    Lease,
    gateway_url,
    load_key,
    parse_expires,
    parse_leases,
    read_session_token,
)
from cvmfs_syncd.errors import RepositoryConfigError
from tests.gateway_stub import RECORDED_LISTING, SECRET, GatewayStub, running_gateway


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[GatewayStub]]]:
    with running_gateway() as served:
        yield served


def test_gateway_url_comes_from_a_gw_upstream_only() -> None:
    """``gw,<tmp>,<url>`` names the API; local and S3 storage are not gateway publishers."""
    upstream = "gw,/srv/cvmfs/pub.gw.local/data/txn,http://localhost:4929/api/v1/"
    assert gateway_url(upstream) == "http://localhost:4929/api/v1"
    assert gateway_url("local,/srv/cvmfs/r/data/txn,/srv/cvmfs/r") is None
    assert gateway_url("S3,/var/spool/cvmfs/r/tmp,r@/etc/cvmfs/s3.conf") is None
    with pytest.raises(RepositoryConfigError):
        gateway_url("gw,/tmp")


def test_recorded_expiry_format_is_read_as_utc() -> None:
    """The gateway writes Go's time format with milliseconds and a literal UTC."""
    expected = datetime(2026, 12, 3, 12, 38, 43, 592000, tzinfo=UTC).timestamp()
    assert parse_expires("2026-12-03 12:38:43.592 +0000 UTC") == pytest.approx(expected)
    with pytest.raises(GatewayError):
        parse_expires("tomorrow")


def test_recorded_listing_parses_with_whole_repository_leases() -> None:
    """A whole-repository lease is listed as ``<repo>/`` and has the path ``""``."""
    leases = parse_leases(json.dumps(RECORDED_LISTING).encode())
    assert [(lease.repo, lease.path, lease.hostname) for lease in leases] == [
        ("pub.gw.local", "sw/a", "vm"),
        ("other.gw.local", "", "vm"),
    ]
    for bad in (b"", b"[]", b'{"status":"error"}', b'{"data":{"r/x":1},"status":"ok"}'):
        with pytest.raises(GatewayError):
            parse_leases(bad)


@pytest.mark.parametrize(
    ("held", "wanted", "conflicts"),
    [
        ("sw/a", "sw/a", True),
        ("sw/a", "sw/a/b", True),
        ("sw/a", "sw", True),
        ("sw/a", "", True),
        ("", "sw/b", True),
        ("sw/a", "sw/b", False),
        ("sw/a", "sw/ab", False),
    ],
)
def test_leases_conflict_hierarchically(held: str, wanted: str, conflicts: bool) -> None:
    """Nested, parent and whole-repository paths conflict; siblings do not (gateway.md 6)."""
    lease = Lease("pub.gw.local", held, "gwkey1", 0.0, "vm")
    assert lease.covers(wanted) is conflicts


def test_client_finds_our_lease_by_path(gateway: tuple[str, type[GatewayStub]]) -> None:
    """Leases are matched by repository and path, not by host name (gateway.md 21)."""
    url, _ = gateway
    client = GatewayClient(url)
    lease = client.lease_on("pub.gw.local", "/sw/a/")
    assert lease is not None
    assert lease.expires_at == pytest.approx(parse_expires("2026-12-03 12:36:11.917 +0000 UTC"))
    assert client.lease_on("pub.gw.local", "sw") is None
    assert [lease.repo for lease in client.leases("other.gw.local")] == ["other.gw.local"]


def test_drop_signs_the_token_and_tells_gone_from_dropped(
    gateway: tuple[str, type[GatewayStub]],
) -> None:
    """DELETE carries HMAC-SHA1 over the token; a second drop finds no lease."""
    url, handler = gateway
    client = GatewayClient(url)
    key = GatewayKey("gwkey1", SECRET)
    assert client.drop("tok-1", key) is True
    assert client.drop("tok-1", key) is False
    with pytest.raises(GatewayError, match="invalid_hmac"):
        client.drop("tok-1", GatewayKey("gwkey1", "wrong"))
    with pytest.raises(GatewayError):
        client.drop("../x", key)
    assert handler.seen[0][0:2] == ("DELETE", "tok-1")


def test_unreachable_gateway_is_a_gateway_error() -> None:
    """Connection refused (gateway down) is an error the caller retries."""
    with pytest.raises(GatewayError):
        GatewayClient("http://127.0.0.1:9/api/v1", timeout=2.0).leases()


def test_key_file_and_session_token(tmp_path: Path) -> None:
    """The key file's three words; the spool's token file; secrets never in a repr."""
    key_file = tmp_path / "pub.gw.local.gw"
    key_file.write_text(f"plain_text gwkey1 {SECRET}\n")
    key = load_key(key_file)
    assert key == GatewayKey("gwkey1", SECRET)
    assert SECRET not in repr(key)
    key_file.write_text("gwkey1 only-two\n")
    with pytest.raises(RepositoryConfigError):
        load_key(key_file)
    assert read_session_token(tmp_path) is None
    (tmp_path / "session_token").write_text("tok-9\n")
    assert read_session_token(tmp_path) == "tok-9"
