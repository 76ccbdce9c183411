"""The tar reader and header writer of the ingest path, against the standard library's
``tarfile`` and GNU tar as oracles: the same members from every format tar writers produce,
sparse files filled in, and damage reported instead of read past."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.emit import emit_plain_tar, tar_header
from cvmfs_syncd.ingest.model import Member, MemberKind, Refusal
from cvmfs_syncd.ingest.tarformat import (
    BLOCK,
    DamagedArchive,
    TarHeader,
    TarReader,
    parse_pax,
)
from tests.ingest.archives import MTIME, Trickle
from tests.support import require

_FORMATS = {
    "ustar": tarfile.USTAR_FORMAT,
    "gnu": tarfile.GNU_FORMAT,
    "pax": tarfile.PAX_FORMAT,
}


def read_all(data: bytes, chunk: int = 4093) -> list[tuple[TarHeader, bytes]]:
    """Every member of plain tar ``data`` with its content, read through a trickle."""
    reader = TarReader(Trickle(data, chunk=chunk))
    found = []
    while (header := reader.next()) is not None:
        pieces = []
        while piece := reader.read(65536):
            pieces.append(piece)
        found.append((header, b"".join(pieces)))
    reader.trailer(1 << 20)
    return found


def oracle(data: bytes) -> list[tuple[str, bytes, int, int, float, str, bytes]]:
    """What tarfile reads from ``data``: name, type, mode, size, mtime, link, content."""
    found = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar:
            content = b""
            if info.isreg():
                extracted = tar.extractfile(info)
                assert extracted is not None
                content = extracted.read()
            kind = tarfile.REGTYPE if info.type == tarfile.AREGTYPE else info.type
            found.append(
                (info.name, kind, info.mode, info.size, info.mtime, info.linkname, content)
            )
    return found


def ours(data: bytes) -> list[tuple[str, bytes, int, int, float, str, bytes]]:
    found = []
    for header, content in read_all(data):
        kind = tarfile.REGTYPE if header.type == tarfile.AREGTYPE else header.type
        size = header.size if header.isreg() else 0
        found.append((header.name, kind, header.mode, size, header.mtime, header.linkname, content))
    return found


_NAME_PART = st.text(
    st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=60,
).filter(lambda part: part not in (".", ".."))
_NAME = st.lists(_NAME_PART, min_size=1, max_size=6).map("/".join)
_MEMBER = st.tuples(
    _NAME,
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    st.binary(max_size=1500),
    st.integers(min_value=0, max_value=0o7777),
    st.one_of(
        st.integers(min_value=0, max_value=2**33),
        st.floats(min_value=0, max_value=2**33, allow_nan=False).map(lambda t: round(t, 3)),
    ),
    _NAME,
)


def _archive(
    members: Sequence[tuple[str, bytes, bytes, int, float, str]], tar_format: int
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tar_format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name, kind, data, mode, mtime, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, mtime
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(_MEMBER, max_size=6),
    tar_format=st.sampled_from(sorted(_FORMATS)),
)
def test_every_format_reads_as_tarfile_reads_it(
    members: list[tuple[str, bytes, bytes, int, float, str]], tar_format: str
) -> None:
    """Long and non-ASCII names and targets, fractional and large mtimes, in ustar, GNU and
    PAX archives: the reader sees what tarfile sees."""
    try:
        data = _archive(members, _FORMATS[tar_format])
    except ValueError:
        return  # ustar cannot hold every name or number
    assert ours(data) == oracle(data)


def test_ustar_prefix_and_pax_records() -> None:
    """A ustar name split into prefix and name is joined; a PAX global header applies to
    the members after it, a local one to its member, and an empty value unsets a global."""
    long_path = "p" * 90 + "/" + "n" * 90
    data = _archive([(long_path, tarfile.REGTYPE, b"x", 0o644, MTIME, "")], tarfile.USTAR_FORMAT)
    assert [h.name for h, _ in read_all(data)] == [long_path]

    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"mtime": "1234.5"}
    ) as tar:
        tar.addfile(tarfile.TarInfo("a"))
        for name, value in (("b", "99"), ("c", "")):
            info = tarfile.TarInfo(name)
            info.mtime = 7
            info.pax_headers = {"mtime": value}
            tar.addfile(info)
    headers = [h for h, _ in read_all(buffer.getvalue())]
    assert [(h.name, h.mtime) for h in headers] == [("a", 1234.5), ("b", 99.0), ("c", 7)]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d%s" % (length, body)


def _pax_header(kind: bytes, records: bytes) -> bytes:
    block = bytearray(_header_block(b"././@PaxHeader", at156=kind))
    block[124:136] = b"%011o\0" % len(records)
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + records + bytes(-len(records) % BLOCK)


def test_global_records_are_kept_only_for_the_keys_that_matter() -> None:
    """200 global PAX headers of 100 KB of attributes each are read past without being kept:
    the memory stays far below their 20 MB, and the members are as archived."""
    data = b""
    for index in range(200):
        records = b"".join(
            _pax_record(b"SCHILY.xattr.user.k%d_%d" % (index, n), b"v" * 50) for n in range(1500)
        )
        data += _pax_header(b"g", records)
    data += bytes(_header_block(b"member")) + bytes(2 * BLOCK)
    assert len(data) > 20_000_000
    tracemalloc.start()
    try:
        found = read_all(data, chunk=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [h.name for h, _ in found] == ["member"]
    assert peak < 10_000_000


def test_pax_records_are_parsed_strictly() -> None:
    """Records are length-prefixed ``key=value`` lines; repeated keys are kept in order."""
    assert parse_pax(b"11 path=ab\n16 linkpath=xyz\n") == [("path", b"ab"), ("linkpath", b"xyz")]
    assert parse_pax(b"8 a=1=2\n8 a=3=4\n") == [("a", b"1=2"), ("a", b"3=4")]
    for damaged in (b"10 path=ab\n", b"x path=a\n", b"12 path=ab\n", b"6 =ab\n", b"8 pathab\n"):
        with pytest.raises(DamagedArchive):
            parse_pax(damaged)


def _header_block(name: bytes = b"f", **fields: bytes) -> bytearray:
    """A ustar header for a 0-byte file with ``fields`` (offset=value) patched in and the
    checksum recomputed."""
    block = bytearray(tarfile.TarInfo(name.decode()).tobuf(tarfile.USTAR_FORMAT))
    for offset, value in fields.items():
        start = int(offset.removeprefix("at"))
        block[start : start + len(value)] = value
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def test_numbers_in_every_form() -> None:
    """Octal with spaces or NULs, GNU base-256 positive and negative."""
    spaced = _header_block(at124=b"     17 \0\0\0\0", at136=b"\x80" + (2**40).to_bytes(11, "big"))
    negative = (256**11 - 5).to_bytes(11, "big")
    data = bytes(spaced) + bytes(BLOCK) + bytes(_header_block(b"g", at136=b"\xff" + negative))
    data += bytes(2 * BLOCK)
    headers = [h for h, _ in read_all(data)]
    assert [(h.name, h.size, h.mtime) for h in headers] == [("f", 15, 2**40), ("g", 0, -5)]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"at124": b"0000000009\0\0"}, "size field"),
        ({"at100": b"06x4\0\0\0\0"}, "mode field"),
        ({"at136": b"-1\0"}, "mtime field"),
    ],
)
def test_malformed_numbers_are_damage(fields: dict[str, bytes], expected: str) -> None:
    """A number field that is no octal number is damage, not a zero."""
    data = bytes(_header_block(**fields)) + bytes(2 * BLOCK)
    with pytest.raises(DamagedArchive, match=expected):
        read_all(data)


def test_signed_checksums_are_accepted() -> None:
    """Some old tars summed the header's bytes as signed; both sums are valid."""
    block = _header_block("é".encode())
    block[148:156] = b"        "
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    assert [h.name for h, _ in read_all(bytes(block) + bytes(2 * BLOCK))] == ["é"]
    block[0] ^= 1
    with pytest.raises(DamagedArchive, match="checksum"):
        read_all(bytes(block) + bytes(2 * BLOCK))


