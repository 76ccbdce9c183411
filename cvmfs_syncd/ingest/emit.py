"""The second read of a tarball drop: write the plain tar ``cvmfs_server ingest -t -`` reads.

``ingest`` only ever reads a tar written here, from members the first read validated
(:func:`cvmfs_syncd.ingest.check.check_archive`): names normalised, owners 0:0 with no
owner names, permission bits ``& 0o777``, every directory listed before what it holds
(:meth:`Manifest.output_plan`), hard links as hard links to the earlier member.

The format is GNU tar's: names and link targets are written as the bytes they were
archived with (long ones in GNU long-name records), which libarchive hands to ``ingest``
unconverted whatever its locale, where a PAX header's UTF-8 names are converted to the
locale's character set. Sizes and times beyond the octal fields use GNU's base-256 numbers.

Every member read is compared with the Manifest, and at the end the whole stream's length
and SHA-256 with those the first read saw. On the first difference (or any failure) the
tar written so far is left unfinished: no end-of-archive marker, and, when it ends between
two members, one more header whose content never follows. That matters: libarchive (and
so ``ingest``) takes an archive that simply stops at a member boundary for a complete one
and would publish the members it got; a member cut short it reports as ``Truncated tar
archive`` and ``ingest`` aborts without publishing (m2_ingest 51).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from cvmfs_syncd.ingest.members import MemberRefused, classify
from cvmfs_syncd.ingest.model import (
    ArchiveChanged,
    IngestLimits,
    Manifest,
    Member,
    MemberKind,
    Readable,
    Writable,
)
from cvmfs_syncd.ingest.names import Compression
from cvmfs_syncd.ingest.streams import (
    CHUNK_BYTES,
    NAME_ENCODING,
    NAME_ERRORS,
    DamagedArchive,
    DigestReader,
    finish_archive,
    open_archive,
)
from cvmfs_syncd.ingest.tarformat import (
    BLOCK,
    DIRTYPE,
    GNU_LONGLINK,
    GNU_LONGNAME,
    LNKTYPE,
    REGTYPE,
    SYMTYPE,
    TarHeader,
    TarReader,
)

BLOCK_BYTES = BLOCK
#: Bytes gathered before they are written out: many small members make few writes.
FLUSH_BYTES = 256 * 1024
#: Name of the header that makes an unfinished tar unreadable to its end (see the module).
#: A reserved name, so no member can have it.
TRIPWIRE_NAME = ".cvmfs-syncd.incomplete"

_TYPES = {
    MemberKind.FILE: REGTYPE,
    MemberKind.DIRECTORY: DIRTYPE,
    MemberKind.SYMLINK: SYMTYPE,
    MemberKind.HARDLINK: LNKTYPE,
}
_GNU_MAGIC = b"ustar  \0"
#: Bytes of a header's name and link fields; longer ones go in GNU long-name records.
NAME_FIELD_BYTES = 100
_LONG_LINK_NAME = b"././@LongLink"
_ZERO_ID = b"0000000\0"  # uid and gid

# The second read only compares: names and targets the check allowed are allowed here,
# and anything else that differs is a difference.
_ANY_NAME = IngestLimits(allow_absolute_symlinks=True, allow_reserved_names=True)


def _number(value: int, width: int) -> bytes:
    """An octal field of ``width`` bytes, or GNU's base-256 form for what octal cannot hold."""
    if 0 <= value < 8 ** (width - 1):
        octal: bytes = b"%0*o\0" % (width - 1, value)
        return octal
    limit: int = 256 ** (width - 1)
    if not -limit <= value < limit:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    lead = 0o200 if value >= 0 else 0o377
    return bytes([lead]) + (value % limit).to_bytes(width - 1, "big")


def _block(name: bytes, mode: int, size: int, mtime: int, kind: bytes, link: bytes) -> bytes:
    header = b"".join(
        (
            name[:NAME_FIELD_BYTES].ljust(NAME_FIELD_BYTES, b"\0"),
            _number(mode, 8),
            _ZERO_ID,
            _ZERO_ID,
            _number(size, 12),
            _number(mtime, 12),
            b"        ",
            kind,
            link[:NAME_FIELD_BYTES].ljust(NAME_FIELD_BYTES, b"\0"),
            _GNU_MAGIC,
        )
    ).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _long_record(kind: bytes, value: bytes) -> bytes:
    data = value + b"\0"
    return _block(_LONG_LINK_NAME, 0, len(data), 0, kind, b"") + data.ljust(
        len(data) - len(data) % -BLOCK, b"\0"
    )


def tar_header(member: Member) -> bytes:
    """Return the GNU tar header block(s) of ``member`` as this module writes it: owners
    0:0 without names, a directory's name ending in ``/``, names and targets over 100
    bytes in GNU long-name records before the header."""
    name = member.path.encode(NAME_ENCODING, NAME_ERRORS)
    if member.kind is MemberKind.DIRECTORY:
        name += b"/"
    link = (member.link_target or "").encode(NAME_ENCODING, NAME_ERRORS)
    size = member.size if member.kind is MemberKind.FILE else 0
    records = b""
    if len(link) > NAME_FIELD_BYTES:
        records += _long_record(GNU_LONGLINK, link)
    if len(name) > NAME_FIELD_BYTES:
        records += _long_record(GNU_LONGNAME, name)
    return records + _block(name, member.mode, size, member.mtime, _TYPES[member.kind], link)


