"""Behaviour of the fake ``cvmfs_server ingest`` (m_ingest, m2_ingest, gateway.md 22-29).

The step-by-step replays of both recordings are in ``test_transcript_replay.py``; these
tests pin each behaviour on its own, and check the fake's tar reader against libarchive
where the library is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import io
import os
import pwd
import re
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_cvmfs.server.commands.ingest import parse_arguments
from tests.fake_cvmfs.server.tarball import (
    ArchiveDataError,
    ArchiveFatal,
    ArchiveOpenError,
    Damaged,
    TarReader,
)
from tests.fake_cvmfs.stratum0 import CALIBRATED_COSTS, FakeStratum0

REPO = "ing.gw.local"
EVAL = "/usr/bin/cvmfs_server: 9263: eval: [[: not found\n"
CHATTER = (
    "CernVM-FS: running with suid support\n"
    "Failed to set requested number of open files, using maximum number 20000\n"
    "CernVM-FS: loading Fuse module... done\n"
    "CernVM-FS: mounted cvmfs on {spool}/rdonly\n"
)
COMMITTED = (
    "Swissknife Ingest: Processing changes...\n"
    "Waiting for upload of files before committing...\n"
    "Committing file catalogs...\n"
    "Swissknife Ingest: Wait for all uploads to finish\n"
    "Swissknife Ingest: Exporting repository manifest\n"
    "Statistics stored at: {spool}/stats.db\n"
    f"Tagging {REPO}\n"
    "Flushing file system buffers\n"
    "Signing new manifest\n"
    "Remounting newly created repository revision\n"
)
MTIME = 1_700_000_000


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeStratum0]:
    """A fake stratum 0 with one plain repository."""
    stratum0 = FakeStratum0(tmp_path / "root")
    stratum0.mkfs(REPO)
    yield stratum0
    stratum0.kill_orphans()


@dataclass
class Member:
    """One member of a test tar."""

    name: str
    data: bytes | None = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    link: str = ""
    device: tuple[int, int] = (0, 0)


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    return Member(name, data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Member:
    return Member(name, None, tarfile.DIRTYPE, mode)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE, mode: int = 0o777) -> Member:
    return Member(name, None, kind, mode, target)


def tar_bytes(*members: Member, tar_format: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar of ``members`` (names may carry surrogates for raw bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tar_format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.mtime = MTIME
            info.linkname = member.link
            info.uid, info.gid, info.uname, info.gname = 1000, 1000, "builder", "builders"
            info.devmajor, info.devminor = member.device
            if member.data is not None:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def ingest(fake: FakeStratum0, data: bytes, base: str, *extra: str) -> tuple[int, str, str]:
    """Ingest ``data`` from stdin (``-t -``) into ``base``; (exit code, stdout, stderr)."""
    result = fake.run("ingest", "-t", "-", "-b", base, *extra, REPO, stdin=data)
    return result.returncode, result.stdout, result.stderr


def tree(fake: FakeStratum0, below: str) -> dict[str, tuple[str, int, int]]:
    """Published paths below ``below``: (type, mode, size)."""
    return {
        path: (entry.type, entry.mode, entry.size)
        for path, entry in fake.published_tree(REPO).items()
        if path == below or path.startswith(below + "/")
    }


def spool(fake: FakeStratum0) -> str:
    return str(fake.spool_dir(REPO))


# -- arguments --------------------------------------------------------------------------


def test_arguments_are_read_like_the_shell_loop() -> None:
    """Options before the repository, in any order; each position is looked at (so a
    value may also count as an option); the last argument of the loop is the repository."""
    parsed = parse_arguments(["-c", "-t", "-", "-b", "a//b/", "-d", "x", "-d", "y", "R/sub"])
    assert (parsed.repo, parsed.tar, parsed.base, parsed.deletes, parsed.catalog) == (
        "R",
        "-",
        "a/b/",
        ("x", "y"),
        True,
    )
    odd = parse_arguments(["-t", "-c", "-b", "base", "R"])
    assert (odd.tar, odd.catalog) == ("-c", True)
    stopped = parse_arguments(["-b", "base", "", "-t", "x", "R"])
    assert (stopped.repo, stopped.tar) == ("base", "")
    assert parse_arguments(["R"]).repo == "R"
    assert parse_arguments([]).repo == ""


def test_missing_parameters_are_refused_before_anything(fake: FakeStratum0) -> None:
    """No -t/-b/-d: the recorded message, exit 1, no eval line, nothing opened (m_ingest 2);
    -b without -t and -t without -b are refused the same way."""
    result = fake.run("ingest", REPO)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("Please provide some parameters, use -t $TAR_FILE")
    result = fake.run("ingest", "-b", "base", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith("Please provide the tarball to extract, use -t")
    result = fake.run("ingest", "-t", "x.tar", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith("Please set the base directory where to extract the tarball")
    assert fake.revision(REPO) == 1
    assert fake.state(REPO)["in_transaction_lock"] is False


# -- publishing a tar ---------------------------------------------------------------------


def test_ingest_publishes_one_revision_with_the_recorded_output(fake: FakeStratum0) -> None:
    """A new base: parents created (0755), one revision with an auto tag, the recorded
    lines, the eval line on stderr, exit 0, no lock left (m2_ingest 2-3)."""
    data = tar_bytes(directory("pkg/"), file("pkg/a.txt", b"a v1\n"), file("top.txt", b"top\n"))
    code, stdout, stderr = ingest(fake, data, "base/dir")
    assert (code, stderr) == (0, EVAL)
    tag = stdout.splitlines()[0]
    assert re.fullmatch(r"Using auto tag 'generic(_\d+)?-[0-9T:-]+Z'", tag)
    assert stdout == tag + "\n" + COMMITTED.format(spool=spool(fake))
    assert fake.revision(REPO) == 2
    assert any(name.startswith("generic") and rev == 2 for name, rev in fake.tags(REPO).items())
    assert tree(fake, "base") == {
        "base": ("dir", 0o755, 4096),
        "base/dir": ("dir", 0o755, 4096),
        "base/dir/pkg": ("dir", 0o755, 4096),
        "base/dir/pkg/a.txt": ("file", 0o644, 5),
        "base/dir/top.txt": ("file", 0o644, 4),
    }
    assert fake.read_file(REPO, "base/dir/pkg/a.txt") == b"a v1\n"
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["is_publishing_lock"], state["mount_mode"]) == (
        False,
        False,
        "ro",
    )
    assert (fake.union_dir(REPO) / "base/dir/pkg/a.txt").read_bytes() == b"a v1\n"
    assert fake.violations() == []


def test_a_second_ingest_merges_into_the_base(fake: FakeStratum0) -> None:
    """Files the new tar lacks stay, changed ones are replaced, new ones added (m2 5-6)."""
    first = tar_bytes(directory("pkg/"), file("pkg/a.txt", b"a v1\n"), file("pkg/b.txt", b"b\n"))
    assert ingest(fake, first, "base")[0] == 0
    second = tar_bytes(directory("pkg/"), file("pkg/a.txt", b"a v2 changed\n"), file("pkg/c.txt"))
    assert ingest(fake, second, "base")[0] == 0
    assert fake.read_file(REPO, "base/pkg/a.txt") == b"a v2 changed\n"
    assert fake.read_file(REPO, "base/pkg/b.txt") == b"b\n"
    assert set(tree(fake, "base/pkg")) == {"base/pkg", *(f"base/pkg/{n}.txt" for n in "abc")}
    assert fake.revision(REPO) == 3


def test_ingest_from_a_file_and_from_stdin(fake: FakeStratum0, tmp_path: Path) -> None:
    """``-t FILE`` (relative to the caller's directory) and ``-t -`` publish alike (m2 12)."""
    data = tar_bytes(file("x.txt", b"x\n"))
    (tmp_path / "x.tar").write_bytes(data)
    assert fake.run("ingest", "-t", "x.tar", "-b", "from-file", REPO, cwd=tmp_path).returncode == 0
    assert ingest(fake, data, "from-stdin")[0] == 0
    assert fake.read_file(REPO, "from-file/x.txt") == fake.read_file(REPO, "from-stdin/x.txt")


def test_delete_removes_files_and_trees_and_warns_about_the_rest(fake: FakeStratum0) -> None:
    """``--delete`` a file and a directory tree (m2 7-9); a missing path still publishes a
    revision, with the recorded warning (m_ingest 18); ``-d`` may repeat."""
    data = tar_bytes(directory("d/"), file("d/a"), file("d/sub/b"), file("keep"), file("f"))
    assert ingest(fake, data, "base")[0] == 0
    result = fake.run("ingest", "--delete", "base/f", "-d", "base/d", REPO)
    assert (result.returncode, result.stderr) == (0, EVAL)
    assert set(tree(fake, "base")) == {"base", "base/keep"}
    result = fake.run("ingest", "-d", "does/not/exist", REPO)
    assert result.returncode == 0
    assert result.stderr == (
        EVAL + "[WARNING] 'does/not/exist' cannot be deleted. Unrecognized file type.\n"
    )
    assert fake.revision(REPO) == 4


def test_catalog_option_makes_a_nested_catalog_at_the_base(fake: FakeStratum0) -> None:
    """``-c``: a visible ``.cvmfscatalog`` (0664, empty) at the base, listed by
    ``list-catalogs`` and ``check`` (m2 10-11)."""
    assert ingest(fake, tar_bytes(file("pkg/a.txt", b"a\n")), "cat/dir", "-c")[0] == 0
    assert tree(fake, "cat/dir/.cvmfscatalog") == {"cat/dir/.cvmfscatalog": ("file", 0o664, 0)}
    assert fake.run("list-catalogs", REPO).stdout == "/\n├─ /cat/dir\n"
    assert fake.run("list-catalogs", "-x", REPO).stdout == "/\n/cat/dir\n"
    check = fake.run("check", REPO)
    inspected = [line for line in check.stdout.splitlines() if "[inspecting catalog]" in line]
    assert check.returncode == 0
    assert [line.rsplit(" at ", 1)[1] for line in inspected] == ["/", "/cat/dir"]


def test_an_empty_archive_is_complete_but_not_with_c(fake: FakeStratum0) -> None:
    """An empty archive is complete (a revision without changes), but ``-c`` on it fails
    (SyncUnionTarball asserts the base was seen; the text is a guess) and publishes
    nothing."""
    assert ingest(fake, b"", "empty")[0] == 0
    assert fake.revision(REPO) == 2
    code, _, stderr = ingest(fake, b"", "empty", "-c")
    assert code == 1
    assert "Assertion" in stderr
    assert "Synchronization failed" in stderr
    assert fake.revision(REPO) == 2


# -- hostile members ------------------------------------------------------------------------


def test_absolute_names_go_below_the_base_and_dotdot_names_are_dropped(
    fake: FakeStratum0,
) -> None:
    """``/abs/x`` lands at ``BASE/abs/x``; ``../x`` and ``d/../../y`` vanish without a word
    and nothing lands outside (m2 13-18, 46)."""
    data = tar_bytes(
        file("/abs/evil.txt", b"e\n"),
        directory("d/"),
        file("../escape.txt"),
        file("d/../../escape2.txt"),
        file("d/ok.txt", b"k\n"),
    )
    code, _, stderr = ingest(fake, data, "hostile")
    assert (code, stderr) == (0, EVAL)
    assert set(tree(fake, "hostile")) == {
        "hostile",
        "hostile/abs",
        "hostile/abs/evil.txt",
        "hostile/d",
        "hostile/d/ok.txt",
    }
    assert not any("escape" in path for path in fake.published_tree(REPO))
    assert not any("escape" in path.name for path in fake.union_dir(REPO).rglob("*"))


def test_symlinks_are_kept_verbatim_with_their_mode(fake: FakeStratum0) -> None:
    """Absolute, upward and dangling targets are published as written, mode as archived
    (m2 19-21)."""
    data = tar_bytes(
        link("link-abs", "/etc/passwd", mode=0o644),
        link("link-up", "../../../../../etc", mode=0o644),
        link("link-dangling", "nowhere/x", mode=0o644),
    )
    assert ingest(fake, data, "links")[0] == 0
    published = fake.published_tree(REPO)
    assert {p: (e.type, e.target, e.size, e.mode) for p, e in published.items() if "/" in p} == {
        "links/link-abs": ("symlink", "/etc/passwd", 11, 0o644),
        "links/link-up": ("symlink", "../../../../../etc", 18, 0o644),
        "links/link-dangling": ("symlink", "nowhere/x", 9, 0o644),
    }
    assert os.readlink(fake.union_dir(REPO) / "links" / "link-abs") == "/etc/passwd"


def test_hard_links_become_independent_copies(fake: FakeStratum0) -> None:
    """A hard link to a member is published as a regular file with the same content
    (m2 22-24)."""
    data = tar_bytes(file("plain.txt", b"plain\n"), link("hard.txt", "plain.txt", tarfile.LNKTYPE))
    assert ingest(fake, data, "hard")[0] == 0
    published = fake.published_tree(REPO)
    assert published["hard/hard.txt"].type == "file"
    assert published["hard/hard.txt"].content == b"plain\n"
    assert published["hard/hard.txt"].hash == published["hard/plain.txt"].hash


def test_a_hard_link_out_of_the_archive_aborts_without_a_trace(fake: FakeStratum0) -> None:
    """A hard link to a path that is not in the new tree: exit 1 with the recorded PANIC,
    nothing published, no lock, the union as before (m2 25-27)."""
    before = fake.root_hash(REPO)
    data = tar_bytes(file("ok.txt", b"ok\n"), link("hard-out", "/etc/passwd", tarfile.LNKTYPE))
    code, stdout, stderr = ingest(fake, data, "hostile/hardlink_out")
    assert code == 1
    assert stdout.endswith(
        "Swissknife Ingest: Processing changes...\n"
        "Waiting for upload of files before committing...\n" + CHATTER.format(spool=spool(fake))
    )
    assert stderr.startswith(
        EVAL + "terminate called after throwing an instance of 'ECvmfsException'\n"
        "  what():  PANIC: <src>/cvmfs/catalog_mgr_rw.cc : 304\n"
        "catalog for file 'hostile/hardlink_out/etc/passwd' cannot be found, aborting\n"
        "Aborted\nSynchronization failed\n\nExecuted Command:\ncvmfs_swissknife ingest -u "
    )
    assert stderr.endswith(" -T - -B hostile/hardlink_out\n")
    assert f" -b {before} " in stderr
    assert fake.root_hash(REPO) == before
    assert fake.state(REPO)["in_transaction_lock"] is False
    assert not (fake.union_dir(REPO) / "hostile").exists()
    assert fake.run("transaction", REPO).returncode == 0


def test_fifos_and_devices_are_published_as_such(fake: FakeStratum0) -> None:
    """FIFOs and character/block devices keep their type, mode and device numbers
    (m2 28-33); the union shows the FIFO."""
    data = tar_bytes(
        Member("fifo", None, tarfile.FIFOTYPE, 0o644),
        Member("chr-null", None, tarfile.CHRTYPE, 0o666, device=(1, 3)),
        Member("blk-sda", None, tarfile.BLKTYPE, 0o660, device=(8, 0)),
    )
    assert ingest(fake, data, "special")[0] == 0
    assert tree(fake, "special") == {
        "special": ("dir", 0o755, 4096),
        "special/fifo": ("fifo", 0o644, 0),
        "special/chr-null": ("chardev", 0o666, 0),
        "special/blk-sda": ("blockdev", 0o660, 0),
    }
    entries = fake.catalog(REPO).entries
    assert entries["/special/chr-null"].rdev == os.makedev(1, 3)
    assert entries["/special/blk-sda"].rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO((fake.union_dir(REPO) / "special" / "fifo").lstat().st_mode)
    with pytest.raises(OSError, match="not a regular file"):
        fake.read_file(REPO, "special/fifo")


def test_cvmfscatalog_members_become_nested_catalogs(fake: FakeStratum0) -> None:
    """Each ``.cvmfscatalog`` member makes its directory a nested catalog; ``check``
    inspects them depth first (m2 34-36, 47)."""
    data = tar_bytes(
        directory("sub/"), file(".cvmfscatalog"), file("sub/.cvmfscatalog"), file("sub/f.txt")
    )
    assert ingest(fake, data, "hostile/cvmfscatalog")[0] == 0
    lines = fake.run("check", REPO).stdout.splitlines()
    inspected = [line.rsplit(" at ", 1)[1] for line in lines if "[inspecting catalog]" in line]
    assert inspected == ["/", "/hostile/cvmfscatalog", "/hostile/cvmfscatalog/sub"]
    assert fake.run("list-catalogs", REPO).stdout == (
        "/\n├─ /hostile/cvmfscatalog\n│  ├─ /hostile/cvmfscatalog/sub\n"
    )
    symlinked = tar_bytes(link(".cvmfscatalog", "elsewhere"))
    code, _, stderr = ingest(fake, symlinked, "bad")
    assert code == 1
    assert "Found entity called as a catalog marker 'bad/.cvmfscatalog'" in stderr


def test_long_names_are_published_though_the_union_cannot_hold_them(
    fake: FakeStratum0,
) -> None:
    """A 300-byte name is published (exit 0); the union lacks it (the client's lookup
    fails, m2 37-39) and a later publish keeps it."""
    long_name = "L" * 300
    deep = "d" * 120 + "/" + "n" * 200
    data = tar_bytes(file(long_name, b"l\n"), directory("d" * 120 + "/"), file(deep, b"n\n"))
    assert ingest(fake, data, "long")[0] == 0
    assert fake.read_file(REPO, f"long/{long_name}") == b"l\n"
    assert (fake.union_dir(REPO) / "long" / deep).read_bytes() == b"n\n"
    assert os.listdir(fake.union_dir(REPO) / "long") == ["d" * 120]
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "other.txt").write_text("other\n")
    fake.check_run("publish", REPO)
    assert f"long/{long_name}" in fake.published_tree(REPO)


