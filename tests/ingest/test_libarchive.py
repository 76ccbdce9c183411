"""What libarchive, the reader inside ``cvmfs_server ingest``, makes of the tars written for
it: the same names, byte for byte, and a failure (never a quiet end) for an unfinished one.

``ingest`` registers libarchive's tar and "empty" formats and publishes what it read when
``archive_read_next_header`` reports the end; it aborts on a fatal error
(``SyncUnionTarball::Traverse``). These tests call libarchive through ctypes and are
skipped where the library is not installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
from dataclasses import dataclass

import pytest

from cvmfs_syncd.ingest.check import check_archive
from cvmfs_syncd.ingest.emit import emit_plain_tar
from cvmfs_syncd.ingest.model import ArchiveChanged, Manifest
from tests.ingest.archives import Trickle, directory, file, hardlink, symlink, tar_bytes

_NAME = ctypes.util.find_library("archive")
pytestmark = pytest.mark.skipif(_NAME is None, reason="libarchive is not installed")

ARCHIVE_EOF = 1
ARCHIVE_OK = 0
ARCHIVE_FATAL = -30


@dataclass
class Read:
    """What libarchive read: each entry's (status, path bytes), the last status, its error."""

    entries: list[tuple[int, bytes]]
    end: int
    error: bytes


def _library() -> ctypes.CDLL:
    assert _NAME is not None
    lib = ctypes.CDLL(_NAME)
    pointer = ctypes.c_void_p
    lib.archive_read_new.restype = pointer
    lib.archive_read_support_format_tar.argtypes = [pointer]
    lib.archive_read_support_format_empty.argtypes = [pointer]
    lib.archive_read_open_memory.argtypes = [pointer, ctypes.c_char_p, ctypes.c_size_t]
    lib.archive_read_next_header.argtypes = [pointer, ctypes.POINTER(pointer)]
    lib.archive_entry_pathname.argtypes = [pointer]
    lib.archive_entry_pathname.restype = ctypes.c_char_p
    lib.archive_error_string.argtypes = [pointer]
    lib.archive_error_string.restype = ctypes.c_char_p
    lib.archive_read_data.argtypes = [pointer, pointer, ctypes.c_size_t]
    lib.archive_read_data.restype = ctypes.c_ssize_t
    lib.archive_read_free.argtypes = [pointer]
    return lib


def read_like_ingest(data: bytes) -> Read:
    """Read ``data`` as ``ingest`` does: tar and empty formats, every entry's content."""
    lib = _library()
    archive = lib.archive_read_new()
    try:
        lib.archive_read_support_format_tar(archive)
        lib.archive_read_support_format_empty(archive)
        opened = lib.archive_read_open_memory(archive, data, len(data))
        if opened != ARCHIVE_OK:
            return Read([], opened, lib.archive_error_string(archive) or b"")
        entries: list[tuple[int, bytes]] = []
        entry = ctypes.c_void_p()
        buffer = ctypes.create_string_buffer(65536)
        while True:
            status = lib.archive_read_next_header(archive, ctypes.byref(entry))
            if status in (ARCHIVE_EOF, ARCHIVE_FATAL):
                return Read(entries, status, lib.archive_error_string(archive) or b"")
            entries.append((status, lib.archive_entry_pathname(entry)))
            while (got := lib.archive_read_data(archive, buffer, len(buffer))) > 0:
                pass
            if got < 0:
                return Read(entries, got, lib.archive_error_string(archive) or b"")
    finally:
        lib.archive_read_free(archive)


def test_libarchive_reads_every_name_byte_for_byte() -> None:
    """Long names and names that are not UTF-8 reach ``ingest`` as archived, without the
    warnings a PAX header's names can give in a non-UTF-8 locale; the tar ends cleanly."""
    names = ["d" * 120 + "/" + "n" * 200, "bad-\udcff\udcfe.txt", "caf\udce9", "é" * 100]
    data = tar_bytes(
        *(file(n, b"x") for n in names), symlink("l", "caf\udce9"), hardlink("h", "caf\udce9")
    )
    found = check_archive(Trickle(data))
    assert isinstance(found, Manifest)
    out = io.BytesIO()
    emit_plain_tar(Trickle(data), found, out)
    read = read_like_ingest(out.getvalue())
    assert read.end == ARCHIVE_EOF
    planned = [os.fsencode(s.member.path) for s in found.output_plan() if s.write]
    # Directories carry the trailing slash every tar writer gives them.
    assert [(status, path.rstrip(b"/")) for status, path in read.entries] == [
        (ARCHIVE_OK, path) for path in planned
    ]


def test_libarchive_fails_on_an_unfinished_tar() -> None:
    """The tar left by a changed archive is a fatal ``Truncated tar archive`` for libarchive,
    as the recorded ingest of a cut tar was (m2_ingest 51)."""
    before = tar_bytes(directory("d"), file("d/a", b"a"), file("d/b", b"b"))
    found = check_archive(Trickle(before))
    assert isinstance(found, Manifest)
    out = io.BytesIO()
    with pytest.raises(ArchiveChanged):
        emit_plain_tar(Trickle(tar_bytes(directory("d"), file("d/a", b"a"))), found, out)
    read = read_like_ingest(out.getvalue())
    assert read.end == ARCHIVE_FATAL
    assert b"Truncated tar archive" in read.error


def test_why_the_tripwire_is_needed() -> None:
    """libarchive takes a tar that stops at a member boundary, and an empty stream, for
    complete archives: ``ingest`` would publish them. So an unfinished tar must stop
    inside a member's content."""
    whole = tar_bytes(file("a", b"a"), file("b", b"b"))
    stopped = read_like_ingest(whole[:1024])
    assert (stopped.entries, stopped.end) == ([(ARCHIVE_OK, b"a")], ARCHIVE_EOF)
    assert read_like_ingest(b"").end == ARCHIVE_EOF
