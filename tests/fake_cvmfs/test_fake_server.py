"""Behaviour of the fake ``cvmfs_server`` and of ``FakeStratum0`` (see docs/fake-cvmfs.md)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_cvmfs import server as engine
from tests.fake_cvmfs.stratum0 import CALIBRATED_COSTS, FakeStratum0

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


# -- transaction: retries, orphans, path scopes --------------------------------------------


def test_transaction_timeout_retries_on_stdout_then_exits_17(fake: FakeStratum0) -> None:
    """transaction -t N prints `repository busy, retrying` on stdout and gives up with 17."""
    fake.check_run("transaction", REPO)
    started = time.monotonic()
    result = fake.run("transaction", "-t", "1", REPO)
    assert time.monotonic() - started >= 1
    assert result.returncode == 17
    lines = result.stdout.splitlines()
    assert lines
    assert set(lines) == {"repository busy, retrying"}
    assert result.stderr == "CernVM-FS transaction error: another transaction is already open\n"


def test_transaction_timeout_succeeds_once_the_repository_is_free(fake: FakeStratum0) -> None:
    """A waiting transaction -t opens the transaction as soon as the other one ends."""
    fake.check_run("transaction", REPO)
    waiter = subprocess.Popen(
        [str(fake.server_command), "transaction", "-t", "30", REPO],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: len(fake.orphans()) >= 2)
        fake.check_run("abort", "-f", REPO)
        stdout, _ = waiter.communicate(timeout=20)
    finally:
        waiter.kill()
    assert waiter.returncode == 0
    assert b"repository busy, retrying" in stdout
    assert fake.in_transaction(REPO)


def test_killed_transaction_waiter_leaves_an_orphan_that_opens_later(fake: FakeStratum0) -> None:
    """Killing only the `transaction -t 0` process leaves its child retrying (b_double 4)."""
    fake.check_run("transaction", REPO)
    waiter = subprocess.Popen(
        [str(fake.server_command), "transaction", "-t", "0", REPO],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: len(fake.orphans()) >= 2)
    waiter.kill()
    waiter.wait()
    assert fake.orphans(), "the retrying child should survive its parent"
    fake.check_run("abort", "-f", REPO)
    wait_until(lambda: fake.in_transaction(REPO))
    wait_until(lambda: not fake.orphans())
    assert fake.run("transaction", REPO).returncode == 17


def test_killing_the_process_group_stops_the_waiter(fake: FakeStratum0) -> None:
    """A caller that kills the whole process group leaves no retrying child behind."""
    fake.check_run("transaction", REPO)
    waiter = subprocess.Popen(
        [str(fake.server_command), "transaction", "-t", "0", REPO],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(lambda: len(fake.orphans()) >= 2)
    os.killpg(waiter.pid, 9)
    waiter.wait()
    wait_until(lambda: not fake.orphans())
    fake.check_run("abort", "-f", REPO)
    assert not fake.in_transaction(REPO)


def test_path_scoped_transaction_names_the_missing_parent(fake: FakeStratum0) -> None:
    """transaction R/does/not/exist exits 2 naming /does/not and opens nothing."""
    result = fake.run("transaction", f"{REPO}/does/not/exist")
    assert result.returncode == 2
    assert result.stderr == (
        "CernVM-FS transaction error: cannot open transaction on non-existing path /does/not\n"
    )
    assert not fake.in_transaction(REPO)


def test_path_scope_does_not_restrict_publish(fake: FakeStratum0) -> None:
    """A scope whose leaf is missing or a file is accepted, and publish takes everything."""
    assert fake.run("transaction", f"{REPO}/new_repository").returncode == 0
    fake.check_run("abort", "-f", REPO)
    assert fake.run("transaction", f"{REPO}/newdir").returncode == 0
    union = fake.union_dir(REPO)
    (union / "newdir").mkdir()
    (union / "newdir" / "in.txt").write_text("in scope")
    (union / "outside.txt").write_text("out of scope")
    assert fake.run("publish", f"{REPO}/newdir").returncode == 0
    tree = fake.published_tree(REPO)
    assert "newdir/in.txt" in tree
    assert "outside.txt" in tree


# -- publish blockers ---------------------------------------------------------------------


def test_open_writable_fd_blocks_publish_even_with_force(fake: FakeStratum0) -> None:
    """A process writing below the union dir blocks publish (also -f); the txn stays open."""
    fake.check_run("transaction", REPO)
    held = fake.union_dir(REPO) / "held"
    writer = subprocess.Popen(["/bin/sh", "-c", f"exec sleep 60 > '{held}'"])
    try:
        wait_until(held.exists)
        for args in (("publish", REPO), ("publish", "-f", REPO)):
            result = fake.run(*args)
            assert result.returncode == 1
            assert result.stdout == f"Open writable file descriptors on {REPO}\n"
            assert fake.in_transaction(REPO)
    finally:
        writer.kill()
        writer.wait()
    assert fake.run("publish", REPO).returncode == 0
    assert fake.published_tree(REPO)["held"].content == b""


def test_open_readonly_fd_asks_and_force_proceeds(fake: FakeStratum0) -> None:
    """A reader below the union dir: publish asks (EOF -> `aborted.`), publish -f goes on."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "new.txt").write_text("new")
    target = fake.union_dir(REPO) / "new_repository"
    reader = subprocess.Popen(["/bin/sh", "-c", f"exec sleep 60 < '{target}'"])
    try:
        wait_until(lambda: any(str(target) in line for line in _readers(reader.pid)))
        result = fake.run("publish", REPO, stdin=b"")
        assert result.returncode == 1
        assert "WARNING! There are open read-only file descriptors in" in result.stdout
        assert f"sleep      {reader.pid}  " in result.stdout
        assert result.stdout.endswith("Do you want to proceed anyway? (y/N) aborted.\n")
        assert fake.in_transaction(REPO)
        result = fake.run("publish", REPO, stdin=b"n\n")
        assert result.returncode == 1
        result = fake.run("publish", "-f", REPO)
        assert result.returncode == 0
        assert "WARNING: Open file descriptors on" in result.stdout
        assert "(possible race!)" in result.stdout
    finally:
        reader.kill()
        reader.wait()
    assert fake.published_tree(REPO)["new.txt"].content == b"new"


def _readers(pid: int) -> list[str]:
    """Targets of the open fds of a process."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(str(fd.readlink()))
        except OSError:
            continue
    return targets


def test_cwd_inside_union_blocks_publish_and_abort(fake: FakeStratum0) -> None:
    """A caller whose cwd is below the union dir cannot publish or abort -f (exit 1)."""
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    (union / "sub").mkdir()
    message = f"Current working directory is in {union}.  Please release, e.g. by 'cd $HOME'.\n"
    for cwd, args in ((union, ("publish", REPO)), (union / "sub", ("abort", "-f", REPO))):
        result = fake.run(*args, cwd=cwd)
        assert (result.returncode, result.stdout) == (1, message)
    assert fake.in_transaction(REPO)
    assert fake.run("publish", REPO, cwd=fake.root).returncode == 0


# -- tags and garbage collection ------------------------------------------------------------


@pytest.fixture
def gc_fake(fake: FakeStratum0) -> FakeStratum0:
    """The fake with a garbage-collectable repository refgc.local after three publishes."""
    fake.mkfs("refgc.local", gc=True)
    union = fake.union_dir("refgc.local")
    for number in (1, 2, 3):
        fake.check_run("transaction", "refgc.local")
        (union / "file.txt").write_text(f"version {number} of a file\n")
        (union / f"extra-{number}.txt").write_text(f"extra {number}\n")
        (union / f"extra-{number - 1}.txt").unlink(missing_ok=True)
        fake.check_run("publish", "-m", f"publish {number}", "refgc.local")
    return fake


def data_objects(fake: FakeStratum0, repo: str) -> set[str]:
    """Names of every object in a repository's storage."""
    data = fake.storage_dir(repo) / "data"
    return {p.parent.name + p.name for p in data.glob("??/*")}


def test_auto_tags_and_undo_tags_follow_publishes(gc_fake: FakeStratum0) -> None:
    """Each publish adds a generic tag; trunk/trunk-previous point at the last two revisions."""
    tags = gc_fake.tags("refgc.local")
    assert tags["trunk"] == 4
    assert tags["trunk-previous"] == 3
    generic = sorted(rev for name, rev in tags.items() if name.startswith("generic"))
    assert generic == [1, 2, 3, 4]
    listing = gc_fake.run("tag", "-l", "refgc.local").stdout.splitlines()
    assert listing[0].startswith("Name ")
    assert listing[-1] == "listing contains 6 tags"
    assert [line.split("│")[1].strip() for line in listing[2:-2]] == ["1", "2", "3", "3", "4", "4"]
    machine = gc_fake.run("tag", "-lx", "refgc.local").stdout.splitlines()
    assert machine[0].split()[3] == "4"
    assert "(default) publish 3" in machine[0]


def test_tag_add_inspect_and_remove(gc_fake: FakeStratum0) -> None:
    """tag -a/-i/-r behave as recorded; undo tags cannot be removed (exit 1)."""
    assert gc_fake.run("tag", "-a", "mytag", "-m", "my named tag", "refgc.local").returncode == 0
    info = gc_fake.run("tag", "-i", "mytag", "refgc.local").stdout.splitlines()
    assert info[0] == "Name:         mytag"
    assert info[1] == "Revision:     4"
    assert info[-1] == "my named tag"
    removed = gc_fake.run("tag", "-r", "mytag", "-f", "refgc.local")
    assert removed.stdout == f"deleting 'mytag' ({gc_fake.root_hash('refgc.local')})\n"
    assert "mytag" not in gc_fake.tags("refgc.local")
    result = gc_fake.run("tag", "-r", "trunk", "-f", "refgc.local")
    assert result.returncode == 1
    assert result.stderr == (
        "undo tags are handled internally and cannot be deleted\nDid not remove anything\n"
    )
    assert gc_fake.revision("refgc.local") == 4


def test_gc_keeps_every_tagged_revision(gc_fake: FakeStratum0) -> None:
    """With auto tags present gc (also -r 0) only sweeps mkfs's untagged revision 0."""
    before = data_objects(gc_fake, "refgc.local")
    result = gc_fake.run("gc", "-f", "refgc.local")
    assert result.returncode == 0
    assert data_objects(gc_fake, "refgc.local") == before
    result = gc_fake.run("gc", "-r", "0", "-f", "-l", "refgc.local")
    assert result.returncode == 0
    assert "Sweeping Revision 0 " in result.stdout
    assert "Sweeping Revision 1 " not in result.stdout
    for revision in (1, 2, 3):
        assert gc_fake.read_file("refgc.local", "file.txt", revision=revision + 1)