def test_non_utf8_names_are_published_byte_for_byte(fake: FakeStratum0) -> None:
    """Names that are not UTF-8 reach the catalog and the union unchanged (m2 40-42)."""
    names = [b"bad-\xff\xfe.txt", b"latin1-caf\xe9.txt"]
    data = tar_bytes(*(file(os.fsdecode(name), b"x\n") for name in names))
    assert ingest(fake, data, "raw")[0] == 0
    published = {os.fsencode(p) for p in fake.published_tree(REPO)}
    assert {b"raw/" + name for name in names} <= published
    assert sorted(os.listdir(os.fsencode(fake.union_dir(REPO) / "raw"))) == sorted(names)


def test_modes_are_kept_and_owners_become_the_repository_owner(fake: FakeStratum0) -> None:
    """setuid, setgid, sticky and 000 stay; every entry belongs to CVMFS_USER, which is
    root in the recording (m2 43-45: ``-U 0 -G 0``)."""
    data = tar_bytes(
        file("setuid", b"#!/bin/sh\n", 0o4755),
        file("setgid", b"g\n", 0o2755),
        directory("sticky/", 0o1777),
        file("noperm", b"0\n", 0),
    )
    assert ingest(fake, data, "modes")[0] == 0
    assert {p: m for p, (_, m, _) in tree(fake, "modes").items()} == {
        "modes": 0o755,
        "modes/setuid": 0o4755,
        "modes/setgid": 0o2755,
        "modes/sticky": 0o1777,
        "modes/noperm": 0,
    }
    owner = pwd.getpwnam(fake.config(REPO)["CVMFS_USER"])
    owners = {(e.uid, e.gid) for p, e in fake.catalog(REPO).entries.items() if "modes" in p}
    assert owners == {(owner.pw_uid, owner.pw_gid)}


