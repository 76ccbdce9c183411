"""Reading a plain tar stream, member by member: headers parsed here, content handed on.

What tar writers produce is understood: POSIX ustar (with its name prefix), GNU (names and
link targets in ``L``/``K`` records, base-256 numbers, old-style sparse files) and PAX
(``x`` and ``g`` records for ``path``, ``linkpath``, ``size`` and ``mtime``, and GNU's
sparse files of formats 0.0, 0.1 and 1.0). Sparse files are read with their holes filled
in. Owners, times other than mtime, extended attributes and ACLs are read past.

The reader is strict where a lenient one would read a damaged archive as a smaller,
complete one: a header with a bad checksum or a malformed number, a stream that ends
anywhere but after an end-of-archive block (a block of zeros), extension records over
:data:`EXTENSION_HEADER_MAX` bytes or malformed, and sparse maps that do not add up all
raise :class:`DamagedArchive`. It keeps at most one chunk of the stream and one
extension record in memory, and never seeks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: Bytes asked of the stream at a time.
READ_BYTES = 1024 * 1024
#: Largest PAX or GNU long-name record accepted; real ones hold a few names (PATH_MAX is
#: 4096) and perhaps extended attributes.
EXTENSION_HEADER_MAX = 1024 * 1024
#: Most data segments a sparse file may have (its map is kept in memory while it is read).
SPARSE_SEGMENTS_MAX = 65536

REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
PAX_LOCAL = b"x"
PAX_GLOBAL = b"g"
SOLARIS_PAX = b"X"

_REGULAR = frozenset({REGTYPE, AREGTYPE, CONTTYPE, GNU_SPARSE})
#: Types whose header has no content after it, whatever its size field says.
_NO_CONTENT = frozenset({LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE})
_EXTENSIONS = frozenset({GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX})

POSIX_MAGIC = b"ustar\x00"
_HIGH_BYTES = bytes(range(128, 256))
_PAX_RECORD = re.compile(rb"([0-9]{1,20}) ")
#: The PAX keys that matter here (the rest are read past): a global header can thus hold
#: no more than these few values, whatever its size.
_PAX_KEYS = frozenset(
    {
        "path",
        "linkpath",
        "size",
        "mtime",
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "GNU.sparse.name",
        "GNU.sparse.realsize",
        "GNU.sparse.size",
        "GNU.sparse.map",
    }
)

#: Member names and link targets are UTF-8, other bytes kept as surrogate escapes: what
#: ``os.fsdecode`` makes of a file name on Linux.
NAME_ENCODING = "utf-8"
NAME_ERRORS = "surrogateescape"


class DamagedArchive(Exception):
    """The bytes are not a complete, well-formed (possibly compressed) tar archive."""


class PlainStream(Protocol):
    """The decompressed archive: ``read`` returns up to ``size`` bytes, b"" at the end."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(slots=True)
class TarHeader:
    """One member as its header (and the extension records before it) describe it.

    ``name`` and ``linkname`` decoded as :data:`NAME_ENCODING` with surrogate escapes,
    ``type`` the type byte, ``size`` the content's length (a sparse file's full length),
    ``mtime`` seconds (a float when a PAX record gives fractions).
    """

    name: str
    type: bytes
    mode: int
    size: int
    mtime: int | float
    linkname: str = ""
    #: (offset, length) of each stored piece of a sparse file, in order; None otherwise.
    sparse: list[tuple[int, int]] | None = field(default=None, repr=False)

    def isreg(self) -> bool:
        """Return whether the member is a regular file (sparse or contiguous ones too)."""
        return self.type in _REGULAR or self.sparse is not None

    def isdir(self) -> bool:
        """Return whether the member is a directory."""
        return self.type == DIRTYPE

    def issym(self) -> bool:
        """Return whether the member is a symlink."""
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        """Return whether the member is a hard link."""
        return self.type == LNKTYPE


