"""The first read of an archive: one test per refusal class, and what a Manifest holds."""

from __future__ import annotations

import hashlib
import io
import tarfile
import tracemalloc
import zlib

import pytest

from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.links import MAX_HOPS
from cvmfs_syncd.ingest.model import (
    ArchiveStreamError,
    IngestLimits,
    Manifest,
    Member,
    MemberKind,
    Refusal,
    RefusalReason,
)
from cvmfs_syncd.ingest.names import Compression
from cvmfs_syncd.ingest.streams import TRAILER_MAX
from tests.ingest.archives import (
    MTIME,
    Entry,
    Trickle,
    compress,
    directory,
    file,
    hardlink,
    special,
    symlink,
    tar_bytes,
)


def manifest(
    data: bytes, limits: IngestLimits | None = None, compression: Compression | None = None
) -> Manifest:
    result = check_archive(Trickle(data), limits, compression=compression)
    assert isinstance(result, Manifest), result
    return result


def refusal(*entries: Entry, limits: IngestLimits | None = None) -> Refusal:
    result = check_archive(Trickle(tar_bytes(*entries)), limits)
    assert isinstance(result, Refusal), result
    return result


def refused_bytes(data: bytes, compression: Compression | None = None) -> Refusal:
    result = check_archive(Trickle(data), compression=compression)
    assert isinstance(result, Refusal), result
    return result


ALLOW_ALL = IngestLimits(allow_absolute_symlinks=True, allow_reserved_names=True)

# --- what a Manifest holds ----------------------------------------------------------


def test_manifest_of_a_small_archive() -> None:
    """Members keep archive order with normalised names, stripped modes, sizes, whole-second
    mtimes and link targets; totals, length and SHA-256 describe the bytes read."""
    data = tar_bytes(
        directory("./"),
        directory("./pkg/", mode=0o2755),
        file("./pkg/a.txt", b"hello", mode=0o4755, mtime=MTIME + 0.75),
        symlink("pkg/link", "a.txt"),
        hardlink("pkg/hard", "./pkg/a.txt"),
        file("top.txt", b"top", mode=0o600),
    )
    found = manifest(data)
    assert found.members == (
        Member("pkg", MemberKind.DIRECTORY, 0o755, 0, MTIME),
        Member("pkg/a.txt", MemberKind.FILE, 0o755, 5, MTIME),
        Member("pkg/link", MemberKind.SYMLINK, 0o777, 0, MTIME, "a.txt"),
        Member("pkg/hard", MemberKind.HARDLINK, 0o644, 0, MTIME, "pkg/a.txt"),
        Member("top.txt", MemberKind.FILE, 0o600, 3, MTIME),
    )
    assert found.implied_directories == ()
    assert (found.member_count, found.total_bytes) == (5, 8)
    assert found.archive_bytes == len(data)
    assert found.digest == hashlib.sha256(data).hexdigest()


def test_implied_directories_in_the_order_first_needed() -> None:
    """Directories that only member paths name are listed, shallowest first; one listed
    later in the archive stops being implied."""
    found = manifest(tar_bytes(file("a/b/c/f"), file("x/y"), directory("a/b")))
    assert found.implied_directories == ("a", "a/b/c", "x")
    assert found.entries()["a/b"].value == "dir"
    assert set(found.entries()) == {"a", "a/b", "a/b/c", "a/b/c/f", "x", "x/y"}


def test_names_are_normalised() -> None:
    """Leading ``./``, doubled slashes, ``.`` components and a trailing slash go."""
    found = manifest(tar_bytes(file("./a//./b/"), directory("./d/./e//")))
    assert [m.path for m in found.members] == ["a/b", "d/e"]