# -- failures -------------------------------------------------------------------------------


def test_ingest_during_a_transaction_fails_and_leaves_it_open(fake: FakeStratum0) -> None:
    """exit 1, the transaction's message and ``Impossible to start a transaction``; the
    open transaction stays as it was (m2 48-50, m_ingest 24-26)."""
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "pending.txt").write_text("pending\n")
    code, stdout, stderr = ingest(fake, tar_bytes(file("x")), "during/txn")
    assert (code, stdout) == (1, "")
    assert stderr == (
        EVAL + "CernVM-FS transaction error: another transaction is already open\n"
        "Impossible to start a transaction\n"
    )
    state = fake.state(REPO)
    assert (state["in_transaction_lock"], state["mount_mode"]) == (True, "rw")
    assert (fake.union_dir(REPO) / "pending.txt").exists()
    fake.check_run("publish", REPO)
    assert "pending.txt" in fake.published_tree(REPO)


def test_a_truncated_tar_publishes_nothing(fake: FakeStratum0) -> None:
    """A tar cut inside a member's content: exit 1 with the recorded messages, no revision,
    no partial tree, no lock; the repository stays usable (m2 51-55)."""
    whole = tar_bytes(
        directory("m/"), *(file(f"m/f{i:03d}.bin", bytes([i]) * 3000) for i in range(30))
    )
    cut = whole[: 512 + 25 * 3584 + 512 + 1000]
    before = fake.root_hash(REPO)
    code, stdout, stderr = ingest(fake, cut, "trunc/dir")
    assert code == 1
    assert stdout.endswith("Processing changes...\n" + CHATTER.format(spool=spool(fake)))
    assert stderr.startswith(
        EVAL + "failed to read data from the tar entry: /trunc/dir/m/f025.bin (-1)\n"
        " Truncated tar archive\n"
        "terminate called after throwing an instance of 'ECvmfsException'\n"
        "  what():  PANIC: <src>/cvmfs/ingestion/task_read.cc : 54\n"
        "failed to read /trunc/dir/m/f025.bin (-1)\nAborted\nSynchronization failed\n"
    )
    assert fake.root_hash(REPO) == before
    assert "trunc" not in fake.published_tree(REPO)
    assert not (fake.union_dir(REPO) / "trunc").exists()
    assert fake.state(REPO)["in_transaction_lock"] is False
    assert fake.run("transaction", REPO).returncode == 0
    assert fake.run("abort", "-f", REPO).returncode == 0
    assert fake.violations() == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not a tar archive at all\n" * 64, "Unrecognized archive format"),
        (b"not a tar", "Unrecognized archive format"),
        (gzip.compress(tar_bytes(file("x", b"x\n")), mtime=0), "Unrecognized archive format"),
    ],
    ids=["text", "short", "gzip"],
)
def test_what_is_not_a_tar_is_refused(fake: FakeStratum0, data: bytes, message: str) -> None:
    """Not a tar (also a compressed one: no filter is registered): exit 1, the recorded
    initialisation failure, nothing published, no lock (m2 56-57)."""
    code, stdout, stderr = ingest(fake, data, "garbage/dir")
    assert code == 1
    assert stdout.endswith("Processing changes...\n" + CHATTER.format(spool=spool(fake)))
    assert stderr.startswith(
        EVAL + f"Impossible to open the archive: {message}\n"
        "Swissknife Ingest: Initialization of the synchronisation engine failed\n"
        "Synchronization failed\n\nExecuted Command:\ncvmfs_swissknife ingest "
    )
    assert fake.revision(REPO) == 1
    assert fake.state(REPO)["in_transaction_lock"] is False


