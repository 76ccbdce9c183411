"""The second read: the plain tar written for ``ingest``, and what happens when the archive
read again is not the one that was checked."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.emit import TRIPWIRE_NAME, emit_plain_tar
from cvmfs_syncd.ingest.model import (
    ArchiveChanged,
    ArchiveStreamError,
    IngestLimits,
    Manifest,
    Member,
    MemberKind,
    Refusal,
    RefusalReason,
)
from tests.ingest.archives import (
    MTIME,
    Trickle,
    compress,
    contents_of,
    directory,
    file,
    hardlink,
    members_of,
    symlink,
    tar_bytes,
)
from tests.support import require

END_OF_ARCHIVE = bytes(1024)


def checked(data: bytes, limits: IngestLimits | None = None) -> Manifest:
    found = check_archive(Trickle(data), limits)
    assert isinstance(found, Manifest), found
    return found


def emitted(data: bytes, found: Manifest | None = None) -> bytes:
    out = io.BytesIO()
    emit_plain_tar(Trickle(data), found or checked(data), out)
    return out.getvalue()


_SAMPLE = tar_bytes(
    directory("./"),
    file("./pkg/bin/tool", b"#!/bin/sh\n", mode=0o4755),
    directory("pkg", mode=0o2750),
    symlink("pkg/tool-link", "bin/tool"),
    hardlink("pkg/tool-hard", "./pkg/bin/tool"),
    file("pkg/share/data.txt", b"d" * 5000, mode=0o1644),
    directory("empty/", mode=0o700),
    file("top.txt", b"top"),
)


def test_round_trip() -> None:
    """The tar lists what the Manifest's plan writes: normalised names, owners 0:0 without
    names, modes without setuid/setgid/sticky, directories before their content, the same
    content; checked again it has the same members plus the implied directories."""
    found = checked(_SAMPLE)
    out = emitted(_SAMPLE, found)
    infos = members_of(out)
    planned = [step.member for step in found.output_plan() if step.write]
    assert [i.name for i in infos] == [m.path for m in planned]
    assert [i.name for i in infos] == [
        "pkg",
        "pkg/bin",
        "pkg/bin/tool",
        "pkg/tool-link",
        "pkg/tool-hard",
        "pkg/share",
        "pkg/share/data.txt",
        "empty",
        "top.txt",
    ]
    for info, member in zip(infos, planned, strict=True):
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
        assert info.mode == member.mode and info.mode & 0o7000 == 0
        assert info.mtime == member.mtime
    kinds = {i.name: i.type for i in infos}
    assert kinds["pkg/tool-hard"] == tarfile.LNKTYPE
    assert {i.name: i.linkname for i in infos if i.linkname} == {
        "pkg/tool-link": "bin/tool",
        "pkg/tool-hard": "pkg/bin/tool",
    }
    assert [i.mode for i in infos if i.name in ("pkg", "pkg/bin", "pkg/bin/tool")] == [
        0o750,
        0o755,
        0o755,
    ]
    assert contents_of(out) == {
        "pkg/bin/tool": b"#!/bin/sh\n",
        "pkg/share/data.txt": b"d" * 5000,
        "top.txt": b"top",
    }
    assert out.endswith(END_OF_ARCHIVE)
    again = checked(out)
    assert {m.path: m for m in again.members} == {m.path: m for m in planned}
    assert again.implied_directories == ()


def test_emitting_is_deterministic_whatever_the_compression() -> None:
    """The same archive gives the same tar, compressed or not."""
    plain = emitted(_SAMPLE)
    for how in ("gzip", "xz", "bzip2"):
        packed = compress(_SAMPLE, how)
        assert emitted(packed) == plain


def test_implied_directories_come_first() -> None:
    """Directories the archive never lists are written (0755, the mtime of the member that
    first needs them) before their children; one listed after its children is written
    once, ahead, with its own mode."""
    data = tar_bytes(file("a/b/f", mtime=MTIME + 5), file("a/c/g"), directory("a/b", mode=0o700))
    infos = members_of(emitted(data))
    assert [(i.name, i.type, i.mode, i.mtime) for i in infos] == [
        ("a", tarfile.DIRTYPE, 0o755, MTIME + 5),
        ("a/b", tarfile.DIRTYPE, 0o700, MTIME),
        ("a/b/f", tarfile.REGTYPE, 0o644, MTIME + 5),
        ("a/c", tarfile.DIRTYPE, 0o755, MTIME),
        ("a/c/g", tarfile.REGTYPE, 0o644, MTIME),
    ]


def test_output_plan_reads_every_member_once_in_order() -> None:
    """The plan reads archive members in order, each once, and writes every path once."""
    found = checked(tar_bytes(file("x/y/z"), directory("x"), directory("x/y"), file("w")))
    steps = list(found.output_plan())
    assert [s.index for s in steps if s.index is not None] == [0, 1, 2, 3]
    written = [s.member.path for s in steps if s.write]
    assert written == ["x", "x/y", "x/y/z", "w"]
    assert [s.write for s in steps if s.index is not None] == [True, False, False, True]


def test_long_and_non_utf8_names_survive_byte_for_byte() -> None:
    """Long names, long link targets and bytes that are not UTF-8 are written as they were
    archived (GNU long-name records), and read back unchanged."""
    names = ["d" * 120 + "/" + "n" * 200, "bad-\udcff\udcfe.txt", "caf\udce9", "é" * 120]
    target = "../" + "t" * 150 + "/caf\udce9"
    data = tar_bytes(
        *(file(n, b"x") for n in names), directory("d" * 120), symlink("d" * 120 + "/l", target)
    )
    out = emitted(data)
    infos = members_of(out)
    assert {os.fsencode(i.name) for i in infos} >= {os.fsencode(n) for n in names}
    assert [i.linkname for i in infos if i.issym()] == [target]
    raw = out
    assert b"bad-\xff\xfe.txt" in raw and b"caf\xe9" in raw
    assert b"././@LongLink" in raw  # GNU records, no PAX headers
    assert b"path=" not in raw


def test_large_content_streams_in_bounded_memory() -> None:
    """Emitting 64 MiB of content keeps little of it in memory."""
    data = compress(tar_bytes(file("big", bytes(64 * 1024 * 1024))), "gzip")
    found = checked(data)

    class Sink:
        written = 0

        def write(self, chunk: bytes) -> int:
            self.written += len(chunk)
            return len(chunk)

    sink = Sink()
    tracemalloc.start()
    try:
        emit_plain_tar(Trickle(data, chunk=65536), found, sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.written == 512 + 64 * 1024 * 1024 + 1024
    assert peak < 16 * 1024 * 1024


# --- the archive is not the one that was checked ------------------------------------

_BEFORE = tar_bytes(directory("d"), file("d/a", b"a" * 600), file("d/b", b"bbb"), file("e", b"e"))


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (
            tar_bytes(
                directory("d"), file("d/A", b"a" * 600), file("d/b", b"bbb"), file("e", b"e")
            ),
            "path",
        ),
        (
            tar_bytes(
                directory("d"), file("d/a", b"a" * 601), file("d/b", b"bbb"), file("e", b"e")
            ),
            "size",
        ),
        (
            tar_bytes(
                directory("d"),
                file("d/a", b"a" * 600, mode=0o600),
                file("d/b", b"bbb"),
                file("e", b"e"),
            ),
            "mode",
        ),
        (
            tar_bytes(directory("d"), symlink("d/a", "x"), file("d/b", b"bbb"), file("e", b"e")),
            "kind",
        ),
        (tar_bytes(directory("d"), file("d/a", b"a" * 600), file("d/b", b"bbb")), "ends before"),
        (
            tar_bytes(
                directory("d"),
                file("d/a", b"a" * 600),
                file("d/b", b"bbb"),
                file("e", b"e"),
                file("f"),
            ),
            "more members",
        ),
        (
            tar_bytes(
                directory("d"), file("d/a", b"A" * 600), file("d/b", b"bbb"), file("e", b"e")
            ),
            "bytes differ",
        ),
        (
            tar_bytes(
                directory("d"), file("d/a", b"a" * 600), file("d/../b", b"bbb"), file("e", b"e")
            ),
            "'..'",
        ),
        (_BEFORE[:1800], "can no longer be read"),
        (_BEFORE[: 4 * 512], "can no longer be read"),
    ],
    ids=[
        "renamed",
        "resized",
        "mode",
        "kind",
        "missing",
        "extra",
        "content",
        "refused",
        "cut",
        "cut-at-boundary",
    ],
)
def test_a_changed_archive_leaves_an_unreadable_tar(after: bytes, expected: str) -> None:
    """When the second read differs from the Manifest, emitting raises ArchiveChanged, and
    the tar written has no end-of-archive marker and cannot be read to its end: it stops
    inside a member's content, or a last header promises content that never comes."""
    found = checked(_BEFORE)
    out = io.BytesIO()
    with pytest.raises(ArchiveChanged, match=expected):
        emit_plain_tar(Trickle(after), found, out)
    written = out.getvalue()
    assert not written.endswith(END_OF_ARCHIVE)
    with pytest.raises(tarfile.ReadError):
        members_of(written)
    again = check_archive(io.BytesIO(written), IngestLimits(allow_reserved_names=True))
    assert isinstance(again, Refusal) and again.reason is RefusalReason.UNREADABLE


