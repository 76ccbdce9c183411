"""No lease left behind: recovery drops a lease the spool names when no transaction is open."""

from __future__ import annotations

from pathlib import Path

from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.pipeline.leases import key_file, release_left_lease
from tests.gateway_stub import SECRET, running_gateway

REPO = "pub.gw.local"


def _publisher(tmp_path: Path, held: str | None, *, in_transaction: bool) -> Path:
    """A publisher's spool (holding the token ``held``, if any) and keys; its config dir."""
    spool = tmp_path / "spool"
    spool.mkdir()
    if held is not None:
        (spool / "session_token").write_text(held + "\n")
    if in_transaction:
        (spool / "in_transaction.lock").write_text("")
    config_dir = tmp_path / "etc"
    key_file(config_dir, REPO).parent.mkdir(parents=True)
    key_file(config_dir, REPO).write_text(f"plain_text gwkey1 {SECRET}\n")
    return config_dir


def _layout(tmp_path: Path, upstream: str) -> RepositoryLayout:
    return RepositoryLayout(REPO, tmp_path / "union", tmp_path / "spool", "", upstream, {})


def test_a_lease_left_without_a_transaction_is_dropped(tmp_path: Path) -> None:
    """Killed between grant and transaction: the token in the spool is dropped at the gateway."""
    with running_gateway({"tok-1": f"{REPO}/sw/a"}) as (url, gateway):
        config_dir = _publisher(tmp_path, "tok-1", in_transaction=False)
        outcome = release_left_lease(_layout(tmp_path, f"gw,/tmp,{url}"), config_dir)
        assert outcome is not None
        assert outcome.dropped
        assert gateway.tokens == {}
    assert not (tmp_path / "spool" / "session_token").exists()


def test_an_open_transaction_keeps_its_lease(tmp_path: Path) -> None:
    """With a local transaction the lease is its own: abort -f drops both, not recovery."""
    with running_gateway({"tok-1": f"{REPO}/sw/a"}) as (url, gateway):
        config_dir = _publisher(tmp_path, "tok-1", in_transaction=True)
        assert release_left_lease(_layout(tmp_path, f"gw,/tmp,{url}"), config_dir) is None
        assert gateway.tokens == {"tok-1": f"{REPO}/sw/a"}
        assert gateway.seen == []


def test_an_expired_lease_is_gone_and_a_down_gateway_is_an_error(tmp_path: Path) -> None:
    """A token the gateway no longer knows is fine; an unreachable gateway is reported and the
    token kept for the next try."""
    with running_gateway({}) as (url, _):
        config_dir = _publisher(tmp_path, "tok-old", in_transaction=False)
        outcome = release_left_lease(_layout(tmp_path, f"gw,/tmp,{url}"), config_dir)
        assert outcome is not None
        assert outcome.gone
    (tmp_path / "spool" / "session_token").write_text("tok-2\n")
    down = _layout(tmp_path, "gw,/tmp,http://127.0.0.1:9/api/v1")
    outcome = release_left_lease(down, config_dir, timeout=2.0)
    assert outcome is not None
    assert outcome.error
    assert (tmp_path / "spool" / "session_token").exists()


def test_nothing_to_do_without_a_gateway_or_a_token(tmp_path: Path) -> None:
    """Local storage, or a gateway publisher holding no lease: nothing is asked."""
    config_dir = _publisher(tmp_path, None, in_transaction=False)
    gateway = _layout(tmp_path, "gw,/tmp,http://127.0.0.1:9/api/v1")
    assert release_left_lease(gateway, config_dir) is None
    assert release_left_lease(_layout(tmp_path, "local,/tmp,/srv"), config_dir) is None