def test_a_missing_tar_file_is_named(fake: FakeStratum0, tmp_path: Path) -> None:
    """``-t`` naming no file: ``Failed to open '<absolute path>'`` (m_ingest 19)."""
    result = fake.run("ingest", "-t", "missing.tar", "-b", "x", REPO, cwd=tmp_path)
    assert result.returncode == 1
    assert f"Impossible to open the archive: Failed to open '{tmp_path}/missing.tar'\n" in (
        result.stderr
    )
    assert fake.revision(REPO) == 1


def test_libarchive_ends_where_the_fake_ends(fake: FakeStratum0) -> None:
    """A tar stopping between two members and an empty stream are complete archives and
    publish; a header whose content never comes is a truncated one (the tar the daemon
    leaves when an archive changes under it)."""
    whole = tar_bytes(file("a", b"a\n"), file("b", b"b\n"))
    assert ingest(fake, whole[:1024], "between")[0] == 0
    assert set(tree(fake, "between")) == {"between", "between/a"}
    assert ingest(fake, b"", "empty")[0] == 0
    code, _, stderr = ingest(fake, whole[:1536], "header-only")
    assert code == 1
    assert "failed to read data from the tar entry: /header-only/b (-1)" in stderr
    code, _, stderr = ingest(fake, whole[:1024] + b"\0" * 100, "cut-header")
    assert code == 1
    assert "Fatal error in reading the archive.\nTruncated tar archive\n\nAborted\n" in stderr