def test_gc_sweeps_objects_of_untagged_revisions(gc_fake: FakeStratum0) -> None:
    """After removing the auto tags gc sweeps old catalogs and objects no kept revision uses."""
    for name in list(gc_fake.tags("refgc.local")):
        if name.startswith("generic"):
            gc_fake.check_run("tag", "-r", name, "-f", "refgc.local")
    old = gc_fake.published_tree("refgc.local", revision=2)["file.txt"].hash
    assert old is not None
    result = gc_fake.run("gc", "-r", "0", "-f", "-l", "refgc.local")
    assert result.returncode == 0
    assert f"Sweep: {old}\n" in result.stdout
    assert not gc_fake.object_path("refgc.local", old).exists()
    with pytest.raises(FileNotFoundError):
        gc_fake.published_tree("refgc.local", revision=2)
    assert gc_fake.read_file("refgc.local", "file.txt", revision=3) == b"version 2 of a file\n"
    assert gc_fake.run("check", "refgc.local").returncode == 0


def test_gc_never_removes_objects_no_catalog_referenced(gc_fake: FakeStratum0) -> None:
    """An uploaded object that no catalog ever referenced survives every gc (n 103-127)."""
    orphan = "88004ec76b2cc287bf0e1908c8ecce77f34e496e"
    gc_fake.put_object("refgc.local", orphan, b"never referenced")
    for name in list(gc_fake.tags("refgc.local")):
        if name.startswith("generic"):
            gc_fake.check_run("tag", "-r", name, "-f", "refgc.local")
    gc_fake.check_run("gc", "-r", "0", "-f", "refgc.local")
    assert gc_fake.object_path("refgc.local", orphan).exists()


def test_gc_dry_run_deletes_nothing(gc_fake: FakeStratum0) -> None:
    """gc -d lists what it would sweep but keeps every object and prints no statistics line."""
    before = data_objects(gc_fake, "refgc.local")
    result = gc_fake.run("gc", "-d", "-f", "-l", "-r", "0", "refgc.local")
    assert result.returncode == 0
    assert "Dry Run (no actual deletion):  yes\n" in result.stdout
    assert "Sweep: " in result.stdout
    assert "Statistics stored at" not in result.stdout
    assert data_objects(gc_fake, "refgc.local") == before


def test_gc_refusals(gc_fake: FakeStratum0) -> None:
    """gc: no -z -> not enabled; in a transaction -> refused; EOF at the prompt -> exit 1."""
    result = gc_fake.run("gc", "-f", REPO)
    assert result.returncode == 1
    assert result.stdout.startswith(f"Affected Repositories:          {REPO}\n")
    assert result.stderr == f"Garbage Collection is not enabled for {REPO}\n"
    result = gc_fake.run("gc", "refgc.local", stdin=b"")
    assert result.returncode == 1
    assert result.stdout.startswith("YOU ARE ABOUT TO DELETE DATA! Are you sure")
    assert result.stdout.endswith("\n\n")
    gc_fake.check_run("transaction", "refgc.local")
    result = gc_fake.run("gc", "-f", "refgc.local")
    assert result.returncode == 1
    assert result.stderr == "Cannot run garbage collection while in a transaction\n"
    assert gc_fake.run("gc", "-d", "-f", "refgc.local").returncode == 0
    result = gc_fake.run("gc", "-f", "nosuch.local")
    assert (result.returncode, result.stderr) == (
        1,
        "The repository nosuch.local does not exist.\n",
    )