_TRIPWIRE = tar_header(Member(TRIPWIRE_NAME, MemberKind.FILE, 0o600, size=1))


class _TarWriter:
    """Blocks into ``out``, gathered up to :data:`FLUSH_BYTES`, knowing whether a member's
    content is still owed."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._pending = bytearray()
        self._owed = 0
        self._size = 0

    def _write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write out what was gathered."""
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._out.write(data)

    def header(self, member: Member) -> None:
        self._write(tar_header(member))
        self._size = member.size if member.kind is MemberKind.FILE else 0
        self._owed = self._size

    def content(self, chunk: bytes) -> None:
        self._write(chunk)
        self._owed -= len(chunk)

    def end_member(self) -> None:
        padding = -self._size % BLOCK_BYTES
        if padding:
            self._write(bytes(padding))

    def finish(self) -> None:
        self._write(bytes(2 * BLOCK_BYTES))
        self.flush()

    def spoil(self) -> None:
        """Make sure what was written cannot be read as a whole archive."""
        with suppress(Exception):  # the output may be broken; the first error is raised
            self.flush()
            if self._owed <= 0:  # else it ends inside a member's content already
                self._out.write(_TRIPWIRE)


@contextmanager
def _reading(member: str) -> Iterator[None]:
    """Turn a member refused or an archive unreadable on the second read into
    ArchiveChanged: the first read accepted both."""
    try:
        yield
    except MemberRefused as exc:
        raise ArchiveChanged(member, exc.message) from None
    except DamagedArchive as exc:
        raise ArchiveChanged(member, f"it can no longer be read: {exc}") from exc


def _archive_members(tar: TarReader) -> Iterator[tuple[TarHeader, Member]]:
    for info in tar:
        member = classify(info, _ANY_NAME)
        if member is not None:
            yield info, member


def _difference(expected: Member, found: Member) -> str:
    for field in ("path", "kind", "size", "link_target", "mode", "mtime"):
        before, after = getattr(expected, field), getattr(found, field)
        if before != after:
            return f"{field} was {before!r}, is {after!r}"
    return "it differs"  # only called for unequal members


def _copy(
    raw: DigestReader, manifest: Manifest, writer: _TarWriter, compression: Compression | None
) -> None:
    name = ""
    with ExitStack() as stack:
        with _reading(name):
            tar = stack.enter_context(open_archive(raw, compression))
        found = _archive_members(tar)
        for step in manifest.output_plan():
            member = step.member
            if step.index is None:
                writer.header(member)
                writer.end_member()
                continue
            with _reading(name):
                pair = next(found, None)
            if pair is None:
                raise ArchiveChanged(name, f"the archive ends before {member.path!r}")
            info, read = pair
            name = info.name
            if read != member:
                raise ArchiveChanged(name, _difference(member, read))
            if not step.write:
                continue
            writer.header(member)
            if member.kind is MemberKind.FILE:
                remaining = member.size
                while remaining:
                    with _reading(name):
                        chunk = tar.read(min(CHUNK_BYTES, remaining))
                    if not chunk:
                        raise ArchiveChanged(name, "its content ends early")
                    writer.content(chunk)
                    remaining -= len(chunk)
            writer.end_member()
        with _reading(name):
            extra = next(found, None)
            if extra is None:
                finish_archive(tar, raw)
        if extra is not None:
            raise ArchiveChanged(extra[0].name, "the archive has more members than were checked")
    if raw.count != manifest.archive_bytes or raw.hexdigest() != manifest.digest:
        raise ArchiveChanged(
            "",
            f"its bytes differ from those checked ({raw.count} bytes now, "
            f"{manifest.archive_bytes} then; SHA-256 {raw.hexdigest()}, {manifest.digest} then)",
        )


def emit_plain_tar(
    stream: Readable,
    manifest: Manifest,
    out: Writable,
    *,
    compression: Compression | None = None,
) -> None:
    """Read ``stream`` (the archive ``manifest`` was made from) again and write the plain
    tar for ``ingest`` to ``out``, in bounded memory.

    ``compression`` as for :func:`cvmfs_syncd.ingest.check.check_archive`. Raise
    :class:`ArchiveChanged` if the archive differs from the Manifest in any member or in
    any byte, :class:`ArchiveStreamError` if reading it fails, and whatever writing to
    ``out`` raises; in every such case ``out`` holds a tar that cannot be read to a clean
    end (see the module), so a consumer already reading it fails instead of publishing
    part of it.
    """
    raw = DigestReader(stream)
    writer = _TarWriter(out)
    try:
        _copy(raw, manifest, writer, compression)
    except BaseException:
        writer.spoil()
        raise
    writer.finish()