def test_a_damaged_header_is_skipped_with_a_retry_note(fake: FakeStratum0) -> None:
    """A header with a wrong checksum is reported on stdout and skipped, and what follows
    is read (libarchive's ARCHIVE_RETRY)."""
    whole = bytearray(tar_bytes(file("a", b"a\n"), file("b", b"b\n"), file("c", b"c\n")))
    whole[1024 + 148 : 1024 + 156] = b"0000000\0"
    code, stdout, _ = ingest(fake, bytes(whole), "damaged")
    assert code == 0
    assert "Error in reading the header, retrying.\nDamaged tar archive\n\n" in stdout
    assert set(tree(fake, "damaged")) == {"damaged", "damaged/a", "damaged/c"}


def test_ingest_fault_points(fake: FakeStratum0) -> None:
    """``start`` fails the ingest's own transaction (its message, then ``Impossible to
    start a transaction``); ``upload`` fails swissknife after the archive was read: the
    cleanup, ``Synchronization failed``, no revision and no lock either way."""
    data = tar_bytes(file("x", b"x\n"))
    fake.inject_fault("ingest", "fail", at="start", times=1)
    code, _, stderr = ingest(fake, data, "faulty")
    assert (code, stderr) == (
        1,
        EVAL + "cannot load whitelist [failed to download whitelist]\n"
        "Impossible to start a transaction\n",
    )
    fake.inject_fault("ingest", "fail", at="upload", times=1)
    code, stdout, stderr = ingest(fake, data, "faulty")
    assert code == 1
    assert stdout.endswith(CHATTER.format(spool=spool(fake)))
    assert stderr.startswith(
        EVAL + "fake fault: ingest failed at upload\nSynchronization failed\n\nExecuted Command:\n"
    )
    assert fake.revision(REPO) == 1
    assert fake.state(REPO)["in_transaction_lock"] is False
    assert not (fake.union_dir(REPO) / "faulty").exists()
    assert ingest(fake, data, "faulty")[0] == 0


