"""Behaviour of the fake ``cvmfs_server`` and of ``FakeStratum0`` (see docs/fake-cvmfs.md)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_cvmfs import cvmfs_server as engine
from tests.fake_cvmfs.stratum0 import FakeStratum0

REPO = "ref.local"
RECORDED_SPOOL = [
    "cache",
    "client.local",
    "cvmfs_io",
    "ofs_workdir",
    "ovl_work",
    "rdonly",
    "reflog.chksum",
    "scratch",
    "stats.db",
    "tmp",
]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeStratum0]:
    """A fake stratum 0 with one plain repository, ref.local."""
    stratum0 = FakeStratum0(tmp_path / "root")
    stratum0.mkfs(REPO)
    yield stratum0
    stratum0.kill_orphans()


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a callable) until it is true or fail after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def sha1(data: bytes) -> str:
    """Hex SHA-1."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


# -- mkfs ---------------------------------------------------------------------------------


def test_mkfs_writes_recorded_layout_below_root(fake: FakeStratum0) -> None:
    """mkfs writes server.conf with the recorded keys but paths below ROOT, keys and storage."""
    conf = fake.config(REPO)
    root = fake.root
    assert conf["CVMFS_UNION_DIR"] == str(root / "cvmfs" / REPO)
    assert conf["CVMFS_SPOOL_DIR"] == str(root / "var/spool/cvmfs" / REPO)
    storage = root / "srv/cvmfs" / REPO
    assert conf["CVMFS_UPSTREAM_STORAGE"] == f"local,{storage}/data/txn,{storage}"
    assert conf["CVMFS_STRATUM0"] == f"file://{storage}"
    assert conf["CVMFS_GARBAGE_COLLECTION"] == "false"
    assert conf["CVMFS_AUTO_TAG"] == "true"
    assert "CVMFS_AUTO_GC" not in conf
    for ext, mode in (("key", 0o400), ("masterkey", 0o400), ("crt", 0o444), ("pub", 0o444)):
        assert (fake.config_dir / "keys" / f"{REPO}.{ext}").stat().st_mode & 0o777 == mode
    for name in (".cvmfspublished", ".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"):
        assert (storage / name).is_file()
    assert (storage / "data" / "txn").is_dir()
    assert len([p for p in (storage / "data").iterdir() if len(p.name) == 2]) == 256


def test_mkfs_state_matches_recording(fake: FakeStratum0) -> None:
    """After mkfs the state is the recorded one: revision 1, mounted ro, no locks."""
    state = fake.state(REPO)
    assert state == {
        "in_transaction_lock": False,
        "is_publishing_lock": False,
        "mount_mode": "ro",
        "rdonly_mounted": True,
        "revision": 1,
        "root_hash": fake.root_hash(REPO),
        "spool_files": RECORDED_SPOOL,
    }
    assert (fake.union_dir(REPO) / "new_repository").read_text() == (
        f"New CernVM-FS repository for {REPO}\n"
    )
    assert fake.read_file(REPO, "new_repository") == b"New CernVM-FS repository for ref.local\n"


def test_mkfs_gc_flag_enables_garbage_collection(fake: FakeStratum0) -> None:
    """mkfs -z sets the two gc keys and prints the recorded auto-tag note first."""
    result = fake.run("mkfs", "-z", "-o", engine.current_user(), "refgc.local")
    assert result.returncode == 0
    assert result.stdout.startswith("Note: Autotagging all revisions impedes garbage collection\n")
    conf = fake.config("refgc.local")
    assert conf["CVMFS_GARBAGE_COLLECTION"] == "true"
    assert conf["CVMFS_AUTO_GC"] == "true"
    assert fake.manifest_fields("refgc.local")["G"] == "yes"


def test_manifest_and_whitelist_have_recorded_shape(fake: FakeStratum0) -> None:
    """Both signed files: letter fields, `--`, SHA-1 of the text part, 256 signature bytes."""
    storage = fake.storage_dir(REPO)
    for name, first in ((".cvmfspublished", "C"), (".cvmfswhitelist", "2")):
        data = (storage / name).read_bytes()
        text, _, rest = data.partition(b"--\n")
        assert text.decode().startswith(first) or name == ".cvmfswhitelist"
        digest, _, signature = rest.partition(b"\n")
        assert digest.decode() == sha1(text)
        assert len(signature) == 256
    fields = fake.manifest_fields(REPO)
    assert list(fields) == list("CBRDSGANXHTMY")
    assert fields["R"] == "d41d8cd98f00b204e9800998ecf8427e"
    assert fields["S"] == "1"
    assert fields["N"] == REPO
    lines = engine.text_part((storage / ".cvmfswhitelist").read_bytes()).splitlines()
    assert len(lines[0]) == 14
    assert lines[1].startswith("E")
    assert lines[2] == f"N{REPO}"
    assert len(lines[3].split(":")) == 20


