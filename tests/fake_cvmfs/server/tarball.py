"""Reading a tar as ``cvmfs_server ingest`` does: libarchive with its tar and "empty" formats.

``ingest`` registers no decompression filter, so a compressed tar is no archive to it. What
the fake reproduces of libarchive's reader (checked against libarchive itself by the tests
when the library is installed):

- **opening**: an empty stream is an empty archive; a first block shorter than 512 bytes,
  or one that is neither all zeros nor a header with a valid checksum, is
  ``Unrecognized archive format``;
- **the end**: an all-zero block, or the stream stopping exactly where a header would
  start: no end-of-archive marker is needed, so a tar cut between two members is complete;
  a stream stopping inside a header is the fatal ``Truncated tar archive``;
- a header with a wrong checksum is skipped (libarchive's retryable ``Damaged tar
  archive``) and the next block is read as a header;
- a member whose content, or the padding after it, is cut fails when its data is read;
- ustar name prefixes, GNU long names and link names (``L``/``K``), pax ``path``,
  ``linkpath``, ``size`` and ``mtime`` records (names stay bytes), base-256 numbers;
  type flags it does not know are regular files, a regular file whose name ends in ``/``
  is a directory, and the size field of links, devices, FIFOs and directories is ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
TRUNCATED = "Truncated tar archive"
DAMAGED = "Damaged tar archive"
UNRECOGNIZED = "Unrecognized archive format"

# type flag -> kind; anything else is a regular file
_KINDS = {
    ord("1"): "hardlink",
    ord("2"): "symlink",
    ord("3"): "chardev",
    ord("4"): "blockdev",
    ord("5"): "dir",
    ord("6"): "fifo",
    ord("D"): "dir",
}
# kinds whose size field libarchive ignores (no content follows the header)
_NO_CONTENT = ("symlink", "chardev", "blockdev", "fifo")
_PIECE = 1 << 20


class ArchiveOpenError(Exception):
    """The stream is no archive libarchive's tar/empty formats accept."""


class ArchiveFatal(Exception):
    """A fatal error reading a header (the stream ends inside one)."""


class ArchiveDataError(Exception):
    """A member's content or its padding is cut short."""


@dataclass(frozen=True)
class Damaged:
    """A header block skipped because its checksum is wrong (libarchive's ARCHIVE_RETRY)."""

    message: str = DAMAGED


@dataclass(frozen=True)
class TarMember:
    """One member as libarchive reports it: name and link target as stored (bytes)."""

    name: bytes
    kind: str
    mode: int
    mtime: int
    size: int
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0


def _number(field: bytes) -> int:
    """A numeric header field: octal (spaces and NULs around it) or GNU base-256."""
    if field and field[0] & 0x80:
        value = field[0] & 0x3F
        for byte in field[1:]:
            value = (value << 8) | byte
        return -value if field[0] & 0x40 else value
    digits = field.strip(b" \0")
    if digits.isdigit() and b"8" not in digits and b"9" not in digits:
        return int(digits, 8)
    end = 0
    while end < len(digits) and 0x30 <= digits[end] <= 0x37:
        end += 1
    return int(digits[:end], 8) if end else 0


def _text(field: bytes) -> bytes:
    """A string header field: up to its first NUL."""
    return field.split(b"\0", 1)[0]


def checksum_ok(block: bytes) -> bool:
    """Whether a header block's checksum field matches its bytes (unsigned or signed sum)."""
    stored = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored == unsigned:
        return True
    high = sum(1 for b in block[:148] + block[156:] if b > 127)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``LEN key=value\\n`` records of a pax extended header."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(data[position:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1 : position + length]
        key, sep, value = record.partition(b"=")
        if sep:
            records[key] = value[:-1] if value.endswith(b"\n") else value
        position += length
    return records


