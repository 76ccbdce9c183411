"""A tarball's base in the union directory: what is live under it, and unpacking a checked
tarball into the open transaction, for a replacement one ``cvmfs_server ingest`` call
cannot make (a path changes type, an argument its shell would garble, deletions on a
gateway repository).

The archive is read a second time through :func:`cvmfs_syncd.ingest.emit_plain_tar`, the
same writer that feeds ``ingest``, so what is unpacked is exactly what the check
validated (compared member by member and byte by byte with the Manifest): the emitter
writes into a pipe from a thread of its own, and this side reads that plain tar (with
the reader of both reads, :class:`cvmfs_syncd.ingest.tarformat.TarReader`) and
places each member through :mod:`cvmfs_syncd.fsops` (never following a symlink). A hard
link becomes an independent copy of the file it names, as ``ingest`` makes it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from cvmfs_syncd import fsops
from cvmfs_syncd.errors import UnsafeName
from cvmfs_syncd.ingest import CATALOG_MARKER, Compression, Manifest, emit_plain_tar
from cvmfs_syncd.ingest.model import ArchiveChanged, Readable
from cvmfs_syncd.ingest.streams import TRAILER_MAX
from cvmfs_syncd.ingest.tarformat import DamagedArchive, TarReader
from cvmfs_syncd.model import EntryType, Fingerprint

#: Bytes read from a member's content at a time.
PIECE_BYTES = 1 << 20
#: What :func:`live_tree` makes of a device, FIFO or unreadable entry.
_ODDITY = Fingerprint(EntryType.FILE, size=-1)


def unpack(
    stream: Readable,
    manifest: Manifest,
    union: Path,
    base: str,
    *,
    compression: Compression | None,
    deletes: Sequence[str],
    catalog: bool,
    heartbeat: Callable[[], None],
) -> None:
    """Make the repository path ``base`` (below the union directory ``union`` of the open
    transaction) hold exactly the archive ``stream``, which ``manifest`` describes.

    ``deletes`` (repository paths) are removed first; then the base directory and every
    member are placed, replacing what is in their way; with ``catalog`` the base gets a
    nested catalog. ``heartbeat`` is called as the work goes on.

    Raise :class:`ArchiveChanged` or :class:`ArchiveStreamError` when the archive is not
    the one checked or cannot be read, OSError or UnsafeName when the union directory
    cannot be written. What was written then is left for the caller's abort.
    """
    for path in deletes:
        fsops.delete(union, path)
    fsops.make_dir(union, base, fsops.DEFAULT_DIR_MODE, replace=True)
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    writer = os.fdopen(write_fd, "wb")
    failure: list[BaseException] = []

    def emit() -> None:
        try:
            emit_plain_tar(stream, manifest, writer, compression=compression)
        except BrokenPipeError:
            pass  # the reading side stopped; its error is the one raised
        except BaseException as exc:  # handed to the reading side
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    thread = threading.Thread(target=emit, name="unpack-emit", daemon=True)
    thread.start()
    try:
        _place_all(reader, union, base, heartbeat)
    except (OSError, UnsafeName, DamagedArchive) as exc:
        reader.close()
        thread.join()
        if failure:
            raise failure[0] from exc
        if isinstance(exc, DamagedArchive):
            raise ArchiveChanged("", f"the checked tar could not be read back: {exc}") from exc
        raise
    finally:
        reader.close()
        thread.join()
    if failure:
        raise failure[0]
    if catalog and CATALOG_MARKER not in manifest.entries():
        fsops.write_file(union, f"{base}/{CATALOG_MARKER}", b"", mode=0o644)


def _place_all(reader: IO[bytes], union: Path, base: str, heartbeat: Callable[[], None]) -> None:
    tar = TarReader(reader)
    while (info := tar.next()) is not None:
        heartbeat()
        path = f"{base}/{info.name}"
        mtime_ns = int(info.mtime) * 10**9
        if info.isdir():
            fsops.make_dir(union, path, info.mode, replace=True)
        elif info.issym():
            fsops.make_symlink(union, path, info.linkname, mtime_ns=mtime_ns, replace=True)
        elif info.islnk():
            _copy_linked(union, f"{base}/{info.linkname}", path, info.mode, mtime_ns)
        else:
            written = fsops.write_stream(
                union,
                path,
                _pieces(tar),
                size=info.size,
                mode=info.mode,
                mtime_ns=mtime_ns,
                replace=True,
            )
            if not written:
                raise ArchiveChanged(info.name, "its content ended early")
    tar.trailer(TRAILER_MAX)  # the emitter's last blocks, so that it ends without a broken pipe


def _pieces(content: TarReader | IO[bytes]) -> Iterator[bytes]:
    while piece := content.read(PIECE_BYTES):
        yield piece


def _copy_linked(union: Path, target: str, path: str, mode: int, mtime_ns: int) -> None:
    """Write ``path`` as a copy of the file ``target`` placed before it (a hard link)."""
    found = fsops.stat_entry(union, target)
    if not isinstance(found, Fingerprint):
        raise ArchiveChanged(path, f"the hard link's target {target!r} is not there")
    opened = fsops.open_staged(union, target, found)
    if isinstance(opened, fsops.CopyOutcome):
        raise ArchiveChanged(path, f"the hard link's target {target!r} cannot be read")
    with os.fdopen(opened, "rb") as source:
        fsops.write_stream(
            union, path, _pieces(source), size=found.size, mode=mode, mtime_ns=mtime_ns
        )


def live_tree(union: Path, base: str, heartbeat: Callable[[], None]) -> dict[str, Fingerprint]:
    """What is live at and below the repository path ``base`` (paths relative to it, ``""``
    the base itself), read from the union directory ``union`` without following a
    symlink; anything but a file, directory or symlink counts as a file of no size.
    Raise OSError."""
    found = fsops.stat_entry(union, base)
    if found is None:
        return {}
    if not isinstance(found, Fingerprint):
        return {"": _ODDITY}
    if found.type is not EntryType.DIRECTORY:
        return {"": found}
    live = {"": found}
    for rel, below in fsops.walk_staging(union, subdir=base, cross_mounts=True):
        live[rel[len(base) + 1 :]] = below if isinstance(below, Fingerprint) else _ODDITY
        heartbeat()
    return live