def test_running_gc_holds_transaction_and_collecting_locks(gc_fake: FakeStratum0) -> None:
    """While gc runs the spool has both locks and a transaction attempt exits 17 (o 5, 6)."""
    gc_fake.inject_fault("gc", "hang", at="locked", times=1)
    spool = gc_fake.spool_dir("refgc.local")
    gc = subprocess.Popen(
        [str(gc_fake.server_command), "gc", "-r", "0", "-f", "refgc.local"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until((spool / "is_collecting.lock").exists)
        assert (spool / "in_transaction.lock").exists()
        result = gc_fake.run("transaction", "refgc.local")
        assert result.returncode == 17
        assert "- in transaction" in gc_fake.run("list").stdout
    finally:
        os.killpg(gc.pid, 9)
        gc.wait()
    assert gc_fake.faults() == []


# -- automatic gc inside publish (faults.md F10) ----------------------------------------------

GC_REPO = "refgc.local"
PAYLOAD = b"an object that outlives the revision that published it\n" * 40
DAY = 86400


@pytest.fixture
def auto_gc_fake(fake: FakeStratum0) -> FakeStratum0:
    """refgc.local (mkfs -z -g) whose revision 2 alone references the object of PAYLOAD.

    Revision 2 publishes payload.bin, revision 3 deletes it (revision 2 is then
    trunk-previous), revision 4 changes nothing (trunk-previous moves on). Without auto tags
    revision 2 is untagged; the clock then runs four days ahead, so revision 2 is older than
    the auto-gc timespan (3 days) and mkfs's last_gc older than the lapse (1 day).
    """
    fake.mkfs(GC_REPO, gc=True, auto_tag=False)
    union = fake.union_dir(GC_REPO)
    fake.check_run("transaction", GC_REPO)
    (union / "payload.bin").write_bytes(PAYLOAD)
    fake.check_run("publish", GC_REPO)
    fake.check_run("transaction", GC_REPO)
    (union / "payload.bin").unlink()
    fake.check_run("publish", GC_REPO)
    fake.check_run("transaction", GC_REPO)
    fake.check_run("publish", GC_REPO)
    assert fake.tags(GC_REPO) == {"trunk": 4, "trunk-previous": 3}
    fake.set_clock_offset(4 * DAY)
    return fake


def payload_object(fake: FakeStratum0) -> str:
    """Name of the object revision 2 of auto_gc_fake stores payload.bin in."""
    name = fake.published_tree(GC_REPO, revision=2)["payload.bin"].hash
    assert name is not None
    assert fake.object_path(GC_REPO, name).exists()
    return name


def auto_gc_ran(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether a publish's output shows the automatic gc, in the recorded place."""
    lines = result.stdout.splitlines()
    if "Running automatic garbage collection" not in lines:
        return False
    start = lines.index("Running automatic garbage collection")
    assert lines[start - 1] == "Signing new manifest"
    assert lines[start + 1].startswith("  --> marking unreferenced objects [")
    assert lines[start + 2].startswith("  --> sweeping unreferenced objects [")
    assert lines[start + 3].startswith("  --> done garbage collecting [")
    assert lines[start + 4].startswith("Statistics stored at: ")
    assert lines[start + 5 :] == ["Remounting newly created repository revision"]
    return True


@pytest.mark.timeout(60)
def test_mkfs_z_records_a_gc(fake: FakeStratum0) -> None:
    """mkfs -z leaves .cvmfs_status.json (k 5): its initial commit's automatic gc ran."""
    fake.mkfs(GC_REPO, gc=True)
    last_gc = fake.last_gc(GC_REPO)
    assert last_gc is not None
    assert abs(last_gc - fake.now()) < 5
    assert fake.last_gc(REPO) is None


@pytest.mark.timeout(60)
def test_auto_gc_in_publish_sweeps_collectable_revisions(auto_gc_fake: FakeStratum0) -> None:
    """Due auto gc: publish prints the gc lines, exits 0, sweeps like `gc`, updates last_gc.

    An object no catalog ever referenced is not deleted (it leaks, n 127).
    """
    fake = auto_gc_fake
    name = payload_object(fake)
    orphan = sha1(b"uploaded, never published")
    fake.put_object(GC_REPO, orphan, b"uploaded, never published")
    fake.check_run("transaction", GC_REPO)
    (fake.union_dir(GC_REPO) / "other.txt").write_text("unrelated\n")
    result = fake.run("publish", GC_REPO)
    assert result.returncode == 0, result.stderr
    assert auto_gc_ran(result)
    assert not fake.object_path(GC_REPO, name).exists()
    for revision in (1, 2, 3):
        with pytest.raises(FileNotFoundError):
            fake.catalog(GC_REPO, revision=revision)
    assert fake.read_file(GC_REPO, "other.txt", revision=4 + 1) == b"unrelated\n"
    assert sorted(fake.published_tree(GC_REPO, revision=4)) == ["new_repository"]
    assert fake.object_path(GC_REPO, orphan).exists()
    last_gc = fake.last_gc(GC_REPO)
    assert last_gc is not None
    assert abs(last_gc - fake.now()) < 5
    assert not fake.in_transaction(GC_REPO)
    assert fake.run("check", GC_REPO).returncode == 0


@pytest.mark.timeout(60)
def test_auto_gc_keeps_an_object_the_new_revision_grafts(auto_gc_fake: FakeStratum0) -> None:
    """A graft marker of the publishing transaction saves an object only an old revision had.

    The real publish signs the new manifest before its automatic gc, and gc always keeps the
    latest revision, so the new graft's object is marked as referenced; only the old
    catalogs go.
    """
    fake = auto_gc_fake
    name = payload_object(fake)
    fake.check_run("transaction", GC_REPO)
    fake.write_graft(GC_REPO, "again.bin", size=len(PAYLOAD), checksum=name, compression="zlib")
    result = fake.run("publish", GC_REPO)
    assert result.returncode == 0, result.stderr
    assert auto_gc_ran(result)
    with pytest.raises(FileNotFoundError):
        fake.catalog(GC_REPO, revision=2)
    assert fake.object_path(GC_REPO, name).exists()
    assert fake.read_file(GC_REPO, "again.bin") == PAYLOAD
    assert fake.run("check", GC_REPO).returncode == 0


@pytest.mark.timeout(60)
def test_auto_gc_removes_an_object_before_a_later_graft_uses_it(
    auto_gc_fake: FakeStratum0,
) -> None:
    """An object seen in storage before a publish whose auto gc sweeps it is gone afterwards.

    A graft marker written later still publishes (publish never looks at objects, n 47),
    but clients get EIO and `check` reports the object missing.
    """
    fake = auto_gc_fake
    name = payload_object(fake)
    fake.check_run("transaction", GC_REPO)
    assert auto_gc_ran(fake.check_run("publish", GC_REPO))
    assert not fake.object_path(GC_REPO, name).exists()
    fake.check_run("transaction", GC_REPO)
    fake.write_graft(GC_REPO, "late.bin", size=len(PAYLOAD), checksum=name, compression="zlib")
    result = fake.run("publish", GC_REPO)
    assert result.returncode == 0
    assert not auto_gc_ran(result)
    with pytest.raises(OSError, match="cannot be fetched") as caught:
        fake.read_file(GC_REPO, "late.bin")
    assert caught.value.errno == errno.EIO
    assert f"data chunk {name} (/late.bin) missing\n" in fake.run("check", GC_REPO).stderr


@pytest.mark.timeout(60)
def test_auto_gc_not_due_or_not_enabled(auto_gc_fake: FakeStratum0) -> None:
    """No auto gc within the lapse of the last gc, nor with CVMFS_AUTO_GC or gc disabled."""
    fake = auto_gc_fake
    name = payload_object(fake)
    before = fake.last_gc(GC_REPO)
    fake.set_clock_offset(DAY - 3600)  # mkfs's gc was 23 h ago
    fake.check_run("transaction", GC_REPO)
    assert not auto_gc_ran(fake.check_run("publish", GC_REPO))
    fake.set_clock_offset(4 * DAY)
    for key in ("CVMFS_AUTO_GC", "CVMFS_GARBAGE_COLLECTION"):
        fake.set_config(GC_REPO, key, "false")
        fake.check_run("transaction", GC_REPO)
        assert not auto_gc_ran(fake.check_run("publish", GC_REPO))
        fake.set_config(GC_REPO, key, "true")
    assert fake.object_path(GC_REPO, name).exists()
    assert fake.last_gc(GC_REPO) == before
    fake.check_run("gc", "-f", GC_REPO)
    assert not fake.object_path(GC_REPO, name).exists()
    fake.set_clock_offset(5 * DAY - 7200)  # the manual gc was 22 h ago
    fake.check_run("transaction", GC_REPO)
    assert not auto_gc_ran(fake.check_run("publish", GC_REPO))


@pytest.mark.timeout(60)
def test_auto_gc_lapse_setting_and_missing_status(auto_gc_fake: FakeStratum0) -> None:
    """CVMFS_AUTO_GC_LAPSE is read like `date --date`; no last_gc at all means due."""
    fake = auto_gc_fake
    fake.set_config(GC_REPO, "CVMFS_AUTO_GC_LAPSE", '"5 days ago"')
    fake.check_run("transaction", GC_REPO)
    assert not auto_gc_ran(fake.check_run("publish", GC_REPO))
    (fake.storage_dir(GC_REPO) / ".cvmfs_status.json").unlink()
    fake.check_run("transaction", GC_REPO)
    assert auto_gc_ran(fake.check_run("publish", GC_REPO))
    fake.set_config(GC_REPO, "CVMFS_AUTO_GC_LAPSE", '"1 hour ago"')
    fake.set_clock_offset(4 * DAY + 7200)
    fake.check_run("transaction", GC_REPO)
    assert auto_gc_ran(fake.check_run("publish", GC_REPO))


@pytest.mark.timeout(60)
def test_auto_gc_unparsable_settings(auto_gc_fake: FakeStratum0) -> None:
    """The script's parse failures: a bad lapse or last_gc means due (with a message), a
    bad CVMFS_AUTO_GC_TIMESPAN stops every publish before it starts (exit 1)."""
    fake = auto_gc_fake
    fake.set_config(GC_REPO, "CVMFS_AUTO_GC_LAPSE", "whenever")
    fake.check_run("transaction", GC_REPO)
    result = fake.check_run("publish", GC_REPO)
    assert auto_gc_ran(result)
    assert result.stderr == "Failed to parse CVMFS_AUTO_GC_LAPSE: 'whenever'\n"
    fake.set_config(GC_REPO, "CVMFS_AUTO_GC_LAPSE", '"1 day ago"')
    (fake.storage_dir(GC_REPO) / ".cvmfs_status.json").write_text('{"last_gc": "never"}')
    fake.check_run("transaction", GC_REPO)
    result = fake.check_run("publish", GC_REPO)
    assert auto_gc_ran(result)
    assert result.stderr == "Failed to parse last gc timestamp: ''\n"
    fake.set_config(REPO, "CVMFS_AUTO_GC_TIMESPAN", "someday")
    fake.check_run("transaction", REPO)
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "Failed to parse CVMFS_AUTO_GC_TIMESPAN: 'someday'\n"
    assert fake.in_transaction(REPO)


@pytest.mark.timeout(60)
def test_auto_gc_runs_in_the_publish_transaction(auto_gc_fake: FakeStratum0) -> None:
    """During auto gc both publish locks exist and no is_collecting.lock (no gc lock taken)."""
    fake = auto_gc_fake
    name = payload_object(fake)
    spool = fake.spool_dir(GC_REPO)
    fake.inject_fault("publish", "hang", at="sweep", times=1)
    fake.check_run("transaction", GC_REPO)
    publish = subprocess.Popen(
        [str(fake.server_command), "publish", GC_REPO],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: fake.faults() == [])
        wait_until(lambda: fake.revision(GC_REPO) == 5)
        state = fake.state(GC_REPO)
        assert state["in_transaction_lock"]
        assert state["is_publishing_lock"]
        assert not (spool / "is_collecting.lock").exists()
        assert fake.object_path(GC_REPO, name).exists()
    finally:
        os.killpg(publish.pid, 9)
        publish.wait()


@pytest.mark.timeout(60)
def test_auto_gc_failure_keeps_the_new_revision_and_the_transaction(
    auto_gc_fake: FakeStratum0,
) -> None:
    """A failing auto gc: `Garbage collection failed (6)`, exit 1, the revision is already up,
    the transaction stays open, last_gc is unchanged."""
    fake = auto_gc_fake
    before = fake.last_gc(GC_REPO)
    fake.inject_fault("publish", "fail", at="auto_gc", times=1)
    fake.check_run("transaction", GC_REPO)
    result = fake.run("publish", GC_REPO)
    assert result.returncode == 1
    assert result.stdout.endswith("Signing new manifest\nRunning automatic garbage collection\n")
    assert result.stderr == "Garbage collection failed (6)\n"
    state = fake.state(GC_REPO)
    assert (state["revision"], state["in_transaction_lock"]) == (5, True)
    assert not state["is_publishing_lock"]
    assert fake.last_gc(GC_REPO) == before
    result = fake.run("publish", GC_REPO)
    assert result.returncode == 0
    assert auto_gc_ran(result)


def test_auto_tag_timespan_expires_old_auto_tags(fake: FakeStratum0) -> None:
    """CVMFS_AUTO_TAG_TIMESPAN='N days ago' drops older generic tags at the next publish."""
    fake.set_config(REPO, "CVMFS_AUTO_TAG_TIMESPAN", '"2 days ago"')
    fake.set_clock(fake.now() + 3 * 86400)
    fake.check_run("transaction", REPO)
    fake.check_run("publish", REPO)
    generic = [name for name in fake.tags(REPO) if name.startswith("generic")]
    assert len(generic) == 1
    assert fake.tags(REPO)[generic[0]] == 2


def test_disabled_auto_tagging_prints_no_auto_tag(fake: FakeStratum0) -> None:
    """A repository made with auto_tag=False publishes without `Using auto tag`."""
    fake.mkfs("notag.local", auto_tag=False)
    assert fake.config("notag.local")["CVMFS_AUTO_TAG"] == "false"
    fake.check_run("transaction", "notag.local")
    result = fake.check_run("publish", "notag.local")
    assert not result.stdout.startswith("Using auto tag")
    assert set(fake.tags("notag.local")) == {"trunk", "trunk-previous"}


# -- calibrated command costs --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_calibrated_costs_reproduce_the_measurements() -> None:
    """The constants give back the real tool's timings they were derived from (docs)."""
    publish = CALIBRATED_COSTS["publish"]
    files = 10_000
    copied = publish["base"] + files * publish["per_file"]
    assert 4.9 <= copied <= 5.0
    assert publish["base"] + files * publish["per_graft"] == pytest.approx(2.2)
    locked = publish["base"] + files * (publish["per_file"] - publish["unlocked_per_file"])
    # transaction; cp -a (0.8 s); publish: the transaction lock existed for 4.8 s
    assert CALIBRATED_COSTS["transaction"]["base"] + 0.8 + locked == pytest.approx(4.8, abs=0.05)


@pytest.mark.timeout(60)
def test_costs_are_off_by_default_and_validated(fake: FakeStratum0) -> None:
    """No fake-costs.json unless set; set_costs(None) removes it; typos are refused."""
    assert not (fake.root / "fake-costs.json").exists()
    assert fake.costs() == {}
    fake.set_costs(CALIBRATED_COSTS)
    assert fake.costs() == CALIBRATED_COSTS
    fake.set_costs(None)
    assert fake.costs() == {}
    with pytest.raises(ValueError, match="no costs for command"):
        fake.set_costs({"abort": {"base": 1.0}})
    with pytest.raises(ValueError, match="invalid cost"):
        fake.set_costs({"publish": {"per_files": 1.0}})
    with pytest.raises(ValueError, match="invalid cost"):
        fake.set_costs({"transaction": {"base": -1.0}})


def timed_publish(fake: FakeStratum0) -> float:
    """Run a successful publish of REPO; return its wall time."""
    started = time.monotonic()
    fake.check_run("publish", REPO)
    return time.monotonic() - started


@pytest.mark.timeout(60)
def test_costs_make_copied_files_dearer_than_graft_markers(fake: FakeStratum0) -> None:
    """A publish lasts at least base + n x cost: copied files cost more than graft markers."""
    count = 10
    costs = {"base": 0.1, "per_file": 0.1, "per_graft": 0.01}
    fake.set_costs({"publish": costs})
    union = fake.union_dir(REPO)
    fake.check_run("transaction", REPO)
    for index in range(count):
        (union / f"copied-{index}.txt").write_text(f"copied file {index}\n")
    copied = timed_publish(fake)
    fake.check_run("transaction", REPO)
    for index in range(count):
        data = f"grafted file {index}\n".encode()
        fake.write_graft(REPO, f"grafted-{index}.txt", size=len(data), checksum=sha1(data))
    grafted = timed_publish(fake)
    assert copied >= costs["base"] + count * costs["per_file"]
    assert grafted >= costs["base"] + count * costs["per_graft"]
    assert grafted < copied
    assert len(fake.published_tree(REPO)) == 1 + 2 * count


@pytest.mark.timeout(60)
def test_costs_hold_the_transaction_lock_until_the_flush(fake: FakeStratum0) -> None:
    """The padding keeps in_transaction.lock for the locked part; the flush part follows it."""
    count = 10
    costs = {"base": 0.1, "per_file": 0.1, "unlocked_per_file": 0.05}
    fake.set_costs({"publish": costs})
    lock = fake.spool_dir(REPO) / "in_transaction.lock"
    fake.check_run("transaction", REPO)
    for index in range(count):
        (fake.union_dir(REPO) / f"f{index}").write_text(f"{index}\n")
    started = time.monotonic()
    publish = subprocess.Popen(
        [str(fake.server_command), "publish", REPO],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: not lock.exists())
        unlocked = time.monotonic() - started
        still_running = publish.poll() is None
        publish.wait(timeout=30)
    finally:
        if publish.poll() is None:
            os.killpg(publish.pid, 9)
            publish.wait()
    finished = time.monotonic() - started
    assert publish.returncode == 0
    assert unlocked >= costs["base"] + count * (costs["per_file"] - costs["unlocked_per_file"])
    assert still_running
    assert finished >= costs["base"] + count * costs["per_file"]
    assert fake.revision(REPO) == 2


@pytest.mark.timeout(60)
def test_costs_pad_transaction_with_the_lock_held(fake: FakeStratum0) -> None:
    """transaction lasts at least its base; the lock exists while it waits."""
    fake.set_costs({"transaction": {"base": 0.6}})
    lock = fake.spool_dir(REPO) / "in_transaction.lock"
    started = time.monotonic()
    transaction = subprocess.Popen(
        [str(fake.server_command), "transaction", REPO], start_new_session=True
    )
    try:
        wait_until(lock.exists)
        still_running = transaction.poll() is None
        transaction.wait(timeout=30)
    finally:
        if transaction.poll() is None:
            os.killpg(transaction.pid, 9)
            transaction.wait()
    assert transaction.returncode == 0
    assert still_running
    assert time.monotonic() - started >= 0.6
    assert fake.in_transaction(REPO)


# -- whitelist, resign, clock ------------------------------------------------------------------


def test_resign_variants(fake: FakeStratum0) -> None:
    """resign: default 30 days, -d N, a warning above 30, and -d abc writes an empty E line."""
    assert fake.run("resign", REPO).stdout == "Signing 30 day whitelist with master key... done\n"
    now = fake.now()
    expiry = fake.whitelist_expiry(REPO)
    assert expiry is not None
    assert abs(expiry - (now + 30 * 86400)) < 5
    fake.check_run("resign", "-d", "7", REPO)
    assert "another 6 days" in fake.run("info", REPO).stdout
    result = fake.run("resign", "-f", "-d", "400", REPO)
    assert result.stdout.startswith("Warning: whitelist expiration is more than 30 days.\n")
    result = fake.run("resign", "-f", "-d", "abc", REPO)
    assert result.returncode == 0
    assert result.stdout == "Signing abc day whitelist with master key... done\n"
    assert "Illegal number: abc" in result.stderr
    assert fake.whitelist_expiry(REPO) is None
    info = fake.run("info", REPO)
    assert info.returncode == 1
    assert info.stderr.startswith(
        "(unexpected termination) cannot load whitelist [malformed whitelist]\n"
    )
    fake.check_run("resign", REPO)
    assert fake.run("info", REPO).returncode == 0


def test_resign_works_in_a_transaction_and_needs_the_masterkey(fake: FakeStratum0) -> None:
    """resign during a transaction only touches the whitelist; without masterkey it fails."""
    fake.check_run("transaction", REPO)
    manifest = (fake.storage_dir(REPO) / ".cvmfspublished").read_bytes()
    assert fake.run("resign", "-f", REPO).returncode == 0
    assert (fake.storage_dir(REPO) / ".cvmfspublished").read_bytes() == manifest
    assert fake.in_transaction(REPO)
    masterkey = fake.config_dir / "keys" / f"{REPO}.masterkey"
    masterkey.unlink()
    result = fake.run("resign", "-f", REPO)
    assert result.returncode == 1
    assert "masterkey" in result.stderr
    assert fake.run("resign", "-f", "nosuch.local").stderr == (
        "The repository nosuch.local does not exist.\n"
    )


def test_resign_p_resigns_the_manifest(fake: FakeStratum0) -> None:
    """resign -p changes T and Y of the manifest, not S or C."""
    before = fake.manifest_fields(REPO)
    fake.set_clock(fake.now() + 100)
    result = fake.run("resign", "-p", REPO)
    assert result.stdout == "Signing .cvmfspublished... done\n"
    after = fake.manifest_fields(REPO)
    assert (after["S"], after["C"]) == (before["S"], before["C"])
    assert after["T"] != before["T"]
    assert after["Y"] != before["Y"]


def test_expired_whitelist_effects(fake: FakeStratum0) -> None:
    """Past E (fake clock): transaction 5, publish/abort/info/check/tag fail, list says so."""
    fake.set_clock(fake.now() + 31 * 86400)
    result = fake.run("transaction", REPO)
    assert (result.returncode, result.stderr) == (5, "cannot load whitelist [expired whitelist]\n")
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stdout) == (
        1,
        f"Repository whitelist for {REPO} is expired!\n",
    )
    result = fake.run("abort", "-f", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "(unexpected termination) cannot load whitelist [expired whitelist]\n\nStacktrace:\n"
    )
    assert fake.run("info", REPO).returncode == 1
    result = fake.run("check", REPO)
    assert result.returncode == 1
    assert result.stdout == f"Verifying integrity of {REPO}...\n"
    assert result.stderr == (
        "failed to fetch repository manifest (8 - bad whitelist)\n"
        "failed to load repository manifest\n"
    )
    result = fake.run("tag", "-l", REPO)
    assert result.returncode == 1
    assert result.stderr.endswith("failed to load manifest file\nfailed to init environment\n")
    assert fake.run("list").stdout == f"{REPO} (stratum0 / local - whitelist expired)  \n"
    assert fake.run("mount", REPO).returncode == 0
    assert fake.run("resign", REPO).returncode == 0
    assert fake.run("transaction", REPO).returncode == 0


def test_transaction_crossing_expiry_stays_open_until_resign(fake: FakeStratum0) -> None:
    """A transaction open at expiry can neither publish nor abort; resign lets it publish."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "crossing.txt").write_text("crossing")
    fake.check_run("resign", "-f", "-d", "0", REPO)
    assert fake.run("publish", REPO).returncode == 1
    assert fake.run("abort", "-f", REPO).returncode == 1
    assert fake.in_transaction(REPO)
    assert "- in transaction - whitelist expired" in fake.run("list").stdout
    fake.check_run("resign", "-f", REPO)
    assert fake.run("publish", REPO).returncode == 0
    assert fake.read_file(REPO, "crossing.txt") == b"crossing"


def test_whitelist_expiry_is_exact_to_the_second(fake: FakeStratum0) -> None:
    """info says `valid for another 0 days` just before E and fails from E on."""
    expiry = fake.whitelist_expiry(REPO)
    assert expiry is not None
    fake.set_clock(expiry - 1)
    assert "valid for another 0 days" in fake.run("info", REPO).stdout
    fake.set_clock(expiry)
    assert fake.run("info", REPO).returncode == 1
    fake.set_clock_offset(0)
    assert fake.run("info", REPO).returncode == 0


# -- check -------------------------------------------------------------------------------------


def test_check_healthy_and_during_transaction(fake: FakeStratum0) -> None:
    """check prints the recorded lines and works during an open transaction."""
    expected = (
        f"Verifying integrity of {REPO}...\nInspecting log of references\n"
        f"Inspecting tag database\n[inspecting catalog] {fake.root_hash(REPO)} at /\n"
        "no problems found\n"
    )
    assert fake.run("check", REPO).stdout == expected
    fake.check_run("transaction", REPO)
    assert fake.run("check", REPO).stdout == expected
    result = fake.run("check", "nosuch.local")
    assert (result.returncode, result.stderr) == (1, "The repository nosuch.local does not exist\n")


def test_check_reports_missing_and_corrupted_objects(fake: FakeStratum0) -> None:
    """Missing object: check exit 1 (-c skips it); corrupted object: only check -i sees it."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "small.txt").write_text("hello\n")
    fake.check_run("publish", REPO)
    name = "5798f7f4ca7585d850eea64610a1f73d8f8de7a3"
    assert fake.published_tree(REPO)["small.txt"].hash == name
    path = fake.object_path(REPO, name)
    saved = path.read_bytes()
    path.unlink()
    result = fake.run("check", REPO)
    assert result.returncode == 1
    assert result.stderr == (
        f"data chunk {name} (/small.txt) missing\nCATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
    )
    assert fake.run("check", "-c", REPO).returncode == 0
    path.write_bytes(b"garbage")
    assert fake.run("check", REPO).returncode == 0
    result = fake.run("check", "-i", REPO)
    assert result.returncode == 1
    assert result.stdout == f"\nChecking storage integrity of {REPO} ... (may take a while)\n"
    assert result.stderr == f"mismatch of file name and content hash | at: {path}\nFAIL!\n"
    path.write_bytes(saved)
    assert fake.run("check", "-i", REPO).returncode == 0


def test_check_reports_missing_root_catalog(fake: FakeStratum0) -> None:
    """Without its root catalog object check fails with the recorded download messages."""
    root_hash = fake.root_hash(REPO)
    fake.object_path(REPO, root_hash + "C").unlink()
    result = fake.run("check", REPO)
    assert result.returncode == 1
    assert result.stderr == (
        f"failed to download object {root_hash} (9)\nfailed to load catalog {root_hash}\n"
        f"failed to open catalog {root_hash}\nCATALOG PROBLEMS OR OTHER ERRORS FOUND\n"
    )


def test_large_files_are_chunked_and_missing_chunks_reported(fake: FakeStratum0) -> None:
    """Files above the average chunk size get P objects; check names a missing chunk."""
    fake.set_config(REPO, "CVMFS_AVG_CHUNK_SIZE", "65536")
    fake.check_run("transaction", REPO)
    data = os.urandom(150_000)
    (fake.union_dir(REPO) / "big.bin").write_bytes(data)
    fake.check_run("publish", REPO)
    entry = fake.published_tree(REPO)["big.bin"]
    assert entry.content == data
    assert entry.hash is None
    assert [(c.offset, c.size) for c in entry.chunks] == [
        (0, 65536),
        (65536, 65536),
        (131072, 18928),
    ]
    first = entry.chunks[0]
    fake.object_path(REPO, first.hash + "P").unlink()
    result = fake.run("check", REPO)
    assert result.stderr.startswith(
        f"partial data chunk {first.hash}P (/big.bin -> offset: 0 | size: 65536) missing\n"
    )
    with pytest.raises(OSError, match="cannot be fetched"):
        fake.read_file(REPO, "big.bin")


# -- grafts ------------------------------------------------------------------------------------


def test_graft_takes_size_from_graft_and_mode_mtime_from_placeholder(fake: FakeStratum0) -> None:
    """A graft's catalog entry: size from the graft file, mode/mtime from the placeholder."""
    data = os.urandom(5000)
    fake.put_object(REPO, sha1(data), data)
    fake.check_run("transaction", REPO)
    fake.write_graft(
        REPO, "g/raw.bin", size=len(data), checksum=sha1(data), placeholder=b"stale", mode=0o600
    )
    placeholder = fake.union_dir(REPO) / "g" / "raw.bin"
    os.utime(placeholder, (1_700_000_000, 1_700_000_000))
    result = fake.run("publish", REPO)
    assert result.returncode == 0, result.stderr
    entry = fake.published_tree(REPO)["g/raw.bin"]
    assert (entry.size, entry.mode, entry.mtime) == (5000, 0o600, 1_700_000_000)
    assert entry.grafted
    assert entry.compression == "none"
    assert entry.content == data
    union = fake.union_dir(REPO)
    assert not (union / "g" / ".cvmfsgraft-raw.bin").exists()
    assert (union / "g" / "raw.bin").read_bytes() == data
    assert ".cvmfsgraft-raw.bin" not in {p.rsplit("/", 1)[-1] for p in fake.published_tree(REPO)}


def test_graft_without_compression_line_uses_repository_default(fake: FakeStratum0) -> None:
    """No `compression=` line means zlib (the repository default): a raw object gives EIO."""
    data = os.urandom(3000)
    compressed = zlib.compress(data, 6)
    fake.put_object(REPO, sha1(data), data)
    fake.put_object(REPO, sha1(compressed), compressed)
    fake.check_run("transaction", REPO)
    fake.write_graft(REPO, "raw.bin", size=len(data), checksum=sha1(data), compression=None)
    fake.write_graft(REPO, "z.bin", size=len(data), checksum=sha1(compressed), compression=None)
    fake.check_run("publish", REPO)
    tree = fake.published_tree(REPO)
    assert tree["raw.bin"].compression == "zlib"
    assert tree["raw.bin"].error == errno.EIO
    assert tree["z.bin"].content == data


def test_graft_objects_are_never_checked_at_publish(fake: FakeStratum0) -> None:
    """A graft whose object is missing publishes; uploading the object later fixes reads."""
    data = b"late object" * 100
    fake.check_run("transaction", REPO)
    fake.write_graft(REPO, "late.bin", size=len(data), checksum=sha1(data))
    assert fake.run("publish", REPO).returncode == 0
    with pytest.raises(OSError, match="cannot be fetched"):
        fake.read_file(REPO, "late.bin")
    result = fake.run("check", REPO)
    assert f"data chunk {sha1(data)} (/late.bin) missing\n" in result.stderr
    fake.put_object(REPO, sha1(data), data)
    assert fake.read_file(REPO, "late.bin") == data
    assert fake.run("check", REPO).returncode == 0


def test_lone_graft_marker_is_ignored(fake: FakeStratum0) -> None:
    """A `.cvmfsgraft-x` without placeholder x publishes nothing for either name."""
    fake.check_run("transaction", REPO)
    marker = fake.union_dir(REPO) / ".cvmfsgraft-lone"
    marker.write_text(f"size=5\nchecksum={'a' * 40}\ncompression=none\n")
    fake.check_run("publish", REPO)
    assert sorted(fake.published_tree(REPO)) == ["new_repository"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("graft_text", "stdout_line"),
    [
        (
            "size=abc\nchecksum=aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d\ncompression=none\n",
            "(fs traversal) Failed to parse value of size=abc to integer: Invalid argument "
            "(errno=22)\n",
        ),
        ("size=1\ncompression=none\n", ""),
        (
            "size=10\nchecksum=0000000000000000000000000000000000000000\ncompression=none\n"
            "chunk_offsets=0,5,5\nchunk_checksums=aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d,"
            "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d,aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d\n",
            "(fs traversal) Chunk offsets must be sorted in strictly increasing order (in graft "
            "marker {spool}/scratch/current/g/.cvmfsgraft-bad.bin).\n",
        ),
    ],
    ids=["bad-size", "no-checksum", "bad-offsets"],
)
def test_invalid_graft_panics_and_keeps_the_transaction(
    fake: FakeStratum0, graft_text: str, stdout_line: str
) -> None:
    """An invalid graft file makes publish PANIC (exit 1) and leaves the transaction open."""
    fake.check_run("transaction", REPO)
    directory = fake.union_dir(REPO) / "g"
    directory.mkdir()
    (directory / "bad.bin").write_bytes(b"x")
    (directory / ".cvmfsgraft-bad.bin").write_text(graft_text)
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert result.stdout.endswith(
        "Swissknife Sync: Processing changes...\n" + stdout_line.format(spool=fake.spool_dir(REPO))
    )
    assert result.stderr.startswith(
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        "  what():  PANIC: <cvmfs-src>/cvmfs/sync_mediator.cc : 965\n"
        "Encountered a grafted file (g/bad.bin) with invalid grafting information; check "
        "contents of .cvmfsgraft-* file.  Aborting publish.\nKilled\nSynchronization failed\n"
        "\nExecuted Command:\ncvmfs_swissknife sync -u "
    )
    assert fake.in_transaction(REPO)
    assert fake.revision(REPO) == 1
    assert "- in transaction" in fake.run("list").stdout


def test_rmd160_graft_object_keeps_its_suffix(fake: FakeStratum0) -> None:
    """A graft checksum with -rmd160 names the object `<hex>-rmd160` and verifies with it."""
    data = os.urandom(4000)
    digest = engine.hash_hex("rmd160", data) + "-rmd160"
    fake.put_object(REPO, digest, data)
    fake.check_run("transaction", REPO)
    fake.write_graft(REPO, "r.bin", size=len(data), checksum=digest)
    fake.check_run("publish", REPO)
    assert fake.read_file(REPO, "r.bin") == data
    assert fake.run("check", "-i", REPO).returncode == 0


def test_grafted_files_show_their_content_and_stay_unchanged(fake: FakeStratum0) -> None:
    """After publish the union shows each grafted file with its content, mode and mtime
    (an unreadable one empty); the next publish keeps the graft entries and nothing counts
    as a change made outside the transaction."""
    data = os.urandom(6000)
    stored = zlib.compress(data)
    fake.put_object(REPO, sha1(stored), stored)
    fake.check_run("transaction", REPO)
    fake.write_graft(
        REPO,
        "g/z.bin",
        size=len(data),
        checksum=sha1(stored),
        compression="zlib",
        placeholder=b"a stale placeholder longer than nothing",
        mode=0o750,
    )
    fake.write_graft(REPO, "g/missing.bin", size=10, checksum="b" * 40, mode=0o600)
    union = fake.union_dir(REPO)
    for name in ("z.bin", "missing.bin"):
        os.utime(union / "g" / name, (1_600_000_000, 1_600_000_000))
    fake.check_run("publish", REPO)
    assert sorted(p.name for p in (union / "g").iterdir()) == ["missing.bin", "z.bin"]
    shown = (union / "g" / "z.bin").stat()
    assert (union / "g" / "z.bin").read_bytes() == data
    assert (shown.st_mode & 0o7777, int(shown.st_mtime)) == (0o750, 1_600_000_000)
    empty = (union / "g" / "missing.bin").stat()
    assert (empty.st_size, empty.st_mode & 0o7777, int(empty.st_mtime)) == (
        0,
        0o600,
        1_600_000_000,
    )
    first = fake.catalog(REPO).entries
    assert fake.scan_violations(REPO) == []
    fake.check_run("transaction", REPO)
    fake.check_run("publish", REPO)
    second = fake.catalog(REPO).entries
    assert second["/g/z.bin"] == first["/g/z.bin"]
    assert second["/g/z.bin"].graft and second["/g/missing.bin"].graft
    assert fake.violations() == []


def test_publish_snapshot_is_the_union_as_published(fake: FakeStratum0) -> None:
    """The stat snapshot a publish leaves equals a fresh scan of the union directory."""
    data = b"grafted\n"
    fake.put_object(REPO, sha1(data), data)
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    (union / "d" / "e").mkdir(parents=True)
    (union / "d" / "copied.txt").write_text("copied\n")
    (union / "d" / "link").symlink_to("copied.txt")
    os.mkfifo(union / "d" / "e" / "fifo")
    (union / ".cvmfsgraft-lone").write_text(f"size=1\nchecksum={'c' * 40}\n")
    fake.write_graft(REPO, "d/e/g.bin", size=len(data), checksum=sha1(data))
    fake.check_run("publish", REPO)
    repo = fake.repository(REPO)
    assert engine.load_snapshot(repo) == engine.scan_tree(union)
    assert sorted(engine.scan_tree(union)) == [
        "/",
        "/d",
        "/d/copied.txt",
        "/d/e",
        "/d/e/g.bin",
        "/d/link",
        "/new_repository",
    ]


def test_graft_links_outside_the_union_keep_their_content(
    fake: FakeStratum0, tmp_path: Path
) -> None:
    """A marker or placeholder that has a second name elsewhere is not written through:
    the other name keeps the marker text or the placeholder bytes."""
    data = b"grafted content\n" * 50
    fake.put_object(REPO, sha1(data), data)
    fake.check_run("transaction", REPO)
    fake.write_graft(REPO, "a.bin", size=len(data), checksum=sha1(data), placeholder=b"old a")
    fake.write_graft(REPO, "b.bin", size=len(data), checksum=sha1(data), placeholder=b"old b")
    union = fake.union_dir(REPO)
    marker_text = (union / ".cvmfsgraft-a.bin").read_bytes()
    os.link(union / ".cvmfsgraft-a.bin", tmp_path / "marker-link")
    os.link(union / "b.bin", tmp_path / "placeholder-link")
    fake.check_run("publish", REPO)
    assert (union / "a.bin").read_bytes() == data
    assert (union / "b.bin").read_bytes() == data
    assert not (union / ".cvmfsgraft-a.bin").exists()
    assert (tmp_path / "marker-link").read_bytes() == marker_text
    assert (tmp_path / "placeholder-link").read_bytes() == b"old b"


# -- stale mounts ------------------------------------------------------------------------------


def test_transaction_repairs_missing_mounts(fake: FakeStratum0) -> None:
    """With auto-repair on, transaction remounts what is missing and says so on stderr."""
    fake.unmount(REPO, union=True, rdonly=True)
    state = fake.state(REPO)
    assert (state["mount_mode"], state["rdonly_mounted"]) == (None, False)
    assert "cvmfs_io" not in (state["spool_files"] or [])
    assert f"{REPO} (stratum0 / local - unhealthy)  \n" == fake.run("list").stdout
    result = fake.run("transaction", REPO)
    rdonly = fake.spool_dir(REPO) / "rdonly"
    union = fake.union_dir(REPO)
    assert result.returncode == 0
    assert result.stderr == (
        f"{rdonly} is not mounted properly\n{union} is not mounted properly\n"
        f"Trying to mount {rdonly}... success\nTrying to mount {union}... success\n"
    )
    assert result.stdout.endswith(f"CernVM-FS: mounted cvmfs on {rdonly}\n")
    state = fake.state(REPO)
    assert (state["mount_mode"], state["rdonly_mounted"]) == ("rw", True)
    assert state["spool_files"] == sorted([*RECORDED_SPOOL, "in_transaction.lock"])


def test_publish_outside_transaction_repairs_with_notes(fake: FakeStratum0) -> None:
    """publish outside a transaction repairs first (`Note:` lines) then reports exit 1."""
    fake.unmount(REPO, union=True, rdonly=True)
    result = fake.run("publish", REPO)
    rdonly = fake.spool_dir(REPO) / "rdonly"
    union = fake.union_dir(REPO)
    assert (result.returncode, result.stdout) == (1, f"Repository {REPO} is not in a transaction\n")
    assert result.stderr == (
        f"{rdonly} is not mounted properly.\n{union} is not mounted properly.\n"
        f"Note: Trying to mount {rdonly}... success\nNote: Trying to mount {union}... success\n"
    )
    assert fake.state(REPO)["mount_mode"] == "ro"


def test_union_lost_during_transaction_needs_abort(fake: FakeStratum0) -> None:
    """Union gone mid-transaction: publish refuses (exit 1); abort remounts and discards."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "l5.txt").write_text("l5")
    fake.unmount(REPO, union=True)
    union = fake.union_dir(REPO)
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert result.stderr == (
        f"{union} is not mounted properly.\n"
        f"{REPO} is in a transaction but {union} is not mounted read/write\n"
        f"Repository {REPO} is in a transaction and cannot be repaired.\n"
        f"--> Run `cvmfs_server abort {REPO}` to revert and repair.\n"
    )
    assert "- in transaction - unhealthy" in fake.run("list").stdout
    result = fake.run("abort", "-f", REPO)
    assert result.returncode == 0
    assert result.stderr == (
        f"{union} is not mounted properly\nTrying to mount {union}... success\n"
        f"Trying to remount {union} read/write... success\n"
    )
    assert not (union / "l5.txt").exists()
    assert fake.state(REPO)["mount_mode"] == "ro"


def test_auto_repair_disabled(fake: FakeStratum0) -> None:
    """Auto-repair off: transaction fails to get a writable mount, publish says disabled."""
    fake.set_config(REPO, "CVMFS_AUTO_REPAIR_MOUNTPOINT", "false")
    fake.unmount(REPO, union=True)
    union = fake.union_dir(REPO)
    result = fake.run("transaction", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"{union} is not mounted properly\n"
        "(unexpected termination) cannot establish writable mountpoint\n\nStacktrace:\n"
    )
    assert not fake.in_transaction(REPO)
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert result.stderr == (
        f"{union} is not mounted properly.\n"
        "Auto-Repair is disabled (CVMFS_AUTO_REPAIR_MOUNTPOINT = false)\n"
    )
    result = fake.run("mount", REPO)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert fake.state(REPO)["mount_mode"] == "ro"
    assert fake.run("transaction", REPO).returncode == 0


# -- fault injection ---------------------------------------------------------------------------


def open_with_file(fake: FakeStratum0, name: str = "a.txt", text: str = "A") -> None:
    """Open a transaction on ref.local and write one file into it."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / name).write_text(text)


def test_fault_storage_unreachable_at_publish_start(fake: FakeStratum0) -> None:
    """fail at start: `Repository unavailable under <stratum0>`, exit 1, txn stays open."""
    open_with_file(fake)
    fake.inject_fault("publish", "fail", times=1)
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stdout) == (
        1,
        f"Repository unavailable under {fake.config(REPO)['CVMFS_STRATUM0']}\n",
    )
    assert fake.in_transaction(REPO)
    assert fake.faults() == []
    assert fake.run("publish", REPO).returncode == 0
    assert fake.read_file(REPO, "a.txt") == b"A"


def test_fault_during_upload_leaves_objects_and_open_transaction(fake: FakeStratum0) -> None:
    """fail at upload: the recorded PANIC, objects uploaded before stay, txn stays open."""
    fake.check_run("transaction", REPO)
    for number in range(4):
        (fake.union_dir(REPO) / f"f{number}.txt").write_text(f"file {number}")
    before = data_objects(fake, REPO)
    fake.inject_fault("publish", "fail", at="upload", times=1)
    result = fake.run("publish", "-m", "dies during upload", REPO)
    assert result.returncode == 1
    assert result.stdout.endswith("Waiting for upload of files before committing...\n")
    assert result.stderr.startswith(f"Upload job for '{REPO}/data/")
    assert "(error code: 5 - S3: host connection problem)" in result.stderr
    assert "chunk upload failed (code: 99)\nKilled\nSynchronization failed\n" in result.stderr
    assert "-J dies during upload" in result.stderr
    assert len(data_objects(fake, REPO) - before) == 2
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (True, False)
    assert fake.revision(REPO) == 1
    assert fake.run("publish", REPO).returncode == 0
    assert fake.read_file(REPO, "f3.txt") == b"file 3"


def test_fault_while_signing(fake: FakeStratum0) -> None:
    """fail at signing: stdout up to `Signing new manifest`, reflog error, revision kept."""
    open_with_file(fake)
    fake.inject_fault("publish", "fail", at="signing", times=1)
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert result.stdout.endswith("Flushing file system buffers\nSigning new manifest\n")
    assert result.stderr.endswith("reflog missing\nSigning failed\n")
    assert fake.revision(REPO) == 1
    assert fake.in_transaction(REPO)
    assert fake.run("publish", REPO).returncode == 0
    assert fake.revision(REPO) == 2


def test_fault_custom_texts_and_exit_code(fake: FakeStratum0) -> None:
    """A fail rule's stdout/stderr/exit_code replace the defaults."""
    open_with_file(fake)
    fake.inject_fault("publish", "fail", stdout="out\n", stderr="err\n", exit_code=7, times=1)
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_fault_die_leaves_crash_state(fake: FakeStratum0) -> None:
    """die kills the fake with SIGKILL at that point: the state of a killed publish (F9)."""
    open_with_file(fake)
    fake.inject_fault("publish", "die", at="after_upload", times=1)
    result = fake.run("publish", REPO)
    assert result.returncode == -9
    state = fake.state(REPO)
    assert state["in_transaction_lock"] is True
    assert state["is_publishing_lock"] is True
    assert state["mount_mode"] == "ro"
    assert fake.revision(REPO) == 1
    assert_killed_publish_recovers(fake)


def test_fault_die_after_manifest_publishes_but_keeps_the_lock(fake: FakeStratum0) -> None:
    """A crash after the manifest is written: new revision, transaction lock still there."""
    open_with_file(fake)
    fake.inject_fault("publish", "die", at="after_manifest", times=1)
    assert fake.run("publish", REPO).returncode == -9
    assert fake.revision(REPO) == 2
    assert fake.in_transaction(REPO)
    assert fake.run("transaction", REPO).returncode == 17
    assert fake.run("abort", "-f", REPO).returncode == 0
    assert fake.read_file(REPO, "a.txt") == b"A"
    assert (fake.union_dir(REPO) / "a.txt").read_text() == "A"


def test_fault_exit_skips_cleanup(fake: FakeStratum0) -> None:
    """exit ends the process with the given code and texts, without any cleanup."""
    open_with_file(fake)
    fake.inject_fault("publish", "exit", at="after_upload", exit_code=3, stderr="boom\n")
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stderr) == (3, "boom\n")
    assert fake.state(REPO)["is_publishing_lock"] is True