def test_a_change_found_before_anything_was_written() -> None:
    """Even a difference in the very first member leaves a tar that is not read as an empty
    archive (which ``ingest`` would publish, with its deletions)."""
    found = checked(tar_bytes(file("a", b"")))
    out = io.BytesIO()
    with pytest.raises(ArchiveChanged):
        emit_plain_tar(Trickle(tar_bytes(file("b", b""))), found, out)
    assert TRIPWIRE_NAME.encode() in out.getvalue()
    with pytest.raises(tarfile.ReadError):
        members_of(out.getvalue())


def test_a_change_in_the_middle_of_content_needs_no_more() -> None:
    """A member cut short leaves the tar ending inside that member's content."""
    data = tar_bytes(file("big", b"x" * 50_000))
    found = checked(data)
    out = io.BytesIO()
    with pytest.raises(ArchiveChanged):
        emit_plain_tar(Trickle(data[:30_000]), found, out)
    assert TRIPWIRE_NAME.encode() not in out.getvalue()
    assert len(out.getvalue()) < 512 + 50_000


def test_a_failing_stream_spoils_the_tar_too() -> None:
    """A read failure of the stream raises ArchiveStreamError and spoils the output."""
    data = tar_bytes(file("a", b"a" * 3000), file("b", b"b"))
    found = checked(data)
    out = io.BytesIO()
    with pytest.raises(ArchiveStreamError):
        emit_plain_tar(Trickle(data, chunk=512, fail_after=4096), found, out)
    with pytest.raises(tarfile.ReadError):
        members_of(out.getvalue())


