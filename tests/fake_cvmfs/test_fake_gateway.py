"""Behaviour of a fake gateway repository: ``FakeGateway``, its HTTP API and its publishers
(docs/fake-cvmfs.md, "Gateway repositories"; gateway.md and the p_gateway_* recordings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.gateway import GatewayClient, GatewayKey, parse_expires
from tests.fake_cvmfs.gateway import FakeGateway
from tests.fake_cvmfs.server.leases import go_duration, go_time
from tests.fake_cvmfs.stratum0 import FakeStratum0

R = "pub.gw.local"
BUSY = re.compile(r"^Path busy\. Time remaining = \d+(\.\d+)?s\n$")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    """A gateway repository with publishers p1 (the storage's host) and p2, host name vm."""
    with FakeGateway(tmp_path / "hosts", R, hostname="vm") as fake:
        yield fake


def names(publisher: FakeStratum0) -> list[str]:
    """Paths the publisher's union directory shows (relative, sorted)."""
    union = publisher.union_dir(R)
    return sorted(str(p.relative_to(union)) for p in union.rglob("*"))


def start_tree(gateway: FakeGateway) -> None:
    """Publish sw/a and sw/b from p1 and bring p2 to that revision."""
    p1 = gateway.publisher("p1")
    p1.check_run("transaction", R)
    for sub in ("sw/a", "sw/b"):
        (p1.union_dir(R) / sub).mkdir(parents=True)
        (p1.union_dir(R) / sub / "keep.txt").write_text(f"{sub}\n")
    p1.check_run("publish", R)
    gateway.publisher("p2").check_run("tag", "-l", R)  # remounts p2 (gateway.md 8)


# -- set-up and the harness ------------------------------------------------------------------


def test_publishers_have_their_own_hosts_and_share_one_storage(gateway: FakeGateway) -> None:
    """Each publisher has its own config, spool, union and wrapper; the upstream is the
    gateway, the storage (the receiver's) is p1's, as in the recorded recipe."""
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    assert p1.server_command != p2.server_command
    assert p1.spool_dir(R) != p2.spool_dir(R) and p1.union_dir(R) != p2.union_dir(R)
    storage = p1.root / "srv" / "cvmfs" / R
    for publisher in (p1, p2):
        conf = publisher.config(R)
        assert conf["CVMFS_UPSTREAM_STORAGE"] == f"gw,{storage}/data/txn,{gateway.url}"
        assert conf["TEST_CVMFS_RECEIVER_UPSTREAM_STORAGE"] == f"local,{storage}/data/txn,{storage}"
        assert publisher.storage_dir(R) == storage
        assert (publisher.config_dir / "keys" / f"{R}.gw").read_text().startswith("plain_text ")
        assert (publisher.spool_dir(R) / "client.local").read_text() == ""
    assert "reflog.chksum" in (p1.state(R)["spool_files"] or [])
    assert p2.state(R)["spool_files"] == [
        "cache",
        "client.local",
        "cvmfs_io",
        "ofs_workdir",
        "ovl_work",
        "rdonly",
        "scratch",
        "tmp",
    ]
    assert gateway.url == f"http://127.0.0.1:{gateway.port}/api/v1"
    assert p1.run("list").stdout == f"{R} (stratum0 / gw)  \n"


def test_session_token_exists_while_the_lease_is_held(gateway: FakeGateway) -> None:
    """The spool's session_token holds the lease's token from transaction to publish/abort,
    and is the token the gateway's database has for that lease."""
    p1 = gateway.publisher("p1")
    token_file = p1.spool_dir(R) / "session_token"
    result = p1.run("transaction", R)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Gateway reply: ok\n", "")
    assert gateway.lease_tokens() == {f"{R}/": token_file.read_text()}
    assert p1.run("publish", R).returncode == 0
    assert not token_file.exists()
    p1.check_run("transaction", R)
    assert token_file.exists()
    assert p1.run("abort", "-f", R).stdout.startswith("Gateway reply: ok\n")
    assert not token_file.exists()
    assert gateway.lease_tokens() == {}


# -- the HTTP API -------------------------------------------------------------------------------


def test_api_welcome_repos_and_lease_listing_shapes(gateway: FakeGateway) -> None:
    """GET /api/v1, /repos, /repos/R and /leases answer with the recorded JSON shapes."""
    assert gateway.request("GET", "") == (
        200,
        b'{"welcome":"You are in an open field on the west side of a white house with a '
        b'boarded front door."}',
    )
    repos = b'{"data":{"pub.gw.local":{"keys":{"gwkey1":"/"},"enabled":true}},"status":"ok"}'
    assert gateway.request("GET", "/repos") == (200, repos)
    assert gateway.request("GET", f"/repos/{R}") == (
        200,
        b'{"data":{"keys":{"gwkey1":"/"},"enabled":true},"status":"ok"}',
    )
    assert gateway.request("GET", "/leases") == (200, b'{"data":{},"status":"ok"}')
    gateway.publisher("p1").check_run("transaction", R)
    status, payload = gateway.request("GET", "/leases")
    listing = json.loads(payload)
    assert status == 200 and list(listing) == ["data", "status"]
    lease = listing["data"][f"{R}/"]
    assert list(lease) == ["key_id", "path", "expires", "hostname"]
    assert (lease["key_id"], lease["path"], lease["hostname"]) == ("gwkey1", f"{R}/", "vm")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,3})? \+0000 UTC", lease["expires"])
    assert 20 < parse_expires(lease["expires"]) - gateway.now() <= 30
    assert gateway.lease_tokens()[f"{R}/"] not in payload.decode()