# -- transaction / publish / abort --------------------------------------------------------


def test_transaction_creates_empty_0600_lock_and_mounts_rw(fake: FakeStratum0) -> None:
    """transaction: exit 0, in_transaction.lock empty with mode 0600, union mounted rw."""
    result = fake.run("transaction", REPO)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    lock = fake.spool_dir(REPO) / "in_transaction.lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    state = fake.state(REPO)
    assert state["in_transaction_lock"] is True
    assert state["in_transaction_lock_content"] == ""
    assert state["mount_mode"] == "rw"
    assert state["spool_files"] == sorted([*RECORDED_SPOOL, "in_transaction.lock"])


def test_second_transaction_exits_17(fake: FakeStratum0) -> None:
    """A transaction while one is open exits 17 with the recorded stderr message."""
    fake.check_run("transaction", REPO)
    result = fake.run("transaction", REPO)
    assert result.returncode == 17
    assert result.stdout == ""
    assert result.stderr == "CernVM-FS transaction error: another transaction is already open\n"


def test_publish_builds_next_revision_readable_by_client(fake: FakeStratum0) -> None:
    """publish walks the union dir: files, dirs and symlinks appear in the next revision."""
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    (union / "hello.txt").write_text("hello world\n")
    (union / "sub" / "dir").mkdir(parents=True)
    (union / "sub" / "dir" / "nested.txt").write_bytes(b"nested\n")
    (union / "sub" / "dir" / "tool").write_bytes(b"#!/bin/sh\n")
    (union / "sub" / "dir" / "tool").chmod(0o755)
    (union / "link").symlink_to("hello.txt")
    (union / "empty").write_bytes(b"")
    result = fake.run("publish", "-m", "first", REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "Swissknife Sync: Processing changes...",
        "Waiting for upload of files before committing...",
        "Committing file catalogs...",
        "Swissknife Sync: Wait for all uploads to finish",
        "Swissknife Sync: Exporting repository manifest",
        f"Statistics stored at: {fake.spool_dir(REPO)}/stats.db",
        f"Tagging {REPO}",
        "Flushing file system buffers",
        "Signing new manifest",
        "Remounting newly created repository revision",
    ]
    assert result.stdout.startswith("Using auto tag 'generic")
    assert fake.revision(REPO) == 2
    tree = fake.published_tree(REPO)
    assert tree["hello.txt"].content == b"hello world\n"
    assert tree["sub/dir/nested.txt"].content == b"nested\n"
    assert tree["sub/dir/tool"].mode == 0o755
    assert tree["sub"].type == "dir"
    assert tree["link"].type == "symlink"
    assert tree["link"].target == "hello.txt"
    assert tree["empty"].content == b""
    assert fake.read_file(REPO, "link") == b"hello world\n"
    state = fake.state(REPO)
    assert state["mount_mode"] == "ro"
    assert state["in_transaction_lock"] is False
    assert state["spool_files"] == RECORDED_SPOOL