def test_fault_hang_until_process_group_is_killed(fake: FakeStratum0) -> None:
    """hang blocks at the point until the caller kills the process group; state is kept."""
    open_with_file(fake)
    fake.inject_fault("publish", "hang", at="upload")
    process = subprocess.Popen(
        [str(fake.server_command), "publish", REPO],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
        assert fake.state(REPO)["is_publishing_lock"] is True
        assert fake.run("transaction", REPO).returncode == 17
    finally:
        os.killpg(process.pid, 9)
        process.wait()
    fake.clear_faults()
    assert_killed_publish_recovers(fake)


def test_fault_delay_and_matching(fake: FakeStratum0) -> None:
    """delay slows a command; rules match on command (or *), point and repository."""
    fake.inject_fault("*", "fail", repo="other.local")
    fake.inject_fault("info", "delay", delay=0.5, times=1)
    started = time.monotonic()
    assert fake.run("info", REPO).returncode == 0
    assert time.monotonic() - started >= 0.5
    assert fake.run("transaction", REPO).returncode == 0
    fake.inject_fault("*", "fail", repo=REPO, times=1)
    assert fake.run("abort", "-f", REPO).returncode == 1
    assert fake.in_transaction(REPO)


def test_fault_transaction_crash_after_lock(fake: FakeStratum0) -> None:
    """A transaction killed after creating the lock: in a transaction but not mounted rw."""
    fake.inject_fault("transaction", "die", at="after_lock", times=1)
    assert fake.run("transaction", REPO).returncode == -9
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["mount_mode"]) == (True, "ro")
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert "is in a transaction but" in result.stderr
    assert "cannot be repaired" in result.stderr
    assert fake.run("abort", "-f", REPO).returncode == 0