def test_api_lease_requests_are_signed(gateway: FakeGateway) -> None:
    """POST /leases needs the HMAC of its body; a raw client's lease shows its ip:port; a
    busy path answers path_busy with the time remaining; DELETE needs the token's HMAC."""
    body = b'{"api_version": "3", "path": "pub.gw.local/sw"}'
    status, payload = gateway.request("POST", "/leases", body)
    assert (status, payload) == (401, b'{"reason":"invalid_hmac","status":"error"}')
    status, payload = gateway.request("POST", "/leases", body, sign=body)
    reply = json.loads(payload)
    assert (status, list(reply), reply["max_api_version"]) == (
        200,
        ["max_api_version", "session_token", "status"],
        3,
    )
    token = reply["session_token"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", gateway.leases()[f"{R}/sw"]["hostname"])
    nested = b'{"api_version":"3","path":"pub.gw.local/sw/a/b"}'
    busy = json.loads(gateway.request("POST", "/leases", nested, sign=nested)[1])
    assert list(busy) == ["status", "time_remaining"] and busy["status"] == "path_busy"
    assert re.fullmatch(r"\d+(\.\d+)?s", busy["time_remaining"])
    assert gateway.request("DELETE", f"/leases/{token}", sign=b"wrong") == (
        401,
        b'{"reason":"invalid_hmac","status":"error"}',
    )
    assert gateway.request("DELETE", f"/leases/{token}", sign=token.encode()) == (
        200,
        b'{"status":"ok"}',
    )
    assert gateway.request("DELETE", f"/leases/{token}", sign=token.encode()) == (
        200,
        b'{"reason":"invalid lease","status":"error"}',
    )
    assert gateway.request("POST", "/gc", b"{}") == (
        401,
        b'{"reason":"invalid_authorization_header","status":"error"}',
    )
    assert gateway.request("GET", "/nothing/here")[0] == 404


def test_the_daemons_gateway_client_works_against_the_fake(gateway: FakeGateway) -> None:
    """cvmfs_syncd's GatewayClient lists the fake's leases and drops one by its token."""
    p1 = gateway.publisher("p1")
    start_tree(gateway)
    p1.check_run("transaction", f"{R}/sw/a")
    client = GatewayClient(gateway.url)
    lease = client.lease_on(R, "sw/a")
    assert lease is not None
    assert (lease.repo, lease.path, lease.key_id, lease.hostname) == (R, "sw/a", "gwkey1", "vm")
    token = (p1.spool_dir(R) / "session_token").read_text()
    key = GatewayKey(gateway.key_id, gateway.secret)
    assert client.drop(token, key) is True
    assert client.drop(token, key) is False
    assert client.leases(R) == []


def test_stopped_gateway_refuses_connections_and_keeps_its_leases(gateway: FakeGateway) -> None:
    """stop() closes the port; start() reopens it with the leases of before."""
    gateway.publisher("p1").check_run("transaction", R)
    before = gateway.leases()
    gateway.stop()
    assert not gateway.running
    with pytest.raises(ConnectionRefusedError):
        gateway.request("GET", "/leases")
    gateway.start()
    assert gateway.leases() == before
    gateway.restart()
    assert gateway.leases() == before


def test_lease_time_and_clock_offset(gateway: FakeGateway) -> None:
    """max_lease_time applies to new leases; the gateway's clock expires them."""
    p1 = gateway.publisher("p1")
    gateway.set_max_lease_time(5)
    p1.check_run("transaction", R)
    expires = parse_expires(gateway.leases()[f"{R}/"]["expires"])
    assert 1 < expires - gateway.now() <= 5
    gateway.advance_clock(6)
    assert gateway.leases() == {}
    assert p1.in_transaction(R)


def test_go_formats() -> None:
    """Durations and times are written as the Go gateway writes them."""
    assert go_duration(29.812980102) == "29.812980102s"
    assert go_duration(90) == "1m30s"
    assert go_duration(0.45) == "450ms"
    assert go_duration(3600) == "1h0m0s"
    assert go_time(1796301523.592) == "2026-12-03 12:38:43.592 +0000 UTC"
    assert go_time(1796301523.5) == "2026-12-03 12:38:43.5 +0000 UTC"
    assert go_time(1796301523.0) == "2026-12-03 12:38:43 +0000 UTC"


# -- transactions and leases --------------------------------------------------------------------


def test_lease_conflicts_are_hierarchical(gateway: FakeGateway) -> None:
    """While p1 holds sw/a, p2 gets 16 for sw/a, sw/a/b (missing: busy wins over the
    existence check), sw and the whole repository; the sibling sw/b is granted."""
    start_tree(gateway)
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    p1.check_run("transaction", f"{R}/sw/a")
    for path in (f"{R}/sw/a", f"{R}/sw/a/b", f"{R}/sw", R):
        result = p2.run("transaction", path)
        assert result.returncode == 16, path
        assert BUSY.match(result.stdout), result.stdout
        assert result.stderr == "CernVM-FS transaction error: lease path busy\n"
        assert not p2.in_transaction(R)
    assert p2.run("transaction", f"{R}/sw/b").stdout == "Gateway reply: ok\n"
    assert sorted(gateway.leases()) == [f"{R}/sw/a", f"{R}/sw/b"]


def test_transaction_wait_retries_while_the_path_is_busy(gateway: FakeGateway) -> None:
    """transaction -t retries on a busy lease ("repository busy, retrying"), then 16."""
    start_tree(gateway)
    gateway.publisher("p1").check_run("transaction", f"{R}/sw/a")
    result = gateway.publisher("p2").run("transaction", "-t", "1", f"{R}/sw/a")
    assert result.returncode == 16
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("Path busy. Time remaining = ")
    assert "repository busy, retrying" in lines
    assert result.stderr == "CernVM-FS transaction error: lease path busy\n"


def test_lease_on_missing_path_is_granted_then_dropped(gateway: FakeGateway) -> None:
    """sw/a with no sw: the lease is granted and dropped, exit 2 naming the missing parent;
    no lock, no token, no lease left (basic 1, 26)."""
    p1 = gateway.publisher("p1")
    result = p1.run("transaction", f"{R}/sw/a")
    assert (result.returncode, result.stdout) == (2, "Gateway reply: ok\nGateway reply: ok\n")
    assert result.stderr == (
        "CernVM-FS transaction error: cannot open transaction on non-existing path /sw\n"
    )
    assert not p1.in_transaction(R)
    assert not (p1.spool_dir(R) / "session_token").exists()
    assert gateway.leases() == {} and gateway.lease_tokens() == {}
    start_tree(gateway)
    result = p1.run("transaction", f"{R}/sw/a/new/deeper")
    assert result.returncode == 2
    assert result.stderr.endswith("non-existing path /sw/a/new\n")


def test_lease_on_a_file_and_path_arguments(gateway: FakeGateway) -> None:
    """A lease on a regular file is fine; a trailing slash is ignored, `abort -f R/sub` is
    accepted; a leading slash is an invocation error (basic 24, 25, 28, 30)."""
    start_tree(gateway)
    p1 = gateway.publisher("p1")
    p1.check_run("transaction", f"{R}/sw/a/keep.txt")
    assert list(gateway.leases()) == [f"{R}/sw/a/keep.txt"]
    p1.check_run("abort", "-f", R)
    p1.check_run("transaction", f"{R}/sw/a/")
    assert list(gateway.leases()) == [f"{R}/sw/a"]
    assert p1.run("abort", "-f", f"{R}/sw/a").returncode == 0
    result = p1.run("transaction", f"/{R}/sw/a")
    assert result.returncode == 1
    assert result.stderr == (
        f"Invocation error: multiple repositories available in {p1.config_dir}/"
        f"repositories.d:\n  {R}\n"
    )


# -- publishing -----------------------------------------------------------------------------------


def test_writes_outside_the_lease_are_dropped(gateway: FakeGateway) -> None:
    """Publishing a sw/a lease keeps only sw/a's changes; publish exits 0 with the
    recorded output, the revision goes up and the union shows what was published."""
    start_tree(gateway)
    p1 = gateway.publisher("p1")
    revision = p1.revision(R)
    p1.check_run("transaction", f"{R}/sw/a")
    union = p1.union_dir(R)
    (union / "sw/a/inside.txt").write_text("in\n")
    (union / "outside.txt").write_text("out\n")
    (union / "sw/b/keep.txt").write_text("changed\n")
    result = p1.run("publish", R)
    assert result.returncode == 0
    assert re.fullmatch(
        r"Using auto tag 'generic(?:_\d+)?-[\dT:-]+Z'\n"
        r"Swissknife Sync: Processing changes\.\.\.\n"
        r"Waiting for upload of files before committing\.\.\.\n"
        r"Committing file catalogs\.\.\.\n"
        r"Swissknife Sync: Wait for all uploads to finish\n"
        r"Swissknife Sync: Exporting repository manifest\n"
        r"Statistics stored at: \S+/stats\.db\n"
        r"Changes submitted to repository gateway\n",
        result.stdout,
    )
    assert p1.revision(R) == revision + 1
    tree = p1.published_tree(R)
    assert tree["sw/a/inside.txt"].content == b"in\n"
    assert "outside.txt" not in tree
    assert tree["sw/b/keep.txt"].content == b"sw/b\n"
    assert (union / "sw/b/keep.txt").read_text() == "sw/b\n"
    assert not (union / "outside.txt").exists()
    assert p1.state(R)["revision"] == revision + 1
    assert p1.violations() == []


def test_publish_without_changes_makes_a_revision_and_a_tag(gateway: FakeGateway) -> None:
    """An empty publish still makes a revision and the receiver's own auto tag, named with
    milliseconds (basic 16-18)."""
    p1 = gateway.publisher("p1")
    revision = p1.revision(R)
    p1.check_run("transaction", R)
    p1.check_run("publish", R)
    assert p1.revision(R) == revision + 1
    newest = [n for n, rev in p1.tags(R).items() if rev == revision + 1]
    assert sorted(newest)[0].startswith("generic-")
    assert re.fullmatch(r"generic-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", sorted(newest)[0])
    assert p1.tags(R)["trunk"] == revision + 1
    assert p1.tags(R)["trunk-previous"] == revision


def test_concurrent_disjoint_publishes_are_both_kept(gateway: FakeGateway) -> None:
    """Two publishers publishing disjoint leases at once both succeed, each with its own
    revision; the one that committed second stays on its old revision (conflict 10-12)."""
    start_tree(gateway)
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    base = p1.revision(R)
    p1.check_run("transaction", f"{R}/sw/a")
    p2.check_run("transaction", f"{R}/sw/b")
    (p1.union_dir(R) / "sw/a/p1.txt").write_text("p1\n")
    (p2.union_dir(R) / "sw/b/p2.txt").write_text("p2\n")
    processes = [
        subprocess.Popen(
            [str(p.server_command), "publish", R],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in (p1, p2)
    ]
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    assert p1.revision(R) == base + 2
    tree = p1.published_tree(R)
    assert (tree["sw/a/p1.txt"].content, tree["sw/b/p2.txt"].content) == (b"p1\n", b"p2\n")
    assert sorted(p.state(R)["revision"] or 0 for p in (p1, p2)) == [base, base + 1]


def test_rebased_publish_leaves_the_mount_until_the_next_transaction(
    gateway: FakeGateway,
) -> None:
    """p2's open transaction does not see p1's commit; p2's publish on the stale base is
    merged, its mount stays; the next transaction remounts it (conflict 13-23)."""
    start_tree(gateway)
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    base = p1.revision(R)
    p2.check_run("transaction", f"{R}/sw/b")
    p1.check_run("transaction", f"{R}/sw/a")
    (p1.union_dir(R) / "sw/a/p1.txt").write_text("p1\n")
    p1.check_run("publish", R)
    assert "p1.txt" not in [p.name for p in (p2.union_dir(R) / "sw/a").iterdir()]
    (p2.union_dir(R) / "sw/b/p2.txt").write_text("p2\n")
    p2.check_run("publish", R)
    assert p1.revision(R) == base + 2
    assert {"sw/a/p1.txt", "sw/b/p2.txt"} <= set(p1.published_tree(R))
    assert p2.state(R)["revision"] == base
    assert "sw/b/p2.txt" not in names(p2) and "sw/a/p1.txt" not in names(p2)
    result = p2.run("transaction", R)
    assert result.returncode == 0
    assert result.stderr.startswith(f"{R} is not based on the newest published revision\n")
    assert "Trying to mount" in result.stderr
    assert result.stdout.endswith("Gateway reply: ok\n")
    assert p2.state(R)["revision"] == base + 2
    assert {"sw/a/p1.txt", "sw/b/p2.txt"} <= set(names(p2))


# -- lease expiry and a stopped gateway ---------------------------------------------------------


def test_expired_lease_fails_publish_until_abort(gateway: FakeGateway) -> None:
    """An expired lease vanishes; publish exits 1 with the recorded invalid-lease PANIC and
    the transaction stays; transaction gives 17; abort -f recovers (expiry 3-12)."""
    start_tree(gateway)
    p1 = gateway.publisher("p1")
    p1.check_run("transaction", f"{R}/sw/a")
    (p1.union_dir(R) / "sw/a/late.txt").write_text("late\n")
    gateway.advance_clock(31)
    assert gateway.leases() == {}
    assert p1.run("list").stdout == f"{R} (stratum0 / gw - in transaction)  \n"
    revision = p1.revision(R)
    result = p1.run("publish", R)
    assert result.returncode == 1
    assert result.stdout.endswith("Swissknife Sync: Wait for all uploads to finish\n")
    assert result.stderr.startswith(
        'SessionContext::DoUpload - error reply: {"reason":"invalid lease","status":"error"}\n'
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        "  what():  PANIC: <cvmfs-src>/cvmfs/session_context.cc : 405\n"
        "SessionContext: could not submit payload. Aborting.\nKilled\nSynchronization failed\n"
        "\nExecuted Command:\ncvmfs_swissknife sync "
    )
    assert f" -H {p1.config_dir}/keys/{R}.gw -P {p1.spool_dir(R)}/session_token " in result.stderr
    assert p1.in_transaction(R) and p1.state(R)["mount_mode"] == "rw"
    assert (p1.union_dir(R) / "sw/a/late.txt").exists()
    assert p1.revision(R) == revision
    assert p1.run("transaction", R).returncode == 17
    result = p1.run("abort", "-f", R)
    assert (result.returncode, result.stdout.splitlines()[0]) == (0, "Gateway reply: ok")
    p1.check_run("transaction", f"{R}/sw/a")
    p1.check_run("publish", R)


def test_expired_lease_taken_by_another_publisher(gateway: FakeGateway) -> None:
    """After expiry p2 gets the path; p1's publish then fails, and its abort -f reports
    the gateway's error, forces on and exits 0 (expiry 13-19)."""
    start_tree(gateway)
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    p1.check_run("transaction", f"{R}/sw/a")
    gateway.advance_clock(31)
    assert p2.run("transaction", f"{R}/sw/a").stdout.endswith("Gateway reply: ok\n")
    assert p1.run("publish", R).returncode == 1
    result = p1.run("abort", "-f", R)
    assert result.returncode == 0
    assert result.stdout.startswith("Error from gateway: 'invalid lease'\n")
    assert result.stderr == (
        "force abort, continue despite error while trying to drop lease, removing session "
        "token. Error: gateway doesn't recognize the lease or cannot drop it\n"
    )
    assert not p1.in_transaction(R)
    assert list(gateway.leases()) == [f"{R}/sw/a"]


def test_gateway_down(gateway: FakeGateway) -> None:
    """Gateway stopped: transaction exits 1 at once, no lock; with a transaction open,
    publish exits 1 and abort -f exits 5 keeping lock and mount; after a restart the
    lease is still there (down 2-19)."""
    start_tree(gateway)
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    gateway.stop()
    result = p1.run("transaction", R)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "Make lease acquire request failed: 7. Reply: \n"
        "(unexpected termination) cannot acquire lease\n\nStacktrace:\n"
    )
    assert not p1.in_transaction(R)
    gateway.start()
    p1.check_run("transaction", f"{R}/sw/a")
    (p1.union_dir(R) / "sw/a/down.txt").write_text("down\n")
    gateway.stop()
    result = p1.run("publish", R)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "SessionContext::DoUpload - curl_easy_perform failed: 7\nKilled\nSynchronization failed\n"
    )
    result = p1.run("abort", "-f", R)
    assert (result.returncode, result.stdout) == (5, "")
    assert result.stderr == "Make lease drop request failed: 7. Reply: ''\ncannot drop lease\n"
    assert p1.in_transaction(R) and p1.state(R)["mount_mode"] == "rw"
    assert (p1.union_dir(R) / "sw/a/down.txt").exists()
    gateway.restart()
    assert list(gateway.leases()) == [f"{R}/sw/a"]
    assert p1.run("transaction", f"{R}/sw/a").returncode == 17
    assert p2.run("transaction", f"{R}/sw/a").returncode == 16
    assert p1.run("abort", "-f", R).returncode == 0
    assert not (p1.union_dir(R) / "sw/a/down.txt").exists()