def _text(raw: bytes) -> str:
    return raw.decode(NAME_ENCODING, NAME_ERRORS)


def _field(raw: bytes) -> bytes:
    """A NUL-terminated (or full-width) field's bytes."""
    end = raw.find(0)
    return raw if end < 0 else raw[:end]


def _number(raw: bytes, what: str) -> int:
    """An octal (or GNU base-256) number field; raise DamagedArchive if malformed."""
    digits = raw[:-1]
    if raw[-1] in (0, 32) and digits.isdigit():  # the usual form: zero-padded, terminated
        pass
    elif raw[0] in (0o200, 0o377):
        value = int.from_bytes(raw[1:], "big")
        return value - 256 ** (len(raw) - 1) if raw[0] == 0o377 else value
    else:
        digits = _field(raw).strip(b" ")
        if not digits:
            return 0
        if not digits.isdigit():
            raise DamagedArchive(f"damaged header: its {what} field is not an octal number")
    try:
        return int(digits, 8)
    except ValueError:  # an 8 or a 9
        raise DamagedArchive(f"damaged header: its {what} field is not an octal number") from None


def _check_sum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    field_bytes = block[148:156]
    unsigned = sum(block) - sum(field_bytes) + 8 * 32
    if stored == unsigned:
        return
    high = BLOCK - len(block.translate(None, _HIGH_BYTES))
    high -= 8 - len(field_bytes.translate(None, _HIGH_BYTES))
    if stored != unsigned - 256 * high:  # some old tars summed signed bytes
        raise DamagedArchive("damaged header: its checksum does not match")