class TarReader:
    """Members of a tar stream, read front to back (see the module docstring).

    ``next_member`` returns each member, a ``Damaged`` marker for a skipped header, or None
    at the end; ``content`` yields the current member's bytes. Opening raises
    ``ArchiveOpenError``; ``ArchiveFatal`` and ``ArchiveDataError`` come from reading.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._unread = 0  # content + padding of the current member not read yet
        self._content = 0
        self._done = False
        first = self._read(BLOCK)
        self._first: bytes | None = None
        if not first or first == ZERO_BLOCK:
            self._done = True
        elif len(first) < BLOCK or not checksum_ok(first):
            raise ArchiveOpenError(UNRECOGNIZED)
        else:
            self._first = first

    def _read(self, size: int) -> bytes:
        pieces: list[bytes] = []
        remaining = size
        while remaining > 0:
            piece = self._stream.read(remaining)
            if not piece:
                break
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    def _block(self) -> bytes:
        if self._first is not None:
            block, self._first = self._first, None
            return block
        return self._read(BLOCK)

    def _skip_unread(self) -> None:
        while self._unread > 0:
            got = len(self._read(min(self._unread, _PIECE)))
            if got == 0:
                raise ArchiveFatal(TRUNCATED)
            self._unread -= got

    def _meta(self, size: int) -> bytes:
        """The content of a long-name or pax header (with its padding)."""
        padded = -(-size // BLOCK) * BLOCK
        data = self._read(padded)
        if len(data) < padded:
            raise ArchiveFatal(TRUNCATED)
        return data[:size]

    def next_member(self) -> TarMember | Damaged | None:
        """The next member, a ``Damaged`` marker, or None at the end of the archive."""
        if self._done:
            return None
        self._skip_unread()
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            block = self._block()
            if not block or block == ZERO_BLOCK:
                self._done = True
                return None
            if len(block) < BLOCK:
                self._done = True
                raise ArchiveFatal(TRUNCATED)
            if not checksum_ok(block):
                return Damaged()
            flag = block[156]
            size = _number(block[124:136])
            if flag in (ord("L"), ord("K")):
                value = _text(self._meta(size))
                if flag == ord("L"):
                    long_name = value
                else:
                    long_link = value
                continue
            if flag in (ord("x"), ord("X")):
                pax.update(_pax_records(self._meta(size)))
                continue
            if flag == ord("g"):
                self._meta(size)
                continue
            return self._member(block, flag, size, long_name, long_link, pax)

    def _member(
        self,
        block: bytes,
        flag: int,
        size: int,
        long_name: bytes | None,
        long_link: bytes | None,
        pax: dict[bytes, bytes],
    ) -> TarMember:
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0":
            prefix = _text(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        name = pax.get(b"path", long_name if long_name is not None else name)
        link = pax.get(b"linkpath", long_link if long_link is not None else _text(block[157:257]))
        if b"size" in pax:
            size = int(pax[b"size"])
        mtime = _number(block[136:148])
        if b"mtime" in pax:
            mtime = int(float(pax[b"mtime"]))
        kind = _KINDS.get(flag, "file")
        if kind == "file" and flag in (0, ord("0")) and name.endswith(b"/"):
            kind = "dir"
        if kind in _NO_CONTENT or (kind == "dir" and flag == ord("5")):
            size = 0
        elif kind == "hardlink" and not pax:
            # old-style and GNU tars: a hard link's size field means nothing
            size = 0
        self._content = size
        self._unread = -(-size // BLOCK) * BLOCK
        return TarMember(
            name=name,
            kind=kind,
            mode=_number(block[100:108]) & 0o7777,
            mtime=mtime,
            size=size if kind == "file" else 0,
            linkname=link,
            devmajor=_number(block[329:337]),
            devminor=_number(block[337:345]),
        )

    def content(self) -> Iterator[bytes]:
        """Yield the current member's content in pieces; raise ``ArchiveDataError`` when it
        or its padding is cut (after yielding what there was, as libarchive does)."""
        remaining = self._content
        while remaining > 0:
            piece = self._stream.read(min(remaining, _PIECE))
            if not piece:
                raise ArchiveDataError(TRUNCATED)
            remaining -= len(piece)
            self._unread -= len(piece)
            self._content = remaining
            yield piece
        padding = self._unread
        if padding > 0:
            got = len(self._read(padding))
            self._unread -= got
            if got < padding:
                raise ArchiveDataError(TRUNCATED)
