"""Content-addressed data objects in a repository's storage: a local directory or S3.

Objects live at ``data/<2 hex>/<38 hex><algorithm suffix>[P|C|…]`` below the storage root
(local: the directory served as the stratum 0; S3: ``<repository name>/`` in the bucket).
The stored bytes hash to the name, and clients fetch them anonymously, so every object
written is world-readable (local mode 0644; S3 ACL ``public-read`` unless the S3
configuration says otherwise).

:func:`open_storage` turns a repository's ``CVMFS_UPSTREAM_STORAGE`` value into an
:class:`~cvmfs_syncd.cvmfs.objects.ObjectStore`: a :class:`LocalObjectStore` (here) or an
:class:`~cvmfs_syncd.cvmfs.s3storage.S3ObjectStore`. :class:`RecordingSink` adapts a store
to the graft engine's :class:`~cvmfs_syncd.cvmfs.graft.ObjectSink`, verifies every object
after writing it, and records which objects it created, so that an abandoned batch can
delete exactly those.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Final

import structlog

from cvmfs_syncd.cvmfs.objects import (
    DIRECTORY_MODE,
    READ_PIECE,
    TEMP_PREFIX,
    ObjectStore,
    StagedFile,
    StoredObjectWriter,
    checksum_of_object,
    object_hasher,
)
from cvmfs_syncd.cvmfs.s3storage import S3Config, S3ObjectStore
from cvmfs_syncd.errors import StorageError

log = structlog.get_logger(__name__)

OBJECT_MODE: Final = 0o644


# --------------------------------------------------------------------------- local


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def _usable_at(target: str, size: int) -> bool | None:
    """None if absent; True if a world-readable regular file of ``size`` bytes."""
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StorageError(f"cannot inspect {target}: {error}") from error
    return stat.S_ISREG(info.st_mode) and info.st_size == size and bool(info.st_mode & stat.S_IROTH)


def _syncfs(path: Path) -> None:
    """Flush the file system holding ``path`` to disk (``syncfs``; ``sync`` as a fallback)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):
        os.sync()
        return
    try:
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class LocalObjectWriter:
    """A temporary file in ``data/txn`` that :meth:`commit` renames into place."""

    def __init__(self, store: LocalObjectStore) -> None:
        self._store = store
        self._staged = StagedFile(store.txn_dir)

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`StorageError` on I/O errors or after commit."""
        self._staged.write(data)

    def commit(self, name: str) -> bool:
        """Flush, make 0644 and rename into ``name``; True if the object is new."""
        self._staged.finish(name)
        try:
            return self._store.install(self._staged, name)
        finally:
            self._staged.remove()

    def discard(self) -> None:
        """Remove the temporary file."""
        self._staged.remove()


class LocalObjectStore:
    """Objects below a local storage root (``/srv/cvmfs/<repo>``).

    New objects are written to a temporary file in ``<root>/data/txn`` (same file system),
    fsynced, made mode 0644 and renamed into place, so a reader never sees a partial
    object. Raises :class:`StorageError` if ``<root>/data`` does not exist.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self._root_str = os.fspath(self.root)
        #: False: objects are not fsynced one by one; :meth:`flush` makes them durable at once.
        self.durable = durable
        self.description = f"local storage {self.root}"
        self._data = self.root / "data"
        if not self._data.is_dir():
            raise StorageError(f"{self.root} is not a repository storage: it has no data/")
        self.txn_dir = self._data / "txn"

    def path_of(self, name: str) -> Path:
        """Return the file of object ``name``; raises :class:`StorageError` for a bad name."""
        checksum_of_object(name)
        return self.root / name

    def _usable(self, target: Path, size: int) -> bool | None:
        """None if absent; True if a world-readable regular file of ``size`` bytes."""
        return _usable_at(os.fspath(target), size)

    def install(self, staged: StagedFile, name: str) -> bool:
        """Move a written temporary file into place as ``name`` (see :meth:`put`)."""
        target = self.path_of(name)
        state = self._usable(target, staged.size)
        if state or staged.path is None:
            return False
        try:
            if self.durable:
                os.fsync(staged.fd)
            os.fchmod(staged.fd, OBJECT_MODE)
            target.parent.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
            staged.path.replace(target)
            staged.moved()
            if self.durable:
                _fsync_directory(target.parent)
        except OSError as error:
            raise StorageError(f"cannot store {name} in {self.root}: {error}") from error
        if state is False:
            log.warning("storage.object_rewritten", object=name, storage=self.description)
        return state is None

    def put(self, name: str, data: bytes) -> bool:
        """See :meth:`ObjectStore.put`.

        The small-object path (most objects are a few KiB): plain string paths, one
        temporary file created with O_EXCL in ``data/txn``, made 0644 whatever the umask,
        renamed into place; fsynced only when the store is durable.
        """
        target = self._path(name)
        state = _usable_at(target, len(data))
        if state:
            return False
        temp = f"{self.txn_dir}/{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            try:
                fd = os.open(temp, _TEMP_FLAGS, 0o600)
            except FileNotFoundError:
                self.txn_dir.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
                fd = os.open(temp, _TEMP_FLAGS, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
                os.fchmod(fd, OBJECT_MODE)
            finally:
                os.close(fd)
            try:
                os.replace(temp, target)
            except FileNotFoundError:
                os.mkdir(os.path.dirname(target), DIRECTORY_MODE)
                os.replace(temp, target)
            if self.durable:
                _fsync_directory(Path(target).parent)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StorageError(f"cannot store {name} in {self.root}: {error}") from error
        if state is False:
            log.warning("storage.object_rewritten", object=name, storage=self.description)
        return state is None

    def open_writer(self) -> LocalObjectWriter:
        """See :meth:`ObjectStore.open_writer`."""
        return LocalObjectWriter(self)

    def exists(self, name: str) -> bool:
        """See :meth:`ObjectStore.exists`."""
        return os.path.isfile(self._path(name))

    def _path(self, name: str) -> str:
        checksum_of_object(name)
        return f"{self._root_str}/{name}"

    def read(self, name: str) -> bytes:
        """See :meth:`ObjectStore.read`."""
        try:
            return self.path_of(name).read_bytes()
        except OSError as error:
            raise StorageError(f"cannot read {name} from {self.root}: {error}") from error

    def delete(self, name: str) -> None:
        """See :meth:`ObjectStore.delete`."""
        try:
            self.path_of(name).unlink(missing_ok=True)
        except OSError as error:
            raise StorageError(f"cannot delete {name} from {self.root}: {error}") from error

    def verify(self, name: str) -> bool:
        """Hash the file; False if it is missing, not world-readable or does not match."""
        path = self._path(name)
        hasher = object_hasher(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise StorageError(f"cannot read {name} from {self.root}: {error}") from error
        try:
            if not os.fstat(fd).st_mode & stat.S_IROTH:
                return False
            while piece := os.read(fd, READ_PIECE):
                hasher.update(piece)
        except OSError as error:
            raise StorageError(f"cannot read {name} from {self.root}: {error}") from error
        finally:
            os.close(fd)
        return hasher.checksum() == checksum_of_object(name)

    def flush(self) -> None:
        """One ``syncfs`` of the storage's file system (``sync`` where it is missing)."""
        if self.durable:
            return
        _syncfs(self._data)

    def close(self) -> None:
        """Nothing to release for a local directory."""


# --------------------------------------------------------------------------- opening


def unreadable_objects(root: Path, *, sample: int = 1024) -> tuple[int, list[str]]:
    """Look at up to ``sample`` objects of a local storage; return (looked at, the names of
    those not world-readable). Reads metadata only and changes nothing: an operator
    decides whether to chmod (objects written under a restrictive umask, faults.md F4)."""
    data = root / "data"
    try:
        prefixes = sorted(p for p in os.listdir(data) if len(p) == 2)
    except OSError:
        return 0, []
    per_prefix = max(1, sample // max(1, len(prefixes)))
    seen = 0
    bad: list[str] = []
    for prefix in prefixes:
        try:
            with os.scandir(data / prefix) as entries:
                for count, entry in enumerate(entries):
                    if count >= per_prefix or seen >= sample:
                        break
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    seen += 1
                    if not info.st_mode & stat.S_IROTH:
                        bad.append(f"data/{prefix}/{entry.name}")
        except OSError:
            continue
    return seen, bad


def open_storage(upstream: str, repo_name: str, *, durable: bool = True) -> ObjectStore:
    """Return the store a ``CVMFS_UPSTREAM_STORAGE`` value describes.

    ``local,<txn dir>,<storage root>`` gives a :class:`LocalObjectStore` (temporary files
    go to ``<storage root>/data/txn``); ``S3,<spool tmp dir>,<prefix>@<S3 config file>``
    an :class:`S3ObjectStore` with keys ``<prefix>/data/…``. ``repo_name`` names the
    repository in error messages. Raises :class:`StorageError` for other storage types,
    malformed values and unreadable S3 configurations.
    """
    kind, _, rest = upstream.partition(",")
    first, _, second = rest.partition(",")
    if kind == "local":
        if not second:
            raise StorageError(f"{repo_name}: malformed local upstream storage {upstream!r}")
        return LocalObjectStore(Path(second), durable=durable)
    if kind == "S3":
        prefix, at, config_path = second.partition("@")
        if not first or not at or not config_path:
            raise StorageError(f"{repo_name}: malformed S3 upstream storage {upstream!r}")
        return S3ObjectStore(S3Config.from_file(Path(config_path)), prefix, Path(first))
    raise StorageError(f"{repo_name}: unsupported upstream storage type {kind!r}")


# --------------------------------------------------------------------------- recording


class RecordingWriter:
    """Wraps a store writer: verifies on commit and reports to the :class:`RecordingSink`."""

    def __init__(self, sink: RecordingSink, inner: StoredObjectWriter) -> None:
        self._sink = sink
        self._inner = inner

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        self._inner.write(data)

    def commit(self, name: str) -> None:
        """Store, verify and record ``name``; raises :class:`StorageError`."""
        self._sink.record(name, self._inner.commit(name))

    def discard(self) -> None:
        """Drop the object."""
        self._inner.discard()


class RecordingSink:
    """An object sink for the graft engine that writes to ``store`` and keeps a record.

    Every object is verified after it is stored (:meth:`ObjectStore.verify`: readable
    like a client reads it, bytes hash to the name); a failure raises
    :class:`StorageError`. :attr:`created` lists the objects this sink created, in order
    and without repeats: deleting exactly those undoes the sink's effect on the storage.
    Objects that existed already are listed in :attr:`reused`. Thread-safe.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._created: dict[str, None] = {}
        self._reused: dict[str, None] = {}

    @property
    def created(self) -> tuple[str, ...]:
        """Names of the objects this sink created."""
        with self._lock:
            return tuple(self._created)

    @property
    def reused(self) -> tuple[str, ...]:
        """Names of objects that already existed (never to be deleted on abandon)."""
        with self._lock:
            return tuple(name for name in self._reused if name not in self._created)

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, verify it and record it; raises :class:`StorageError`.

        An object that was already there but fails verification (corrupted, same size) is
        rewritten from ``data``: objects are content-addressed, so these bytes are the ones
        it must hold. It still counts as reused, never as created.
        """
        created = self.store.put(name, data)
        try:
            self.record(name, created)
        except StorageError:
            if created:
                raise
            log.warning("rewriting a corrupt object that was already stored", name=name)
            self.store.delete(name)
            self.store.put(name, data)
            if not self.store.verify(name):
                raise
            log.info("corrupt object repaired", name=name)

    def open_writer(self) -> RecordingWriter:
        """Start a large object in the store."""
        return RecordingWriter(self, self.store.open_writer())

    def record(self, name: str, created: bool) -> None:
        """Verify ``name`` after a write and note whether this sink created it."""
        # Recorded before verifying: an object we created must be deletable even if bad.
        with self._lock:
            if created:
                self._created[name] = None
            else:
                self._reused[name] = None
        if not self.store.verify(name):
            origin = "written" if created else "already present"
            raise StorageError(
                f"object {name} ({origin}) in {self.store.description} failed verification: "
                "its bytes do not hash to its name or clients cannot read it"
            )
