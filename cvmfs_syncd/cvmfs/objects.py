"""What every object storage shares: object names, their verification, the protocols.

Objects live at ``data/<2 hex>/<38 hex><algorithm suffix>[P|C|…]`` below the storage root;
:func:`checksum_of_object` reads the checksum back out of such a name and
:func:`object_hasher` gives the hasher that verifies the stored bytes against it.
:class:`ObjectStore` is the protocol a storage implements
(:mod:`cvmfs_syncd.cvmfs.storage` for a local directory, :mod:`cvmfs_syncd.cvmfs.s3storage`
for S3); :class:`StagedFile` is the temporary file both stage a large object in.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Final, Protocol

from cvmfs_syncd.cvmfs.hashing import ContentHasher, algorithm_of
from cvmfs_syncd.errors import GraftError, StorageError

OBJECT_NAME_PATTERN: Final = re.compile(
    r"data/(?P<head>[0-9a-f]{2})/(?P<tail>[0-9a-f]{38})(?P<algorithm>-rmd160|-shake128)?[A-Z]?"
)
DIRECTORY_MODE: Final = 0o755
READ_PIECE: Final = 1 << 20
TEMP_PREFIX: Final = "syncd."


def checksum_of_object(name: str) -> str:
    """Return the checksum an object name encodes: ``data/ab/cd…-rmd160P`` -> ``abcd…-rmd160``.

    Raises :class:`StorageError` if ``name`` is not an object name.
    """
    match = OBJECT_NAME_PATTERN.fullmatch(name)
    if match is None:
        raise StorageError(f"not a data object name: {name!r}")
    return match["head"] + match["tail"] + (match["algorithm"] or "")


def object_hasher(name: str) -> ContentHasher:
    """Return a hasher in the algorithm the name ``name`` encodes; :class:`StorageError` if
    ``name`` is not an object name."""
    try:
        return ContentHasher(algorithm_of(checksum_of_object(name)))
    except GraftError as error:  # pragma: no cover - the pattern admits known suffixes only
        raise StorageError(str(error)) from error


class StoredObjectWriter(Protocol):
    """A large object being written in pieces; :meth:`commit` names and publishes it."""

    def write(self, data: bytes) -> None:
        """Append stored bytes."""

    def commit(self, name: str) -> bool:
        """Store the bytes under ``name``; True if the object did not exist before."""

    def discard(self) -> None:
        """Drop the bytes; harmless after :meth:`commit` or a previous discard."""


class ObjectStore(Protocol):
    """A repository's object storage.

    Every method raises :class:`StorageError` when the storage cannot be used (and for
    names that are not ``data/…`` object names).
    """

    description: str

    def put(self, name: str, data: bytes) -> bool:
        """Store ``data`` under ``name``.

        Returns True if the object was created, False if it existed already: an existing
        object is kept if clients can read it and its size matches, and rewritten
        otherwise (it still counts as existing: deleting it could break published files).
        """

    def open_writer(self) -> StoredObjectWriter:
        """Start an object whose bytes are written in pieces (same rules as :meth:`put`)."""

    def exists(self, name: str) -> bool:
        """Tell whether an object exists under ``name``."""

    def read(self, name: str) -> bytes:
        """Return the stored bytes of ``name``."""

    def delete(self, name: str) -> None:
        """Remove ``name``; removing a missing object is not an error."""

    def verify(self, name: str) -> bool:
        """Tell whether ``name`` is readable the way clients read it and hashes to its name."""

    def flush(self) -> None:
        """Make every object written so far durable (a no-op where each write already is)."""

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""


class StagedFile:
    """A temporary file an object is written to before it is stored under its name."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            self.fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        except OSError as error:
            raise StorageError(
                f"cannot create a temporary object in {directory}: {error}"
            ) from error
        self.path: Path | None = Path(temp_name)
        self.size = 0
        self.writable = True

    def write(self, data: bytes) -> None:
        if not self.writable:
            raise StorageError("write to an object that is already finished")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as error:
            self.remove()
            raise StorageError(f"writing a temporary object failed: {error}") from error
        self.size += len(data)

    def finish(self, name: str) -> Path:
        """End writing and return the file; raises :class:`StorageError` if it had ended."""
        if not self.writable or self.path is None:
            raise StorageError(f"commit of {name}: the object is already finished")
        self.writable = False
        return self.path

    def moved(self) -> None:
        """Note that the file was renamed into place: its old name may be reused by others."""
        self.path = None

    def remove(self) -> None:
        """Close the file and delete it unless it was moved (idempotent)."""
        self.writable = False
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None