# -- progress, defragmentation, costs -------------------------------------------------------


def test_progress_dots_and_the_defragmentation_note(fake: FakeStratum0) -> None:
    """A dot per 100 changed entries, then a line break (m2 58); deleting most rows of a
    catalog (not its last ones) defragments it (m2 8: ``37.50% wasted row IDs``)."""
    data = tar_bytes(*(file(f"f{i:03d}", b"%d\n" % i) for i in range(250)))
    code, stdout, _ = ingest(fake, data, "many")
    assert code == 0
    assert "Processing changes...\n..\nWaiting for upload" in stdout
    assert ingest(fake, tar_bytes(file("x")), "tail")[0] == 0
    result = fake.run("ingest", "-d", "many", REPO)
    # rows /, /new_repository, /tail (254) and /tail/x (255) are left
    waste = (1 - 4 / 255) * 100
    assert f"Committing file catalogs...\nNote: Catalog at / gets defragmented ({waste:.2f}% " in (
        result.stdout
    )
    again = fake.run("ingest", "-d", "tail/x", REPO)
    assert "defragmented" not in again.stdout


@pytest.mark.timeout(60)
def test_ingest_costs_pad_by_base_and_file(fake: FakeStratum0) -> None:
    """With costs set, an ingest lasts at least base + files x per_file, holding the
    transaction lock meanwhile; the calibrated values give back the recorded 10 000-file
    ratio against transaction + tar -x + publish (docs/fake-cvmfs.md, "Costs")."""
    fake.set_costs({"ingest": {"base": 0.3, "per_file": 0.05}})
    data = tar_bytes(*(file(f"f{i}", b"x") for i in range(6)), directory("d/"))
    started = time.monotonic()
    assert ingest(fake, data, "timed")[0] == 0
    assert time.monotonic() - started >= 0.3 + 6 * 0.05
    calibrated = CALIBRATED_COSTS["ingest"]
    assert calibrated["base"] == 0.39
    tenk = calibrated["base"] + 10_000 * calibrated["per_file"]
    publish = CALIBRATED_COSTS["publish"]
    untar_publish = (
        CALIBRATED_COSTS["transaction"]["base"]
        + 0.8
        + publish["base"]
        + 10_000 * publish["per_file"]
    )
    assert tenk / untar_publish == pytest.approx(1.64 / 2.17, abs=0.01)
    with pytest.raises(ValueError, match="invalid cost"):
        fake.set_costs({"ingest": {"per_graft": 1.0}})