def test_storage_unreachable_condition(fake: FakeStratum0) -> None:
    """storage unreachable: transaction 5, publish/abort fail, list says unreachable (j D)."""
    open_with_file(fake)
    fake.inject_fault("storage", "unreachable")
    result = fake.run("publish", REPO)
    assert (result.returncode, result.stdout) == (
        1,
        f"Repository unavailable under {fake.config(REPO)['CVMFS_STRATUM0']}\n",
    )
    result = fake.run("abort", "-f", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "(unexpected termination) cannot load whitelist [failed to download whitelist]\n"
    )
    assert fake.run("list").stdout == (
        f"{REPO} (stratum0 / local - in transaction - whitelist unreachable)  \n"
    )
    fake.clear_faults()
    fake.check_run("abort", "-f", REPO)
    fake.inject_fault("storage", "unreachable")
    result = fake.run("transaction", REPO)
    assert (result.returncode, result.stderr) == (
        5,
        "cannot load whitelist [failed to download whitelist]\n",
    )
    fake.clear_faults()
    assert fake.run("transaction", REPO).returncode == 0


def test_storage_hang_blocks_list(fake: FakeStratum0) -> None:
    """A hanging storage makes `list` block (l_stale_mount 4) until it is killed."""
    fake.inject_fault("storage", "hang")
    process = subprocess.Popen(
        [str(fake.server_command), "list"], stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    finally:
        os.killpg(process.pid, 9)
        process.wait()
    fake.clear_faults()
    assert fake.run("list").returncode == 0


# -- concurrency, S3 stand-in, misc ------------------------------------------------------------


def test_concurrent_transactions_have_one_winner(fake: FakeStratum0) -> None:
    """Of several simultaneous `transaction` calls exactly one succeeds, the rest exit 17."""
    processes = [
        subprocess.Popen(
            [str(fake.server_command), "transaction", REPO],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(6)
    ]
    codes = sorted(process.wait(timeout=30) for process in processes)
    assert codes == [0, 17, 17, 17, 17, 17]


def test_parallel_publishes_in_two_repositories(fake: FakeStratum0) -> None:
    """Publishes of different repositories can run at the same time."""
    fake.mkfs("other.local")
    for repo in (REPO, "other.local"):
        fake.check_run("transaction", repo)
        for number in range(50):
            (fake.union_dir(repo) / f"{number}.txt").write_text(f"{repo} {number}")
    processes = [
        subprocess.Popen(
            [str(fake.server_command), "publish", repo],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for repo in (REPO, "other.local")
    ]
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    assert fake.read_file("other.local", "49.txt") == b"other.local 49"
    assert fake.read_file(REPO, "0.txt") == b"ref.local 0"


def test_s3_stand_in_repository(fake: FakeStratum0, tmp_path: Path) -> None:
    """mkfs -s/-w writes the S3 keys; storage is a local bucket directory; list says S3."""
    s3conf = tmp_path / "refs3.local.s3.conf"
    s3conf.write_text("CVMFS_S3_HOST=127.0.0.1\nCVMFS_S3_PORT=9001\nCVMFS_S3_BUCKET=refs3\n")
    result = fake.run(
        "mkfs",
        "-s",
        str(s3conf),
        "-w",
        "http://127.0.0.1:9001/refs3",
        "-z",
        "-o",
        "root",
        "refs3.local",
    )
    assert result.returncode == 0
    assert "Creating Backend Storage" not in result.stdout
    conf = fake.config("refs3.local")
    assert conf["CVMFS_STRATUM0"] == "http://127.0.0.1:9001/refs3/refs3.local"
    spool = fake.spool_dir("refs3.local")
    assert conf["CVMFS_UPSTREAM_STORAGE"] == f"S3,{spool}/tmp,refs3.local@{s3conf}"
    assert fake.storage_dir("refs3.local") == fake.root / "s3" / "refs3" / "refs3.local"
    assert not (fake.storage_dir("refs3.local") / "data" / "txn").exists()
    assert "refs3.local (stratum0 / S3)  \n" in fake.run("list").stdout
    fake.check_run("transaction", "refs3.local")
    (fake.union_dir("refs3.local") / "hello.txt").write_text("hello s3\n")
    fake.inject_fault("publish", "fail", at="upload", times=1)
    assert fake.run("publish", "refs3.local").returncode == 1
    assert any(name.startswith("tmp.") for name in os.listdir(spool))
    assert fake.run("publish", "refs3.local").returncode == 0
    assert fake.read_file("refs3.local", "hello.txt") == b"hello s3\n"
    fake.check_run("gc", "-r", "0", "-f", "refs3.local")
    assert (fake.storage_dir("refs3.local") / ".cvmfs_status.json").is_file()


def test_info_and_list_texts(fake: FakeStratum0) -> None:
    """info prints the recorded block; list sorts repositories and marks transactions."""
    pub = fake.config_dir / "keys" / f"{REPO}.pub"
    assert fake.run("info", REPO).stdout == (
        f"Repository name: {REPO}\nCreated by CernVM-FS 143\n"
        "Stratum1 replication allowed: yes\nWhitelist is valid for another 29 days\n\n"
        "Client configuration:\n"
        f"Add {REPO} to CVMFS_REPOSITORIES in /etc/cvmfs/default.local\n"
        f"Create /etc/cvmfs/config.d/{REPO}.conf and set\n"
        f"  CVMFS_SERVER_URL={fake.config(REPO)['CVMFS_STRATUM0']}\n"
        f"  CVMFS_PUBLIC_KEY={pub}\nCopy {pub} to the client\n"
    )
    fake.mkfs("aaa.local")
    fake.check_run("transaction", REPO)
    assert fake.run("list").stdout == (
        "aaa.local (stratum0 / local)  \nref.local (stratum0 / local - in transaction)  \n"
    )


def test_diff_reports_changes_between_last_two_revisions(fake: FakeStratum0) -> None:
    """diff / diff -m summarise what the last publish added and removed."""
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    (union / "sub").mkdir()
    (union / "sub" / "x.txt").write_text("12345")
    (union / "link").symlink_to("sub/x.txt")
    fake.check_run("publish", REPO)
    human = fake.run("diff", REPO).stdout.splitlines()
    assert human[:4] == [
        "d(# regular files): 1",
        "d(# symlinks): 1",
        "d(# directories): 1",
        "d(# catalogs): 0",
    ]
    assert sorted(human[4:]) == [
        "/link add symlink +9 bytes",
        "/sub add directory +4096 bytes",
        "/sub/x.txt add file +5 bytes",
    ]
    machine = fake.run("diff", "-m", REPO).stdout.splitlines()
    assert sorted(machine[4:]) == ["A D /sub", "A F /sub/x.txt +5", "A S /link +9"]


def test_rmfs_and_unknown_inputs(fake: FakeStratum0) -> None:
    """rmfs asks without -f and removes everything with -f; bad input exits non-zero."""
    assert fake.run("rmfs", REPO, stdin=b"").returncode == 1
    assert fake.run("frobnicate").returncode == 2
    assert fake.run("transaction", "-q", REPO).returncode == 1
    assert fake.run("mkfs", REPO).returncode == 1
    result = fake.run("transaction", "nosuch.local")
    assert (result.returncode, result.stderr) == (
        1,
        "The repository nosuch.local does not exist.\n",
    )
    result = fake.run("rmfs", "-f", REPO)
    assert result.returncode == 0
    assert result.stdout.endswith(f"CernVM-FS repository {REPO} wiped out!\n")
    assert fake.state(REPO)["spool_files"] is None
    assert fake.run("list").stdout == ""


def test_unchanged_files_keep_their_catalog_entries(fake: FakeStratum0) -> None:
    """A publish reuses the entries of files not touched since the last publish."""
    fake.check_run("transaction", REPO)
    union = fake.union_dir(REPO)
    for number in range(200):
        (union / f"{number}.txt").write_text(f"content {number}")
    fake.check_run("publish", REPO)
    first = fake.catalog(REPO).entries
    fake.check_run("transaction", REPO)
    (union / "7.txt").write_text("changed")
    fake.check_run("publish", REPO)
    second = fake.catalog(REPO).entries
    changed = {path for path in second if path in first and second[path] != first[path]}
    assert changed <= {"/", "/7.txt"}
    assert "/7.txt" in changed
    assert fake.read_file(REPO, "7.txt") == b"changed"


def test_small_commands_are_fast(fake: FakeStratum0) -> None:
    """list/info/transaction/abort on a small repository take well under a second each."""
    durations = []
    for args in (("list",), ("info", REPO), ("transaction", REPO), ("abort", "-f", REPO)):
        started = time.monotonic()
        fake.check_run(*args)
        durations.append(time.monotonic() - started)
    assert max(durations) < 1.0, durations


def test_gc_time_threshold_accepts_at_epoch(gc_fake: FakeStratum0) -> None:
    """gc -t @SECONDS keeps revisions newer than that time and sweeps older untagged ones."""
    repo = "refgc.local"
    start = gc_fake.now() + 1000
    union = gc_fake.union_dir(repo)
    for offset in (0, 100, 200):
        gc_fake.set_clock(start + offset)
        gc_fake.check_run("transaction", repo)
        (union / "file.txt").write_text(f"at {offset}\n")
        gc_fake.check_run("publish", repo)
    for name in list(gc_fake.tags(repo)):
        if name.startswith("generic"):
            gc_fake.check_run("tag", "-r", name, "-f", repo)
    threshold = int(start + 50)
    result = gc_fake.run("gc", "-f", "-l", "-t", f"@{threshold}", repo)
    assert result.returncode == 0, result.stderr
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(threshold))
    assert f"Preserve Revisions newer than: {stamp}\n" in result.stdout
    swept = re.findall(r"^Sweeping Revision (\d+) ", result.stdout, re.MULTILINE)
    assert sorted(int(n) for n in swept) == [0, 1, 2, 3, 4, 5]
    assert gc_fake.read_file(repo, "file.txt", revision=6) == b"at 100\n"
    assert gc_fake.read_file(repo, "file.txt") == b"at 200\n"


def test_non_utf8_names_and_symlink_targets_round_trip(fake: FakeStratum0) -> None:
    """File names and symlink targets that are not UTF-8 are published byte for byte."""
    fake.check_run("transaction", REPO)
    union = os.fsencode(fake.union_dir(REPO))
    with open(union + b"/caf\xe9.txt", "wb") as handle:
        handle.write(b"latin-1 name")
    os.symlink(b"\xff\xfe-target", union + b"/link\xff")
    assert fake.run("publish", REPO).returncode == 0
    tree = fake.published_tree(REPO)
    name = os.fsdecode(b"caf\xe9.txt")
    link = os.fsdecode(b"link\xff")
    assert tree[name].content == b"latin-1 name"
    target = tree[link].target
    assert target is not None
    assert os.fsencode(target) == b"\xff\xfe-target"
    assert tree[link].size == len(b"\xff\xfe-target")
    assert fake.run("check", REPO).returncode == 0
    fake.check_run("transaction", REPO)
    os.unlink(union + b"/caf\xe9.txt")
    assert fake.run("abort", "-f", REPO).returncode == 0
    with open(union + b"/caf\xe9.txt", "rb") as handle:
        assert handle.read() == b"latin-1 name"


# -- faults of the real tool (faults.md F1-F4, F8, F9) ----------------------------------------


def generic_names(count: int, start: float = 1_800_000_000) -> list[str]:
    """``count`` distinct automatic-tag names (``generic-YYYY-MM-DDTHH:MM:SSZ``, 28 bytes)."""
    return [
        "generic-" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + index))
        for index in range(count)
    ]