def test_an_output_failure_is_raised_as_it_is() -> None:
    """A broken pipe to ``ingest`` is raised as BrokenPipeError, not as a changed archive."""

    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError(32, f"Broken pipe ({len(data)} bytes lost)")

    with pytest.raises(BrokenPipeError):
        emit_plain_tar(Trickle(_BEFORE), checked(_BEFORE), Broken())


def test_a_tar_stopped_at_a_member_boundary_reads_as_complete() -> None:
    """Why the tripwire: without it, a tar that merely stops between members (no
    end-of-archive marker) is read by tarfile as a complete, shorter archive."""
    whole = tar_bytes(file("a", b"a"), file("b", b"b"))
    cut = whole[:1024]  # the first member's header and content
    assert [i.name for i in members_of(cut)] == ["a"]


# --- GNU tar reads the same ---------------------------------------------------------


def _gnu_tar() -> str:
    tar = shutil.which("tar")
    require(tar, "GNU tar is not installed")
    assert tar is not None
    return tar


def _gnu_tar_list(data: bytes, where: Path) -> subprocess.CompletedProcess[str]:
    path = where / "out.tar"
    path.write_bytes(data)
    return subprocess.run(
        [_gnu_tar(), "-tvf", str(path)], capture_output=True, text=True, check=False, timeout=60
    )


def test_gnu_tar_reads_the_emitted_tar(tmp_path: Path) -> None:
    """GNU tar lists the emitted tar without complaint, long names included."""
    long_path = "d" * 200 + "/" + "n" * 250
    data = tar_bytes(file(long_path, b"x"), symlink("l", "t" * 200), file("f", b"f"))
    listed = _gnu_tar_list(emitted(data), tmp_path)
    assert (listed.returncode, listed.stderr) == (0, "")
    assert long_path in listed.stdout and "t" * 200 in listed.stdout


def test_gnu_tar_fails_on_a_spoiled_tar(tmp_path: Path) -> None:
    """GNU tar reports the unfinished tar left by a changed archive as cut short."""
    found = checked(_BEFORE)
    out = io.BytesIO()
    changed = tar_bytes(directory("d"), file("d/a", b"a" * 600), file("d/b", b"BBB"))
    with pytest.raises(ArchiveChanged):
        emit_plain_tar(Trickle(changed), found, out)
    listed = _gnu_tar_list(out.getvalue(), tmp_path)
    assert listed.returncode != 0
    assert "Unexpected EOF" in listed.stderr


def test_gnu_sparse_members_are_filled_in(tmp_path: Path) -> None:
    """A sparse file archived by GNU tar is checked and emitted as a regular file with its
    holes as zeros."""
    source = tmp_path / "src"
    source.mkdir()
    sparse = source / "sparse.img"
    with sparse.open("wb") as handle:
        handle.write(b"head")
        handle.seek(1024 * 1024)
        handle.write(b"tail")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        [
            _gnu_tar(),
            "--sparse",
            "--format=gnu",
            "-C",
            str(source),
            "-cf",
            str(archive),
            "sparse.img",
        ],
        check=True,
        timeout=60,
    )
    data = archive.read_bytes()
    found = checked(data)
    assert found.members == (
        Member(
            "sparse.img",
            MemberKind.FILE,
            found.members[0].mode,
            1024 * 1024 + 4,
            found.members[0].mtime,
        ),
    )
    content = contents_of(emitted(data, found))["sparse.img"]
    assert content == b"head" + bytes(1024 * 1024 - 4) + b"tail"