# -- the tar reader against libarchive --------------------------------------------------------

_LIBRARY = ctypes.util.find_library("archive")


def _libarchive_read(data: bytes) -> list[tuple[str, bytes]]:
    """What libarchive (tar and empty formats, as ingest) reports, as (event, detail)."""
    assert _LIBRARY is not None
    lib = ctypes.CDLL(_LIBRARY)
    pointer = ctypes.c_void_p
    lib.archive_read_new.restype = pointer
    for function in (
        "archive_read_support_format_tar",
        "archive_read_support_format_empty",
        "archive_read_free",
    ):
        getattr(lib, function).argtypes = [pointer]
    lib.archive_read_open_memory.argtypes = [pointer, ctypes.c_char_p, ctypes.c_size_t]
    lib.archive_read_next_header.argtypes = [pointer, ctypes.POINTER(pointer)]
    lib.archive_entry_pathname.argtypes = [pointer]
    lib.archive_entry_pathname.restype = ctypes.c_char_p
    lib.archive_read_data.argtypes = [pointer, pointer, ctypes.c_size_t]
    lib.archive_read_data.restype = ctypes.c_ssize_t
    archive = lib.archive_read_new()
    events: list[tuple[str, bytes]] = []
    try:
        lib.archive_read_support_format_tar(archive)
        lib.archive_read_support_format_empty(archive)
        if lib.archive_read_open_memory(archive, data, len(data)) != 0:
            return [("unrecognized", b"")]
        entry = pointer()
        buffer = ctypes.create_string_buffer(65536)
        for _ in range(64):
            status = lib.archive_read_next_header(archive, ctypes.byref(entry))
            if status == 1:
                return [*events, ("end", b"")]
            if status == -30:
                return [*events, ("fatal", b"")]
            if status == -10:
                events.append(("damaged", b""))
                continue
            content = bytearray()
            while (got := lib.archive_read_data(archive, buffer, len(buffer))) > 0:
                content += buffer.raw[:got]
            name = lib.archive_entry_pathname(entry) or b""
            if got < 0:
                return [*events, ("cut", name)]
            events.append(("member", name + b"=" + bytes(content)))
        return events
    finally:
        lib.archive_read_free(archive)