@pytest.mark.parametrize("how", ["gzip", "xz", "bzip2"])
def test_compressed_archives(how: str) -> None:
    """A compressed archive has the members of its plain tar, found by its first bytes or
    by the compression its suffix names; length and digest are of the compressed bytes."""
    plain = tar_bytes(directory("d"), file("d/f", b"x" * 70_000), symlink("l", "d/f"))
    packed = compress(plain, how)
    by_magic = manifest(packed)
    by_name = manifest(packed, compression=Compression(how))
    assert by_magic.members == by_name.members == manifest(plain).members
    assert by_magic.archive_bytes == len(packed)
    assert by_magic.digest == hashlib.sha256(packed).hexdigest()


def test_long_and_non_utf8_names() -> None:
    """PAX and GNU long names and names that are not UTF-8 are accepted; the bytes that are
    not UTF-8 are kept as surrogate escapes."""
    names = ["d" * 120 + "/" + "n" * 200, "bad-\udcff\udcfe.txt", "latin1-caf\udce9.txt", "é" * 100]
    for tar_format in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        found = manifest(tar_bytes(*(file(n, b"1") for n in names), tar_format=tar_format))
        assert [m.path for m in found.members] == names


def test_the_base_entry_is_not_a_member() -> None:
    """``.`` and ``./`` name the base itself: skipped, however often they appear."""
    found = manifest(tar_bytes(directory("."), directory("./"), file("f")))
    assert [m.path for m in found.members] == ["f"]


def test_an_archive_of_nothing() -> None:
    """An archive with no members (only the end-of-archive marker) is an empty Manifest."""
    found = manifest(tar_bytes())
    assert found.members == () and found.total_bytes == 0


def test_reserved_names_when_allowed() -> None:
    """With ``allow_reserved_names`` a ``.cvmfscatalog`` file is a member like any other."""
    found = manifest(tar_bytes(file(".cvmfscatalog"), file("sub/.cvmfsdirtab")), ALLOW_ALL)
    assert [m.path for m in found.members] == [".cvmfscatalog", "sub/.cvmfsdirtab"]


def test_absolute_symlinks_when_allowed() -> None:
    """With ``allow_absolute_symlinks`` an absolute target is kept as it is."""
    found = manifest(tar_bytes(symlink("etc", "/etc/passwd")), ALLOW_ALL)
    assert found.members[0].link_target == "/etc/passwd"


@pytest.mark.parametrize(
    "entries",
    [
        [symlink("a/b/up", "../../x")],
        [symlink("l", "nowhere/x")],
        [symlink("l", "./a/./../b/")],
        [directory("d"), symlink("d/l", ".."), symlink("x", "d/l/d")],
        [symlink("a/l", "../b/l2"), symlink("b/l2", "../c")],
        [symlink("self", "self")],
        [file("f"), symlink("l", "f/..")],
    ],
    ids=[
        "up-to-base",
        "dangling",
        "dots",
        "through-link",
        "chain",
        "self-loop-last",
        "file-dotdot",
    ],
)
def test_symlinks_that_stay_inside(entries: list[Entry]) -> None:
    """Relative targets that never leave the base are accepted, dangling ones included; a
    symlink named as the last component is not followed."""
    found = manifest(tar_bytes(*entries))
    assert len(found.members) == len(entries)


def test_check_reads_from_a_trickle() -> None:
    """A stream that gives a few bytes per read (a network body) reads like a file."""
    data = compress(tar_bytes(file("a", b"x" * 10_000)), "gzip")
    assert check_archive(Trickle(data, chunk=3)) == check_archive(io.BytesIO(data))


# --- one refusal per class ----------------------------------------------------------


@pytest.mark.parametrize("name", ["/abs/evil.txt", "//x"])
def test_absolute_names(name: str) -> None:
    """A member with an absolute name is refused (ingest would put it under the base)."""
    found = refusal(file(name))
    assert (found.reason, found.member) == (RefusalReason.ABSOLUTE_NAME, name)


@pytest.mark.parametrize("name", ["../escape.txt", "d/../../escape2.txt", "a/../b", ".."])
def test_dot_dot_components(name: str) -> None:
    """A ``..`` component is refused wherever it is (ingest would drop it silently)."""
    found = refusal(file("ok.txt"), file(name))
    assert (found.reason, found.member) == (RefusalReason.DOT_DOT, name)