def removal_args(names: list[str]) -> list[str]:
    """``-r NAME`` for each name."""
    return [arg for name in names for arg in ("-r", name)]


def test_f1_tag_removal_is_all_or_nothing(gc_fake: FakeStratum0) -> None:
    """Two existing tags and one missing: `tag 'x' does not exist`, nothing removed (F1)."""
    repo = "refgc.local"
    hashes = {str(t["name"]): str(t["hash"]) for t in gc_fake.repository(repo).tags()}
    existing = sorted(name for name in hashes if name.startswith("generic"))[:2]
    before = gc_fake.tags(repo)
    result = gc_fake.run("tag", *removal_args([*existing, "no-such-tag", "nor-this"]), "-f", repo)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "tag 'no-such-tag' does not exist\ntag 'nor-this' does not exist\nDid not remove anything\n"
    )
    assert gc_fake.tags(repo) == before
    result = gc_fake.run("tag", *removal_args([existing[0], "trunk-previous"]), "-f", repo)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "undo tags are handled internally and cannot be deleted\nDid not remove anything\n"
    )
    assert gc_fake.tags(repo) == before
    result = gc_fake.run("tag", *removal_args(existing), "-f", repo)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "".join(f"deleting '{name}' ({hashes[name]})\n" for name in existing)
    assert set(gc_fake.tags(repo)) == set(before) - set(existing)