def _fake_read(data: bytes) -> list[tuple[str, bytes]]:
    """The same events from the fake's reader."""
    try:
        reader = TarReader(io.BytesIO(data))
    except ArchiveOpenError:
        return [("unrecognized", b"")]
    events: list[tuple[str, bytes]] = []
    for _ in range(64):
        try:
            member = reader.next_member()
        except ArchiveFatal:
            return [*events, ("fatal", b"")]
        if member is None:
            return [*events, ("end", b"")]
        if isinstance(member, Damaged):
            events.append(("damaged", b""))
            continue
        try:
            content = b"".join(reader.content())
        except ArchiveDataError:
            return [*events, ("cut", member.name)]
        events.append(("member", member.name + b"=" + content))
    return events


def _streams() -> dict[str, bytes]:
    two = tar_bytes(file("a", b"A" * 10), file("b", b"B" * 700))
    damaged = bytearray(two)
    damaged[1024 + 148 : 1024 + 156] = b"0000000\0"
    odd = tar_bytes(
        file("x" * 150, b"long name"),
        file(os.fsdecode(b"caf\xe9"), b"latin-1"),
        directory("d/"),
        link("d/l", "../x"),
        link("h", "d/l", tarfile.LNKTYPE),
        Member("p", None, tarfile.FIFOTYPE),
    )
    return {
        "empty": b"",
        "whole": two,
        "between members": two[:1024],
        "header only": two[:512],
        "content cut": two[:515],
        "padding cut": two[:522],
        "header cut": two[: 1024 + 100],
        "zero tail cut": two[:1024] + b"\0" * 300,
        "damaged header": bytes(damaged),
        "short garbage": b"not a tar",
        "block of garbage": b"garbage!" * 64,
        "zero blocks": b"\0" * 1024,
        "short zeros": b"\0" * 100,
        "zero block then junk": two[:1024] + b"\0" * 512 + b"junk",
        "gnu names and links": odd,
        "pax": tar_bytes(file("p" * 150, b"pax"), file("q"), tar_format=tarfile.PAX_FORMAT),
        "ustar prefix": tar_bytes(file("u/" * 60 + "f", b"u"), tar_format=tarfile.USTAR_FORMAT),
    }


@pytest.mark.skipif(_LIBRARY is None, reason="libarchive is not installed")
@pytest.mark.parametrize("name", sorted(_streams()))
def test_the_fake_reads_tars_as_libarchive_does(name: str) -> None:
    """Members, contents, skipped headers and where reading stops match libarchive's."""
    data = _streams()[name]
    assert _fake_read(data) == _libarchive_read(data)


# -- the rest of the fake keeps what ingest published -----------------------------------------


def test_publish_and_diff_keep_special_entries(fake: FakeStratum0) -> None:
    """A later transaction + publish keeps ingested FIFOs and devices unchanged; diff
    counts them as files (a guess)."""
    data = tar_bytes(
        Member("fifo", None, tarfile.FIFOTYPE, 0o600),
        Member("tty", None, tarfile.CHRTYPE, 0o620, device=(4, 1)),
    )
    assert ingest(fake, data, "dev")[0] == 0
    diff = fake.run("diff", REPO)
    assert (diff.returncode, "d(# regular files): 2" in diff.stdout) == (0, True)
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "later.txt").write_text("later\n")
    fake.check_run("publish", REPO)
    kinds = {p: e.type for p, e in fake.published_tree(REPO).items() if p.startswith("dev/")}
    assert kinds == {"dev/fifo": "fifo", "dev/tty": "chardev"}
    assert fake.violations() == []