@pytest.mark.parametrize(
    "name", ["L" * 256, "d/" + "é" * 128, "/".join(["x" * 200] * 21)], ids=["300", "utf8", "path"]
)
def test_names_too_long(name: str) -> None:
    """A component over 255 bytes (ingest publishes it, clients cannot look it up) or a path
    over 4095 bytes is refused."""
    assert refusal(file(name)).reason is RefusalReason.BAD_NAME


@pytest.mark.parametrize("name", [".cvmfscatalog", "sub/.cvmfsdirtab", ".cvmfsgraft-f", ".cvmfs"])
def test_reserved_names(name: str) -> None:
    """Reserved names are refused (a ``.cvmfscatalog`` would make a nested catalog)."""
    found = refusal(directory("sub"), file(name))
    assert found.reason is RefusalReason.RESERVED_NAME
    assert "CVMFS" in found.message


@pytest.mark.parametrize(
    "entry",
    [symlink("d/.cvmfscatalog", "x"), directory(".cvmfscatalog"), file("d/.cvmfscatalog/f")],
)
def test_catalog_marker_must_be_a_file_even_when_allowed(entry: Entry) -> None:
    """A ``.cvmfscatalog`` that would be no regular file (a symlink, a directory, listed or
    implied) is refused even when reserved names are allowed: ingest aborts on it."""
    found = refusal(entry, limits=ALLOW_ALL)
    assert found.reason is RefusalReason.RESERVED_NAME


def test_absolute_symlink() -> None:
    """An absolute symlink target is refused unless allowed."""
    found = refusal(symlink("link-abs", "/etc/passwd"))
    assert (found.reason, found.member) == (RefusalReason.SYMLINK_ABSOLUTE, "link-abs")


@pytest.mark.parametrize(
    "entries",
    [
        [symlink("link-up", "../../../../../etc")],
        [symlink("d/l", "../../x")],
        [symlink("l", "a/../../x")],
        [symlink("l", "../base/x")],
        # d/l is the base itself, so d/l/.. is above it; lexically "d/l/.." would be "d".
        [symlink("x", "d/l/.."), symlink("d/l", "..")],
        [symlink("d/l", ".."), symlink("x", "d/l/../y")],
        [symlink("hop", "a/b/c"), symlink("x", "hop/../../../..")],
    ],
    ids=["far", "nested", "middle", "out-and-back", "through-later", "through-earlier", "deep"],
)
def test_symlinks_that_escape(entries: list[Entry]) -> None:
    """A relative target that goes above the base, even on the way back in or only through
    another symlink of the archive (listed before or after), is refused."""
    found = refusal(*entries)
    assert found.reason is RefusalReason.SYMLINK_ESCAPE
    assert found.member == "x" if any(e.name == "x" for e in entries) else True


def test_relative_escape_refused_even_when_absolute_allowed() -> None:
    """Allowing absolute targets does not allow a relative target that leaves the base."""
    found = refusal(symlink("up", "../x"), limits=ALLOW_ALL)
    assert found.reason is RefusalReason.SYMLINK_ESCAPE


def test_relative_target_through_an_allowed_absolute_symlink() -> None:
    """A relative target reaching an allowed absolute symlink goes where it goes: allowed."""
    data = tar_bytes(symlink("lib", "/opt/lib"), symlink("libfoo.so", "lib/../libfoo.so.1"))
    assert len(manifest(data, ALLOW_ALL).members) == 2


@pytest.mark.parametrize(
    "entries",
    [
        [symlink("l", "")],
        [symlink("l", "x/" * 2100)],
        [symlink("a", "b/x"), symlink("b", "a/x"), symlink("c", "a/y")],
        [symlink("l", "./" * 1100)],
    ],
    ids=["empty", "too-long", "loop", "too-many-steps"],
)
def test_bad_link_targets(entries: list[Entry]) -> None:
    """An empty or overlong target, a loop (more than 40 symlinks) or a target that takes
    more than 1024 steps to resolve is refused."""
    assert refusal(*entries).reason is RefusalReason.BAD_LINK_TARGET
    assert MAX_HOPS == 40