def test_an_extension_header_must_be_followed_by_a_member() -> None:
    """A long-name record straight before the end-of-archive block is damage."""
    record = tar_header(Member("x" * 150, MemberKind.FILE, 0o644))[: 2 * BLOCK]
    with pytest.raises(DamagedArchive, match="not followed by a member"):
        read_all(record + bytes(2 * BLOCK))


# --- the writer ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    path=_NAME,
    kind=st.sampled_from(list(MemberKind)),
    mode=st.integers(min_value=0, max_value=0o777),
    size=st.one_of(
        st.integers(min_value=0, max_value=4096), st.integers(min_value=0, max_value=2**80)
    ),
    mtime=st.integers(min_value=-(2**80), max_value=2**80),
    target=_NAME,
)
def test_written_headers_read_back_in_both_readers(
    path: str, kind: MemberKind, mode: int, size: int, mtime: int, target: str
) -> None:
    """Every header written (long names, sizes and times beyond octal) reads back the same
    in tarfile and in the reader."""
    member = Member(
        path,
        kind,
        mode,
        size if kind is MemberKind.FILE else 0,
        mtime,
        target if kind in (MemberKind.SYMLINK, MemberKind.HARDLINK) else None,
    )
    written = tar_header(member)
    assert len(written) % BLOCK == 0
    reader = TarReader(io.BytesIO(written))
    header = reader.next()
    assert header is not None
    assert (header.name, header.mode, header.mtime, header.linkname) == (
        path,
        mode,
        mtime,
        member.link_target or "",
    )
    assert header.size == member.size
    info = tarfile.TarInfo.frombuf(written[-BLOCK:], "utf-8", "surrogateescape")
    assert (info.mode, info.size, info.mtime, info.uid, info.gid) == (
        mode,
        member.size,
        mtime,
        0,
        0,
    )