def _decimal(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise DamagedArchive(f"damaged extension header: {what} {value[:40]!r} is not a number")
    return int(value)


def _seconds(value: bytes) -> float:
    try:
        seconds = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise DamagedArchive(f"damaged extension header: mtime {value[:40]!r}") from None
    return seconds


def parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """The records of a PAX extension header, in order (keys repeat in sparse format 0.0).

    Raise DamagedArchive for a record whose length, framing or key is malformed.
    """
    records: list[tuple[str, bytes]] = []
    position = 0
    while position < len(data) and data[position] != 0:
        match = _PAX_RECORD.match(data, position)
        if match is None:
            raise DamagedArchive("damaged extension header: a record has no length")
        length = int(match.group(1))
        end = position + length
        body = data[match.end() : end - 1]
        key, equals, value = body.partition(b"=")
        if length < 5 or end > len(data) or data[end - 1] != 0x0A or not key or not equals:
            raise DamagedArchive("damaged extension header: a record is malformed")
        try:
            records.append((key.decode("utf-8"), value))
        except UnicodeDecodeError:
            raise DamagedArchive("damaged extension header: a key is not UTF-8") from None
        position = end
    return records


@dataclass(slots=True)
class _Extensions:
    """What extension records say about the member that follows them."""

    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[str, bytes] = field(default_factory=dict)
    #: sparse format 0.0: the offset/numbytes records, in order
    pairs: list[bytes] = field(default_factory=list)
    seen: bool = False


def _sparse_pairs(numbers: list[int], what: str) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise DamagedArchive(f"damaged sparse map ({what}): an offset without a length")
    if len(numbers) > 2 * SPARSE_SEGMENTS_MAX:
        raise DamagedArchive(f"a sparse file of more than {SPARSE_SEGMENTS_MAX} pieces")
    pairs = zip(numbers[::2], numbers[1::2], strict=True)
    return [(offset, length) for offset, length in pairs if length]


def _check_sparse(pieces: list[tuple[int, int]], size: int, stored: int) -> None:
    """The pieces must lie in order inside the file and add up to the stored bytes."""
    end = 0
    total = 0
    for offset, length in pieces:
        if offset < end or length < 0 or offset + length > size:
            raise DamagedArchive("damaged sparse map: pieces overlap or lie outside the file")
        end = offset + length
        total += length
    if total != stored:
        raise DamagedArchive(
            f"damaged sparse map: its pieces hold {total} bytes, the archive {stored}"
        )


class TarReader:
    """The members of a plain tar stream, front to back.

    :meth:`next` returns each member's :class:`TarHeader` (None after the end-of-archive
    block); :meth:`read` returns pieces of its content (holes of sparse files as zeros),
    and whatever is not read is skipped by the next :meth:`next`. :meth:`trailer` reads
    what follows the end-of-archive block.
    """

    def __init__(self, stream: PlainStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._position = 0
        self._global: dict[str, bytes] = {}
        self._owed = 0  # stored bytes of the current member not yet read
        self._padding = 0  # zero bytes after them, up to the next block
        self._pieces: list[tuple[int, int]] | None = None  # a sparse file's stored pieces
        self._next_piece = 0
        self._logical = 0  # bytes of a sparse file handed out so far
        self._size = 0  # a sparse file's full length
        self.ended = False

    # --- bytes ------------------------------------------------------------------

    def _take(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end of the stream)."""
        end = self._position + size
        if end <= len(self._buffer):
            data = self._buffer[self._position : end]
            self._position = end
            return data
        parts = [self._buffer[self._position :]]
        have = len(parts[0])
        while have < size:
            chunk = self._stream.read(max(READ_BYTES, size - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        self._buffer, self._position = joined, min(size, len(joined))
        return joined[:size]

    def _skip(self, size: int, what: str) -> None:
        available = len(self._buffer) - self._position
        if size <= available:
            self._position += size
            return
        size -= available
        self._buffer, self._position = b"", 0
        while size > 0:
            chunk = self._stream.read(READ_BYTES)
            if not chunk:
                raise DamagedArchive(f"unexpected end of data: the archive ends inside {what}")
            if len(chunk) > size:
                self._buffer, self._position = chunk, size
                return
            size -= len(chunk)

    def _piece(self, size: int) -> bytes:
        """Up to ``size`` stored content bytes of the current member (at least one)."""
        if self._position >= len(self._buffer):
            self._buffer, self._position = self._stream.read(READ_BYTES), 0
            if not self._buffer:
                raise DamagedArchive(
                    "unexpected end of data: the archive ends inside a member's content"
                )
        end = min(self._position + size, len(self._buffer))
        data = self._buffer[self._position : end]
        self._position = end
        self._owed -= len(data)
        return data

    # --- members ----------------------------------------------------------------

    def __iter__(self) -> Iterator[TarHeader]:
        """Yield each member's header in order (see :meth:`next`)."""
        while (header := self.next()) is not None:
            yield header

    def next(self) -> TarHeader | None:
        """Return the next member's header, or None at the end-of-archive block.

        Raise DamagedArchive if the stream ends before that block, inside the previous
        member's content, or a header or extension record is damaged.
        """
        if self.ended:
            return None
        self._skip(self._owed + self._padding, "a member's content")
        self._owed = self._padding = 0
        self._pieces = None
        extensions = _Extensions()
        while True:
            block = self._take(BLOCK)
            if len(block) < BLOCK:
                if not block:
                    raise DamagedArchive("the archive ends without an end-of-archive marker")
                raise DamagedArchive(f"the archive ends inside a header ({len(block)} bytes)")
            if block == ZERO_BLOCK:
                if extensions.seen:
                    raise DamagedArchive("an extension header is not followed by a member")
                self.ended = True
                return None
            _check_sum(block)
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind in _EXTENSIONS:
                self._extension(kind, size, extensions)
                continue
            return self._member(block, kind, size, extensions)

    def _extension(self, kind: bytes, size: int, extensions: _Extensions) -> None:
        if not 0 <= size <= EXTENSION_HEADER_MAX:
            raise DamagedArchive(
                f"an extension header of {size} bytes (more than {EXTENSION_HEADER_MAX})"
            )
        data = self._take(size)
        if len(data) < size:
            raise DamagedArchive("unexpected end of data: the archive ends inside a header")
        self._skip(-size % BLOCK, "a header")
        extensions.seen = True
        if kind == GNU_LONGNAME:
            extensions.long_name = _field(data)
        elif kind == GNU_LONGLINK:
            extensions.long_link = _field(data)
        else:
            target = self._global if kind == PAX_GLOBAL else extensions.pax
            for key, value in parse_pax(data):
                if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                    extensions.pairs.append(value)
                elif key not in _PAX_KEYS:
                    continue  # owners, times, attributes: not published, not kept
                elif value:
                    target[key] = value
                else:  # an empty value unsets the key
                    target.pop(key, None)
                    if kind != PAX_GLOBAL:
                        extensions.pax[key] = b""

    def _member(self, block: bytes, kind: bytes, size: int, extensions: _Extensions) -> TarHeader:
        raw_name = _field(block[0:100])
        if block[257:263] == POSIX_MAGIC and (prefix := _field(block[345:500])):
            raw_name = prefix + b"/" + raw_name
        if kind == AREGTYPE and raw_name.endswith(b"/"):
            kind = DIRTYPE
        pax: dict[str, bytes] = {}
        if self._global or extensions.seen:
            pax = {**self._global, **extensions.pax}
            pax = {key: value for key, value in pax.items() if value}
        name = pax.get("path") or extensions.long_name or raw_name
        link = pax.get("linkpath") or extensions.long_link or _field(block[157:257])
        mtime: int | float = _number(block[136:148], "mtime")
        if "mtime" in pax:
            mtime = _seconds(pax["mtime"])
        if "size" in pax:
            size = _decimal(pax["size"], "size")
        if size < 0:
            raise DamagedArchive(f"damaged header: a negative size ({size})")
        header = TarHeader(
            name=_text(name),
            type=kind,
            mode=_number(block[100:108], "mode"),
            size=size,
            mtime=mtime,
            linkname=_text(link),
        )
        if header.isdir() and len(header.name) > 1:
            header.name = header.name.rstrip("/") or header.name
        stored = 0 if kind in _NO_CONTENT else size
        if kind == GNU_SPARSE:
            stored = size
            header.size, header.sparse = self._old_gnu_sparse(block)
        elif extensions.pairs or (pax and any(key.startswith("GNU.sparse.") for key in pax)):
            header.name, header.size, header.sparse, stored = self._pax_sparse(
                header.name, pax, extensions.pairs, size
            )
        self._owed, self._padding = stored, -stored % BLOCK
        if header.sparse is not None:
            _check_sparse(header.sparse, header.size, self._owed)
            self._pieces, self._next_piece = header.sparse, 0
            self._logical, self._size = 0, header.size
        return header

    def _old_gnu_sparse(self, block: bytes) -> tuple[int, list[tuple[int, int]]]:
        """GNU's old sparse header: four pieces here, 21 in each extension block after it."""
        numbers = self._sparse_numbers(block[386:482], 4)
        real_size = _number(block[483:495], "real size")
        extended = block[482]
        while extended:
            more = self._take(BLOCK)
            if len(more) < BLOCK:
                raise DamagedArchive("unexpected end of data: the archive ends inside a header")
            numbers += self._sparse_numbers(more[:504], 21)
            if len(numbers) > 2 * SPARSE_SEGMENTS_MAX:
                raise DamagedArchive(f"a sparse file of more than {SPARSE_SEGMENTS_MAX} pieces")
            extended = more[504]
        return real_size, _sparse_pairs(numbers, "GNU")

    @staticmethod
    def _sparse_numbers(raw: bytes, count: int) -> list[int]:
        numbers: list[int] = []
        for index in range(count):
            entry = raw[24 * index : 24 * index + 24]
            if entry[0] == 0:
                break  # unused entries are empty
            numbers += [_number(entry[:12], "sparse offset"), _number(entry[12:], "sparse size")]
        return numbers

    def _pax_sparse(
        self, name: str, pax: dict[str, bytes], pairs: list[bytes], stored: int
    ) -> tuple[str, int, list[tuple[int, int]], int]:
        """GNU's PAX sparse formats: 0.0 (repeated records), 0.1 (a map record), 1.0 (the
        map at the start of the content). Return the name, size, pieces and stored bytes."""
        if "GNU.sparse.name" in pax:
            name = _text(pax["GNU.sparse.name"])
        sized = pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size")
        if sized is None:
            raise DamagedArchive("damaged sparse file: its size is not given")
        size = _decimal(sized, "sparse size")
        if pax.get("GNU.sparse.major") == b"1":
            if pax.get("GNU.sparse.minor", b"0") != b"0":
                raise DamagedArchive("a sparse file of an unknown format")
            pieces, map_bytes = self._sparse_map_1_0(stored)
            return name, size, pieces, stored - map_bytes
        if "GNU.sparse.map" in pax:
            numbers = [_decimal(n, "sparse map") for n in pax["GNU.sparse.map"].split(b",")]
            return name, size, _sparse_pairs(numbers, "0.1"), stored
        numbers = [_decimal(value, "sparse map") for value in pairs]
        return name, size, _sparse_pairs(numbers, "0.0"), stored

    def _sparse_map_1_0(self, stored: int) -> tuple[list[tuple[int, int]], int]:
        """Read the decimal map that opens the content: a count, then offset/length lines."""
        lines: list[int] = []
        text = b""
        used = 0
        wanted = 1
        while len(lines) < wanted:
            if b"\n" not in text:
                if used >= min(stored, EXTENSION_HEADER_MAX):
                    raise DamagedArchive("damaged sparse map: it does not end")
                block = self._take(BLOCK)
                if len(block) < BLOCK:
                    raise DamagedArchive("unexpected end of data: the archive ends in a map")
                used += BLOCK
                text += block
                continue
            line, text = text.split(b"\n", 1)
            lines.append(_decimal(line, "sparse map"))
            if len(lines) == 1:
                if lines[0] > SPARSE_SEGMENTS_MAX:
                    raise DamagedArchive(f"a sparse file of more than {SPARSE_SEGMENTS_MAX} pieces")
                wanted = 1 + 2 * lines[0]
        if used > stored:
            raise DamagedArchive("damaged sparse map: it is longer than the content")
        return _sparse_pairs(lines[1:], "1.0"), used

    # --- content ----------------------------------------------------------------

    def read(self, size: int) -> bytes:
        """Return up to ``size`` bytes of the current member's content; b"" at its end.

        Raise DamagedArchive if the stream ends inside it.
        """
        if size <= 0:
            return b""
        if self._pieces is None:
            return self._piece(min(size, self._owed)) if self._owed > 0 else b""
        if self._next_piece < len(self._pieces):
            offset, length = self._pieces[self._next_piece]
            if self._logical < offset:  # a hole before the next piece
                hole = min(size, offset - self._logical)
                self._logical += hole
                return bytes(hole)
            data = self._piece(min(size, offset + length - self._logical))
            self._logical += len(data)
            if self._logical >= offset + length:
                self._next_piece += 1
            return data
        hole = min(size, self._size - self._logical)  # the hole after the last piece
        self._logical += hole
        return bytes(hole)

    def trailer(self, limit: int) -> int:
        """Read the rest of the stream after the end-of-archive block; return its length.

        Raise DamagedArchive if any of it is not zero, or more than ``limit`` bytes.
        """
        seen = 0
        chunk = self._buffer[self._position :]
        self._buffer, self._position = b"", 0
        while True:
            seen += len(chunk)
            if chunk.count(0) != len(chunk):
                raise DamagedArchive("data follows the end-of-archive marker")
            if seen > limit:
                raise DamagedArchive(f"more than {limit} bytes follow the end-of-archive marker")
            chunk = self._stream.read(READ_BYTES)
            if not chunk:
                return seen