# -- maintenance commands -------------------------------------------------------------------------


def test_maintenance_commands_on_a_publisher(gateway: FakeGateway) -> None:
    """tag -a/-r, rollback, resign and gc fail as recorded; check works (-i skips the
    storage scan); p2 without a reflog checksum fails gc differently (maintenance)."""
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    refusal = (
        "[ERROR] Session token file has to be provided when upstream type is gw.\n"
        "failed to init environment\n"
    )
    result = p1.run("tag", "-a", "mytag", "-m", "made on publisher", R)
    assert (result.returncode, result.stderr) == (1, refusal)
    result = p1.run("tag", "-r", "mytag", "-f", R)
    assert (result.returncode, result.stderr) == (1, refusal + "Did not remove anything\n")
    result = p1.run("rollback", "-f", R)
    assert result.returncode == 1
    assert result.stdout == f"Rolling back repository (leaving behind {p1.root_hash(R)})\n"
    assert result.stderr.startswith(refusal + "Rollback failed\n\nExecuted Command:\n")
    result = p1.run("resign", R)
    assert (result.returncode, result.stdout) == (
        134,
        "Signing 30 day whitelist with master key... ",
    )
    assert result.stderr.startswith("Failed to configure gateway uploader.")
    result = p1.run("gc", "-f", R)
    assert result.returncode == 1
    assert result.stdout.endswith("Running Garbage Collection \n")
    assert result.stderr.endswith("Error in parsing the spooler definition\nAborted\nFail (6)!\n")
    result = p2.run("gc", "-f", R)
    assert (result.returncode, result.stderr) == (
        1,
        "Could not read reflog checksum\nFail (6)!\n",
    )
    assert not p1.in_transaction(R) and not p2.in_transaction(R)
    result = p1.run("check", "-i", R)
    assert result.returncode == 0
    assert result.stdout.startswith("Storage integrity check only works locally. skipping.\n")
    assert p1.run("snapshot", R).stdout == f"Repository {R} is not a stratum 1 repository\n"
    assert p1.run("list-catalogs", R).stdout == "/\n"