def test_published_objects_are_zlib_named_by_sha1_of_stored_bytes(fake: FakeStratum0) -> None:
    """A normal file becomes one zlib object named by the SHA-1 of the compressed bytes."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "data.txt").write_bytes(b"payload" * 100)
    fake.check_run("publish", REPO)
    entry = fake.published_tree(REPO)["data.txt"]
    assert entry.compression == "zlib"
    assert entry.hash is not None
    stored = fake.object_path(REPO, entry.hash).read_bytes()
    assert sha1(stored) == entry.hash
    assert zlib.decompress(stored) == b"payload" * 100


def test_every_revision_stays_readable(fake: FakeStratum0) -> None:
    """Older revisions keep their content in the client view after later publishes."""
    union = fake.union_dir(REPO)
    for text in ("one", "two", "three"):
        fake.check_run("transaction", REPO)
        (union / "file.txt").write_text(text)
        fake.check_run("publish", REPO)
    assert fake.revisions(REPO) == [0, 1, 2, 3, 4]
    assert fake.read_file(REPO, "file.txt", revision=2) == b"one"
    assert fake.read_file(REPO, "file.txt", revision=3) == b"two"
    assert fake.read_file(REPO, "file.txt") == b"three"
    assert "file.txt" not in fake.published_tree(REPO, revision=1)


def test_publish_removes_deleted_paths(fake: FakeStratum0) -> None:
    """Files and directories deleted in a transaction disappear from the next revision."""
    union = fake.union_dir(REPO)
    fake.check_run("transaction", REPO)
    (union / "gone").mkdir()
    (union / "gone" / "x.txt").write_text("x")
    (union / "stays.txt").write_text("s")
    fake.check_run("publish", REPO)
    fake.check_run("transaction", REPO)
    (union / "gone" / "x.txt").unlink()
    (union / "gone").rmdir()
    fake.check_run("publish", REPO)
    assert sorted(fake.published_tree(REPO)) == ["new_repository", "stays.txt"]


def test_publish_without_transaction_reports_on_stdout(fake: FakeStratum0) -> None:
    """publish outside a transaction: exit 1, the message on stdout, nothing on stderr."""
    result = fake.run("publish", "-m", "x", REPO)
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        f"Repository {REPO} is not in a transaction\n",
        "",
    )


def test_abort_without_transaction_exits_22(fake: FakeStratum0) -> None:
    """abort -f outside a transaction exits 22; without -f the question comes first."""
    result = fake.run("abort", "-f", REPO)
    assert (result.returncode, result.stdout, result.stderr) == (
        22,
        "",
        f"Repository {REPO} is not in a transaction\n",
    )
    result = fake.run("abort", REPO)
    assert result.returncode == 22
    assert result.stdout.endswith("Are you sure (y/N)? ")


def test_abort_answers_from_stdin(fake: FakeStratum0) -> None:
    """abort without -f: `n` exits 4 and keeps the transaction, EOF aborts with exit 0."""
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    (union / "discard.txt").write_text("discard me")
    result = fake.run("abort", REPO, stdin=b"n\n")
    assert result.returncode == 4
    assert fake.in_transaction(REPO)
    result = fake.run("abort", REPO, stdin=b"")
    assert result.returncode == 0
    assert "CernVM-FS: mounted cvmfs on" in result.stdout
    assert not fake.in_transaction(REPO)
    assert not (union / "discard.txt").exists()
    assert fake.state(REPO)["mount_mode"] == "ro"


def test_abort_restores_modified_and_deleted_files(fake: FakeStratum0) -> None:
    """abort -f brings back deleted and modified published files with their content."""
    union = fake.union_dir(REPO)
    fake.check_run("transaction", REPO)
    (union / "keep.txt").write_text("original")
    (union / "d").mkdir()
    (union / "d" / "inner.txt").write_text("inner")
    fake.check_run("publish", REPO)
    fake.check_run("transaction", REPO)
    (union / "keep.txt").write_text("changed!")
    (union / "d" / "inner.txt").unlink()
    (union / "d").rmdir()
    (union / "new").mkdir()
    result = fake.run("abort", "-f", REPO)
    assert result.returncode == 0
    assert (union / "keep.txt").read_text() == "original"
    assert (union / "d" / "inner.txt").read_text() == "inner"
    assert not (union / "new").exists()


def test_client_view_raises_eio_for_missing_object(fake: FakeStratum0) -> None:
    """A file whose object was deleted from the storage fails with EIO like the client."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "small.txt").write_text("small")
    fake.check_run("publish", REPO)
    entry = fake.published_tree(REPO)["small.txt"]
    assert entry.hash is not None
    fake.object_path(REPO, entry.hash).unlink()
    with pytest.raises(OSError, match="cannot be fetched") as info:
        fake.read_file(REPO, "small.txt")
    assert info.value.errno == errno.EIO
    assert fake.published_tree(REPO)["small.txt"].error == errno.EIO


def test_write_outside_transaction_is_logged_and_reverted(fake: FakeStratum0) -> None:
    """A change to the union dir outside a transaction lands in the violations log."""
    union = fake.union_dir(REPO)
    (union / "sneaky.txt").write_text("not allowed")
    (union / "new_repository").write_text("tampered")
    assert fake.violations() == []
    log = fake.scan_violations(REPO)
    assert any("added /sneaky.txt" in line for line in log)
    assert any("modified /new_repository" in line for line in log)
    assert not (union / "sneaky.txt").exists()
    assert (union / "new_repository").read_text().startswith("New CernVM-FS repository")
    fake.check_run("transaction", REPO)
    fake.check_run("publish", REPO)
    assert "sneaky.txt" not in fake.published_tree(REPO)


def test_wrapper_script_is_executable_and_points_at_root(fake: FakeStratum0) -> None:
    """server_command is an executable wrapper that runs the fake with --root ROOT."""
    assert os.access(fake.server_command, os.X_OK)
    result = subprocess.run(
        [str(fake.server_command), "list"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout == f"{REPO} (stratum0 / local)  \n"