@pytest.mark.parametrize(
    "entries",
    [
        [hardlink("hard-out", "/etc/passwd")],
        [hardlink("h", "missing")],
        [hardlink("h", "later"), file("later")],
        [directory("d"), hardlink("h", "d")],
        [file("f"), symlink("s", "f"), hardlink("h", "s")],
        [file("f"), hardlink("h1", "f"), hardlink("h2", "h1")],
        [hardlink("h", "../x")],
        [hardlink("h", ".")],
    ],
    ids=["absolute", "missing", "later", "directory", "symlink", "hardlink", "dotdot", "base"],
)
def test_hardlink_targets(entries: list[Entry]) -> None:
    """A hard link must name an earlier regular member (ingest aborts on one outside)."""
    found = refusal(*entries)
    assert found.reason is RefusalReason.HARDLINK_TARGET
    assert found.member.startswith("h")


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (b"V", "type b'V'"),
    ],
)
def test_unsupported_types(kind: bytes, what: str) -> None:
    """FIFOs, devices and types tar members cannot be published as are refused."""
    found = refusal(file("ok"), special("odd", kind))
    assert (found.reason, found.member) == (RefusalReason.UNSUPPORTED_TYPE, "odd")
    assert what in found.message


@pytest.mark.parametrize(
    "entries",
    [
        [file("a"), file("a")],
        [file("a"), file("./a")],
        [directory("d"), directory("d/")],
        [file("d/x"), directory("d"), directory("./d")],
    ],
)
def test_duplicates(entries: list[Entry]) -> None:
    """The same normalised path twice is refused, directories included."""
    assert refusal(*entries).reason is RefusalReason.DUPLICATE


@pytest.mark.parametrize(
    "entries",
    [
        [file("a"), file("a/x")],
        [file("a/x"), file("a")],
        [symlink("l", "d"), file("l/x")],
        [file("l/x/y"), symlink("l", "d")],
        [file("f"), hardlink("h", "f"), directory("h/d")],
        [symlink(".", "elsewhere")],
        [file("./")],
    ],
    ids=[
        "file-then-child",
        "child-then-file",
        "through-symlink",
        "symlink-later",
        "hardlink",
        "base-link",
        "base-file",
    ],
)
def test_not_a_directory(entries: list[Entry]) -> None:
    """A path that is a file, symlink or hard link and also holds other members (in either
    order) is refused, and so is a base entry that is no directory."""
    assert refusal(*entries).reason is RefusalReason.NOT_A_DIRECTORY


def test_too_many_members() -> None:
    """More members than ``max_members`` are refused."""
    found = refusal(*(file(f"f{i}") for i in range(4)), limits=IngestLimits(max_members=3))
    assert (found.reason, found.member) == (RefusalReason.TOO_MANY_MEMBERS, "f3")


def test_implied_directories_count_as_members() -> None:
    """The directories member paths imply count towards ``max_members``."""
    limits = IngestLimits(max_members=2)
    assert refusal(file("a/b/c"), limits=limits).reason is RefusalReason.TOO_MANY_MEMBERS
    assert manifest(tar_bytes(file("a/b")), limits).implied_directories == ("a",)


def test_too_large() -> None:
    """Content beyond ``max_bytes`` is refused before it is read."""
    limits = IngestLimits(max_bytes=10)
    found = refusal(file("a", b"x" * 6), file("b", b"y" * 5), limits=limits)
    assert (found.reason, found.member) == (RefusalReason.TOO_LARGE, "b")
    assert manifest(tar_bytes(file("a", b"x" * 10)), limits).total_bytes == 10


def test_limits_must_be_positive() -> None:
    """A limit of zero or less is a programming error."""
    with pytest.raises(ValueError, match="max_bytes"):
        IngestLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_members"):
        IngestLimits(max_members=-1)