def test_f1_tag_removal_of_4000_names_runs_and_of_4500_fails(fake: FakeStratum0) -> None:
    """All names of one call go into one shell argument: 4 500 exceed 128 KiB (F1)."""
    names = generic_names(4500)
    fake.add_tags(REPO, names)
    assert all(len(name) == 28 for name in names)
    result = fake.run("tag", *removal_args(names), "-f", REPO)
    assert (result.returncode, result.stdout) == (1, "")
    assert re.fullmatch(
        r"/usr/bin/cvmfs_server: \d+: eval: sh: Argument list too long\n"
        r"Did not remove anything\n",
        result.stderr,
    )
    assert set(names) <= set(fake.tags(REPO))
    result = fake.run("tag", *removal_args(names[:4000]), "-f", REPO)
    assert (result.returncode, result.stderr) == (0, "")
    assert len(result.stdout.splitlines()) == 4000
    remaining = set(fake.tags(REPO))
    assert remaining.isdisjoint(names[:4000])
    assert set(names[4000:]) <= remaining


def test_f1_the_limit_is_on_the_bytes_of_the_joined_argument(fake: FakeStratum0) -> None:
    """An argument of 131 071 bytes (+ its NUL = MAX_ARG_STRLEN) runs; one byte more fails."""
    names = generic_names(4000)
    base = len(engine.tag_remove_shell_argument(fake.repository(REPO), [*names, ""]))
    fits = "f" * (engine.MAX_ARG_STRLEN - 1 - base)
    too_long = "g" * (len(fits) + 1)
    fake.add_tags(REPO, [*names, fits, too_long])
    argument = engine.tag_remove_shell_argument(fake.repository(REPO), [*names, fits])
    assert len(argument.encode()) + 1 == engine.MAX_ARG_STRLEN
    result = fake.run("tag", *removal_args([*names, too_long]), "-f", REPO)
    assert result.returncode == 1
    assert "Argument list too long" in result.stderr
    assert too_long in fake.tags(REPO)
    result = fake.run("tag", *removal_args([*names, fits]), "-f", REPO)
    assert (result.returncode, result.stderr) == (0, "")
    assert set(fake.tags(REPO)).isdisjoint([*names, fits])