class _Writes:
    """An output counting its write calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.calls += 1
        self.data += data
        return len(data)


def test_small_members_are_written_in_few_writes() -> None:
    """2 000 small members go out in a handful of writes, not several per member."""
    members = [(f"d/f{i}", tarfile.REGTYPE, b"x" * 300, 0o644, MTIME, "") for i in range(2000)]
    data = _archive(members, tarfile.GNU_FORMAT)
    found = check_archive(io.BytesIO(data))
    out = _Writes()
    assert not isinstance(found, Refusal), found
    emit_plain_tar(io.BytesIO(data), found, out)
    assert len(out.data) > 2000 * BLOCK * 2
    assert out.calls <= len(out.data) // (128 * 1024) + 2
    assert [row[0] for row in oracle(bytes(out.data))] == ["d", *(f"d/f{i}" for i in range(2000))]


# --- sparse files ---------------------------------------------------------------------


def _gnu_tar() -> str:
    tar = shutil.which("tar")
    require(tar, "GNU tar is not installed")
    assert tar is not None
    return tar


def _sparse_file(where: Path, pieces: int) -> bytes:
    """A sparse file of ``pieces`` 4-byte pieces 64 KiB apart and a hole at its end."""
    path = where / "sparse.img"
    with path.open("wb") as handle:
        for index in range(pieces):
            handle.seek(index * 65536)
            handle.write(b"%04d" % index)
        handle.truncate(pieces * 65536 + 100_000)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("options", "pieces"),
    [
        (["--format=gnu"], 3),
        (["--format=gnu"], 60),  # more pieces than the header holds: extension blocks
        (["--format=posix", "--sparse-version=0.0"], 7),
        (["--format=posix", "--sparse-version=0.1"], 7),
        (["--format=posix", "--sparse-version=1.0"], 3),
        (["--format=posix", "--sparse-version=1.0"], 200),  # a map over one block
    ],
    ids=["gnu", "gnu-extended", "pax-0.0", "pax-0.1", "pax-1.0", "pax-1.0-long-map"],
)
def test_sparse_files_in_every_gnu_format(tmp_path: Path, options: list[str], pieces: int) -> None:
    """GNU tar's sparse files, old-style and PAX 0.0/0.1/1.0, read with holes as zeros."""
    expected = _sparse_file(tmp_path, pieces)
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        [
            _gnu_tar(),
            "--sparse",
            "--hole-detection=raw",
            *options,
            "-C",
            str(tmp_path),
            "-cf",
            str(archive),
            "sparse.img",
        ],
        check=True,
        timeout=60,
    )
    data = archive.read_bytes()
    [(header, content)] = read_all(data)
    assert (header.name, header.size, header.sparse is not None) == (
        "sparse.img",
        len(expected),
        True,
    )
    assert content == expected
    assert os.path.getsize(archive) < len(expected)


def _old_gnu_sparse(pieces: list[tuple[int, int]], real_size: int, stored: int) -> bytes:
    block = bytearray(_header_block(b"s", at156=b"S", at257=b"ustar  \0"))
    block[124:136] = b"%011o\0" % stored
    for index, (offset, length) in enumerate(pieces[:4]):
        block[386 + 24 * index : 410 + 24 * index] = b"%011o\0%011o\0" % (offset, length)
    block[483:495] = b"%011o\0" % real_size
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + bytes(-(-stored // BLOCK) * BLOCK) + bytes(2 * BLOCK)


@pytest.mark.parametrize(
    ("pieces", "real_size", "stored", "expected"),
    [
        ([(0, 10), (5, 10)], 100, 20, "overlap"),
        ([(0, 10), (95, 10)], 100, 20, "outside"),
        ([(0, 10)], 100, 20, "hold 10 bytes"),
    ],
)
def test_inconsistent_sparse_maps_are_damage(
    pieces: list[tuple[int, int]], real_size: int, stored: int, expected: str
) -> None:
    """Pieces that overlap, leave the file or do not add up to the stored bytes."""
    with pytest.raises(DamagedArchive, match=expected):
        read_all(_old_gnu_sparse(pieces, real_size, stored))