# --- unreadable streams -------------------------------------------------------------

# A directory header, then 30 members of one header and two content blocks each.
_PLAIN = tar_bytes(directory("m"), *(file(f"m/f{i:03}.bin", bytes([i]) * 700) for i in range(30)))


def _header_offset(index: int) -> int:
    return 512 * (1 + 3 * index)


def _damaged_header() -> bytes:
    data = bytearray(_PLAIN)
    data[_header_offset(1) + 10] ^= 0xFF  # in the second file's name
    return bytes(data)


def _flipped_gzip() -> bytes:
    data = bytearray(compress(_PLAIN, "gzip"))
    data[-6] ^= 0xFF  # in the CRC-32 of the trailer
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"not a tar" * 100, "header"),
        (_PLAIN[:5000], "unexpected end of data"),
        (_PLAIN[: _header_offset(1)], "end-of-archive marker"),
        (_PLAIN[: _header_offset(1) + 100], "header"),
        (_damaged_header(), "damaged header"),
        (_PLAIN + tar_bytes(file("appended")), "follows the end-of-archive marker"),
        (_PLAIN + bytes(TRAILER_MAX + 20480), f"more than {TRAILER_MAX}"),
        (compress(_PLAIN, "gzip")[:-100], "end-of-stream marker"),
        (_flipped_gzip(), "CRC"),
        (compress(_PLAIN, "xz")[:-50], "end-of-stream marker"),
        (compress(_PLAIN, "bzip2")[:200], "end-of-stream marker"),
        (b"\x28\xb5\x2f\xfd" + bytes(600), "zstd"),
        (b"\x1f\x8b" + bytes(600), ""),
    ],
    ids=[
        "empty",
        "garbage",
        "cut-in-content",
        "cut-at-boundary",
        "cut-in-header",
        "bad-checksum",
        "concatenated",
        "long-trailer",
        "gzip-cut",
        "gzip-crc",
        "xz-cut",
        "bzip2-cut",
        "zstd",
        "gzip-garbage",
    ],
)
def test_unreadable_streams(data: bytes, expected: str) -> None:
    """A stream that is not a complete, intact archive is refused as unreadable with its
    cause; an archive cut at a member boundary is not taken for a shorter one."""
    found = refused_bytes(data)
    assert found.reason is RefusalReason.UNREADABLE
    assert expected in found.message


def test_unreadable_names_the_member_being_read() -> None:
    """A member cut short is named (m2_ingest 51 names f025.bin)."""
    found = refused_bytes(_PLAIN[: _header_offset(25) + 700])
    assert found.member == "m/f025.bin"


def test_wrong_compression_named() -> None:
    """A gzip stream read as the plain tar its name promised is refused, and the other way
    round."""
    assert refused_bytes(compress(_PLAIN, "gzip"), compression=Compression.NONE).reason is (
        RefusalReason.UNREADABLE
    )
    assert refused_bytes(_PLAIN, compression=Compression.GZIP).reason is RefusalReason.UNREADABLE


def test_a_failing_stream_is_no_refusal() -> None:
    """When reading the stream itself fails, the check raises ArchiveStreamError (with the
    cause) instead of refusing an archive it could not see."""
    with pytest.raises(ArchiveStreamError) as raised:
        check_archive(Trickle(compress(_PLAIN, "gzip"), fail_after=100))
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_memory_stays_bounded() -> None:
    """Checking 64 MiB of content (compressed to almost nothing) keeps little in memory."""
    content = bytes(64 * 1024 * 1024)
    packed = zlib.compress(b"")  # keep zlib imported for the gzip reader's sake
    data = compress(tar_bytes(file("big", content), file("small", b"x")), "gzip")
    del content, packed
    tracemalloc.start()
    try:
        found = check_archive(Trickle(data, chunk=65536))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(found, Manifest)
    assert found.total_bytes == 64 * 1024 * 1024 + 1
    assert peak < 16 * 1024 * 1024