def test_f2_every_publish_makes_a_revision_and_an_auto_tag(fake: FakeStratum0) -> None:
    """A publish with nothing changed: revision +1, a new root hash, a new generic tag (F2)."""
    hashes = [fake.root_hash(REPO)]
    for expected in (2, 3):
        fake.check_run("transaction", REPO)
        result = fake.check_run("publish", REPO)
        assert result.stdout.startswith("Using auto tag 'generic")
        assert fake.revision(REPO) == expected
        hashes.append(fake.root_hash(REPO))
        tags = fake.tags(REPO)
        assert sorted(rev for name, rev in tags.items() if name.startswith("generic")) == [
            *range(1, expected + 1)
        ]
        assert tags["trunk"] == expected
    assert len(set(hashes)) == 3
    assert fake.published_tree(REPO, 3).keys() == fake.published_tree(REPO, 1).keys()


def test_f3_check_i_on_s3_skips_the_integrity_check(fake: FakeStratum0, tmp_path: Path) -> None:
    """check -i on S3 storage: the skip notice, the plain check, exit 0 (F3; p_gw_maint 8)."""
    s3conf = tmp_path / "refs3.local.s3.conf"
    s3conf.write_text("CVMFS_S3_HOST=127.0.0.1\nCVMFS_S3_PORT=9001\nCVMFS_S3_BUCKET=refs3\n")
    repos = {"refs3.local": s3conf, REPO: None}
    fake.mkfs("refs3.local", s3_config=s3conf, stratum0_url="http://127.0.0.1:9001/refs3")
    for repo in repos:
        fake.check_run("transaction", repo)
        (fake.union_dir(repo) / "hello.txt").write_text("hello\n")
        fake.check_run("publish", repo)
        corrupt = fake.object_path(repo, fake.published_tree(repo)["hello.txt"].hash or "")
        corrupt.write_bytes(b"not what the name says")
    result = fake.run("check", "-i", "refs3.local")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "Storage integrity check only works locally. skipping.\n"
        "Verifying integrity of refs3.local...\n"
        "Inspecting log of references\nInspecting tag database\n"
        f"[inspecting catalog] {fake.root_hash('refs3.local')} at /\n"
        "no problems found\n"
    )
    local = fake.run("check", "-i", REPO)
    assert local.returncode == 1
    assert local.stderr.endswith("FAIL!\n")


def test_f4_publish_under_umask_027_fails_at_tagging(fake: FakeStratum0) -> None:
    """Objects written as 0640: the tag edit's download gets 403, `Tagging failed` (F4)."""
    open_with_file(fake)
    result = fake.run("publish", REPO, umask=0o027)
    assert result.returncode == 1
    assert result.stdout.endswith(f"Tagging {REPO}\n")
    match = re.fullmatch(
        r"failed to download object '([0-9a-f]{40}C)' \(9 - host returned HTTP error\)\n"
        r"Tagging failed\n",
        result.stderr,
    )
    assert match is not None
    assert fake.object_path(REPO, match.group(1)).stat().st_mode & 0o777 == 0o640
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (True, False)
    assert state["mount_mode"] == "rw"
    assert fake.revision(REPO) == 1
    assert fake.run("publish", REPO, umask=0o022).returncode == 0
    assert fake.revision(REPO) == 2
    assert fake.read_file(REPO, "a.txt") == b"A"
    entry = fake.published_tree(REPO)["a.txt"]
    for name in (fake.root_hash(REPO) + "C", entry.hash or ""):
        assert fake.object_path(REPO, name).stat().st_mode & 0o777 == 0o644


def test_f4_runs_use_umask_022_whatever_the_callers(fake: FakeStratum0) -> None:
    """FakeStratum0.run gives the command umask 022 (as the daemon does) by default."""
    open_with_file(fake)
    previous = os.umask(0o077)
    try:
        result = fake.run("publish", REPO)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert fake.object_path(REPO, fake.root_hash(REPO) + "C").stat().st_mode & 0o777 == 0o644


PARENT_CODE = (
    "import subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,\n"
    "                         stderr=subprocess.PIPE, start_new_session=True)\n"
    "child.communicate()\n"
)


def start_under_parent(fake: FakeStratum0, *args: str) -> subprocess.Popen[bytes]:
    """Run the fake from a parent that alone reads its stdout/stderr, as the daemon does
    (its own session, so that killing the parent alone leaves it running)."""
    return subprocess.Popen(
        [sys.executable, "-c", PARENT_CODE, str(fake.server_command), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_parent(parent: subprocess.Popen[bytes]) -> None:
    """kill -9 the parent alone (the fake's pipes close with it)."""
    parent.kill()
    parent.wait(timeout=10)


def test_f8_orphaned_publish_fails_at_its_next_output(fake: FakeStratum0) -> None:
    """Parent killed mid-publish: the publish goes on, fails writing to the closed pipe, and
    its cleanup leaves the transaction open, read/write, without is_publishing.lock (F8)."""
    open_with_file(fake)
    fake.inject_fault("publish", "orphaned", at="after_upload", times=1)
    parent = start_under_parent(fake, "publish", REPO)
    try:
        wait_until(lambda: fake.faults() == [])  # the publish holds at after_upload
        assert fake.orphans()
        state = fake.state(REPO)
        assert (state["is_publishing_lock"], state["mount_mode"]) == (True, "ro")
    finally:
        kill_parent(parent)
    wait_until(lambda: not fake.orphans())
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (True, False)
    assert state["mount_mode"] == "rw"
    assert fake.revision(REPO) == 1
    assert fake.run("publish", REPO).returncode == 0
    assert fake.read_file(REPO, "a.txt") == b"A"


def test_f8_orphaned_publish_past_its_last_output_finishes(fake: FakeStratum0) -> None:
    """Parent killed after publish's last line: it finishes by itself (F8, final remount)."""
    open_with_file(fake)
    fake.inject_fault("publish", "orphaned", at="end", times=1)
    parent = start_under_parent(fake, "publish", REPO)
    try:
        wait_until(lambda: fake.faults() == [])
    finally:
        kill_parent(parent)
    wait_until(lambda: not fake.orphans())
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (False, False)
    assert (state["mount_mode"], state["revision"]) == ("ro", 2)


def test_f8_orphaned_transaction_opens_after_its_parent_died(fake: FakeStratum0) -> None:
    """A transaction whose parent was killed opens the transaction `delay` s later (F8)."""
    fake.inject_fault("transaction", "orphaned", delay=0.3, times=1)
    parent = start_under_parent(fake, "transaction", REPO)
    try:
        wait_until(lambda: fake.faults() == [])
        assert not fake.in_transaction(REPO)  # held until the parent dies
    finally:
        kill_parent(parent)
    died = time.monotonic()
    wait_until(lambda: fake.in_transaction(REPO))
    assert time.monotonic() - died >= 0.3
    wait_until(lambda: not fake.orphans())
    assert fake.state(REPO)["mount_mode"] == "rw"


def assert_killed_publish_recovers(fake: FakeStratum0) -> None:
    """The state a publish killed with its group leaves, and the recorded way out (F9)."""
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (True, True)
    assert state["mount_mode"] == "ro"
    result = fake.run("publish", REPO)
    assert result.returncode == 1
    assert result.stderr == (
        f"{REPO} is in a transaction but {fake.union_dir(REPO)} is not mounted read/write\n"
        f"Repository {REPO} is in a transaction and cannot be repaired.\n"
        f"--> Run `cvmfs_server abort {REPO}` to revert and repair.\n"
    )
    fake.check_run("abort", "-f", REPO)
    fake.check_run("mount", REPO)
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "after.txt").write_text("after")
    fake.check_run("publish", REPO)
    assert fake.read_file(REPO, "after.txt") == b"after"
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"]) == (False, False)
    assert state["mount_mode"] == "ro"


@pytest.mark.parametrize("point", ["before_sync", "after_upload", "signing"])
def test_f9_publish_group_killed_leaves_read_only_union(fake: FakeStratum0, point: str) -> None:
    """SIGKILL to the publish's whole group: read-only union, lock kept, transaction open."""
    open_with_file(fake)
    fake.inject_fault("publish", "hang", at=point, times=1)
    process = subprocess.Popen(
        [str(fake.server_command), "publish", REPO],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: fake.faults() == [])
    finally:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)
    assert fake.revision(REPO) == 1
    assert_killed_publish_recovers(fake)