def test_check_remounts_a_stale_publisher(gateway: FakeGateway) -> None:
    """check on a publisher behind the newest revision remounts it with the shell's notes
    (maintenance 18); info does not."""
    p1, p2 = gateway.publisher("p1"), gateway.publisher("p2")
    p1.check_run("transaction", R)
    p1.check_run("publish", R)
    stale = p2.state(R)["revision"]
    assert p2.run("info", R).stderr == ""
    assert p2.state(R)["revision"] == stale
    result = p2.run("check", R)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"{R} is not based on the newest published revision",
        f"Note: Trying to umount {p2.union_dir(R)}... success",
        f"Note: Trying to umount {p2.spool_dir(R)}/rdonly... success",
        f"Note: Trying to mount {p2.spool_dir(R)}/rdonly... success",
        f"Note: Trying to mount {p2.union_dir(R)}... success",
    ]
    assert p2.state(R)["revision"] == p1.revision(R)


def test_diff_reports_a_modified_directory(gateway: FakeGateway) -> None:
    """A directory whose entries changed shows as `modify directory [timestamp]`."""
    start_tree(gateway)
    p1 = gateway.publisher("p1")
    p1.check_run("transaction", f"{R}/sw/a")
    target = p1.union_dir(R) / "sw/a"
    (target / "back.txt").write_text("back\n")
    stamp = target.stat().st_mtime + 5
    os.utime(target, (stamp, stamp))
    p1.check_run("publish", R)
    assert p1.run("diff", R).stdout.splitlines()[4:] == [
        "/sw/a modify directory [timestamp]",
        "/sw/a/back.txt add file +5 bytes",
    ]
