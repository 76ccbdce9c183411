"""Content-addressed data objects in a repository's storage: a local directory or S3.

Objects live at ``data/<2 hex>/<38 hex><algorithm suffix>[P|C|…]`` below the storage root
(local: the directory served as the stratum 0; S3: ``<repository name>/`` in the bucket).
The stored bytes hash to the name, and clients fetch them anonymously, so every object
this module writes is world-readable (local mode 0644; S3 ACL ``public-read`` unless the
S3 configuration says otherwise).

:func:`open_storage` turns a repository's ``CVMFS_UPSTREAM_STORAGE`` value into an
:class:`ObjectStore`. :class:`RecordingSink` adapts a store to the graft engine's
:class:`~cvmfs_syncd.cvmfs.graft.ObjectSink`, verifies every object after writing it,
and records which objects it created, so that an abandoned batch can delete exactly those.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol, cast

import structlog

from cvmfs_syncd.cvmfs.hashing import ContentHasher, algorithm_of
from cvmfs_syncd.cvmfs.repo import parse_shell_assignments
from cvmfs_syncd.errors import GraftError, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import ObjectCannedACLType

log = structlog.get_logger(__name__)

OBJECT_NAME_PATTERN: Final = re.compile(
    r"data/(?P<head>[0-9a-f]{2})/(?P<tail>[0-9a-f]{38})(?P<algorithm>-rmd160|-shake128)?[A-Z]?"
)
OBJECT_MODE: Final = 0o644
_DIRECTORY_MODE: Final = 0o755
_READ_PIECE: Final = 1 << 20
_TEMP_PREFIX: Final = "syncd."


def checksum_of_object(name: str) -> str:
    """Return the checksum an object name encodes: ``data/ab/cd…-rmd160P`` -> ``abcd…-rmd160``.

    Raises :class:`StorageError` if ``name`` is not an object name.
    """
    match = OBJECT_NAME_PATTERN.fullmatch(name)
    if match is None:
        raise StorageError(f"not a data object name: {name!r}")
    return match["head"] + match["tail"] + (match["algorithm"] or "")


def _hasher_for(name: str) -> ContentHasher:
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


class _StagedFile:
    """A temporary file an object is written to before it is stored under its name."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
            self.fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
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


class LocalObjectWriter:
    """A temporary file in ``data/txn`` that :meth:`commit` renames into place."""

    def __init__(self, store: LocalObjectStore) -> None:
        self._store = store
        self._staged = _StagedFile(store.txn_dir)

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

    def install(self, staged: _StagedFile, name: str) -> bool:
        """Move a written temporary file into place as ``name`` (see :meth:`put`)."""
        target = self.path_of(name)
        state = self._usable(target, staged.size)
        if state or staged.path is None:
            return False
        try:
            if self.durable:
                os.fsync(staged.fd)
            os.fchmod(staged.fd, OBJECT_MODE)
            target.parent.mkdir(mode=_DIRECTORY_MODE, exist_ok=True)
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
        temp = f"{self.txn_dir}/{_TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            try:
                fd = os.open(temp, _TEMP_FLAGS, 0o600)
            except FileNotFoundError:
                self.txn_dir.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
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
                os.mkdir(os.path.dirname(target), _DIRECTORY_MODE)
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
        hasher = _hasher_for(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise StorageError(f"cannot read {name} from {self.root}: {error}") from error
        try:
            if not os.fstat(fd).st_mode & stat.S_IROTH:
                return False
            while piece := os.read(fd, _READ_PIECE):
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


# --------------------------------------------------------------------------- S3


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("true", "yes", "1", "on")


@dataclass(frozen=True)
class S3Config:
    """The settings of a repository's S3 configuration file.

    Credentials are kept out of ``repr`` so that the object can be logged.
    """

    host: str
    port: int
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    dns_buckets: bool = True
    use_https: bool = False
    acl: str = "public-read"
    region: str = "us-east-1"

    @property
    def endpoint_url(self) -> str:
        """``http[s]://host:port``."""
        return f"{'https' if self.use_https else 'http'}://{self.host}:{self.port}"

    @classmethod
    def from_file(cls, path: Path) -> S3Config:
        """Parse ``KEY=VALUE`` lines (``CVMFS_S3_*``); raises :class:`StorageError`.

        Required: ``CVMFS_S3_HOST``, ``CVMFS_S3_BUCKET``, ``CVMFS_S3_ACCESS_KEY``,
        ``CVMFS_S3_SECRET_KEY``. Defaults: port 443 with HTTPS else 80, DNS-style buckets,
        plain HTTP, ACL ``public-read`` (an empty ``CVMFS_S3_X_AMZ_ACL`` sends no ACL).
        """
        try:
            settings = parse_shell_assignments(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise StorageError(f"cannot read the S3 configuration {path}: {error}") from error
        missing = [
            key
            for key in (
                "CVMFS_S3_HOST",
                "CVMFS_S3_BUCKET",
                "CVMFS_S3_ACCESS_KEY",
                "CVMFS_S3_SECRET_KEY",
            )
            if not settings.get(key)
        ]
        if missing:
            raise StorageError(f"the S3 configuration {path} lacks {', '.join(missing)}")
        acl = settings.get("CVMFS_S3_X_AMZ_ACL", "public-read")
        if acl and acl not in CANNED_ACLS:
            raise StorageError(f"the S3 configuration {path}: unknown CVMFS_S3_X_AMZ_ACL {acl!r}")
        use_https = _flag(settings.get("CVMFS_S3_USE_HTTPS"), default=False)
        port_text = settings.get("CVMFS_S3_PORT") or ("443" if use_https else "80")
        try:
            port = int(port_text)
        except ValueError:
            raise StorageError(f"the S3 configuration {path}: bad port {port_text!r}") from None
        return cls(
            host=settings["CVMFS_S3_HOST"],
            port=port,
            bucket=settings["CVMFS_S3_BUCKET"],
            access_key=settings["CVMFS_S3_ACCESS_KEY"],
            secret_key=settings["CVMFS_S3_SECRET_KEY"],
            dns_buckets=_flag(settings.get("CVMFS_S3_DNS_BUCKETS"), default=True),
            use_https=use_https,
            acl=acl,
            region=settings.get("CVMFS_S3_REGION") or "us-east-1",
        )


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(error).__name__


_MISSING_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
CANNED_ACLS: Final = frozenset(
    {
        "private",
        "public-read",
        "public-read-write",
        "authenticated-read",
        "aws-exec-read",
        "bucket-owner-read",
        "bucket-owner-full-control",
    }
)


class S3ObjectWriter:
    """A temporary file in the spool directory, uploaded by :meth:`commit`."""

    def __init__(self, store: S3ObjectStore) -> None:
        self._store = store
        self._staged = _StagedFile(store.spool_dir)

    def write(self, data: bytes) -> None:
        """Append ``data`` to the temporary file; raises :class:`StorageError`."""
        self._staged.write(data)

    def commit(self, name: str) -> bool:
        """Upload the file as ``name`` (see :meth:`ObjectStore.put`); True if new."""
        path = self._staged.finish(name)
        try:
            return self._store.upload_file(path, name, self._staged.size)
        finally:
            self._staged.remove()

    def discard(self) -> None:
        """Delete the temporary file."""
        self._staged.remove()


class S3ObjectStore:
    """Objects under ``<prefix>/data/…`` in an S3 bucket, written with the configured ACL.

    Writes and existence checks are signed with the repository's credentials; whether an
    existing object is usable and :meth:`verify` use *unsigned* requests, i.e. they read
    the object the way CernVM-FS clients do. That works whatever grants the anonymous
    read (an object ACL on AWS or moto, a bucket policy on MinIO), whereas an ACL query
    would miss bucket policies. Large objects are staged in ``spool_dir``.
    """

    def __init__(self, config: S3Config, prefix: str, spool_dir: Path) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.config = config
        self.prefix = prefix.strip("/")
        self.spool_dir = Path(spool_dir)
        self.description = f"S3 bucket {config.bucket} at {config.endpoint_url}, {self.prefix}/"
        style: Literal["virtual", "path"] = "virtual" if config.dns_buckets else "path"
        session = boto3.session.Session()
        self._client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key,
            region_name=config.region,
            config=Config(retries={"mode": "standard"}, s3={"addressing_style": style}),
        )
        self._anonymous: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=Config(
                signature_version=UNSIGNED,
                retries={"mode": "standard"},
                s3={"addressing_style": style},
            ),
        )
        # Validated against CANNED_ACLS when the configuration was read.
        self._acl: ObjectCannedACLType | None = (
            cast("ObjectCannedACLType", config.acl) if config.acl else None
        )

    def key_of(self, name: str) -> str:
        """Return the bucket key of object ``name``; raises :class:`StorageError`."""
        checksum_of_object(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _failure(self, action: str, key: str, error: Exception) -> StorageError:
        # Only the operation, bucket, key and error code: never the request or credentials.
        return StorageError(
            f"S3 {action} of {self.config.bucket}/{key} at {self.config.endpoint_url} "
            f"failed: {_error_code(error)}"
        )

    def _state(self, key: str, size: int) -> bool | None:
        """None if absent; True if anonymously readable with ``size`` bytes; else False."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return None
            raise self._failure("HEAD", key, error) from error
        except BotoCoreError as error:
            raise self._failure("HEAD", key, error) from error
        try:
            public = self._anonymous.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError:
            return False
        except BotoCoreError as error:
            raise self._failure("anonymous HEAD", key, error) from error
        return public.get("ContentLength") == size

    def _note_rewrite(self, name: str, state: bool | None) -> bool:
        if state is False:
            log.warning("storage.object_rewritten", object=name, storage=self.description)
        return state is None

    def put(self, name: str, data: bytes) -> bool:
        """See :meth:`ObjectStore.put`."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        state = self._state(key, len(data))
        if state:
            return False
        try:
            if self._acl is None:
                self._client.put_object(Bucket=self.config.bucket, Key=key, Body=data)
            else:
                self._client.put_object(
                    Bucket=self.config.bucket, Key=key, Body=data, ACL=self._acl
                )
        except (ClientError, BotoCoreError) as error:
            raise self._failure("PUT", key, error) from error
        return self._note_rewrite(name, state)

    def upload_file(self, path: Path, name: str, size: int) -> bool:
        """Upload a staged file as ``name`` (multipart when large); True if new."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        state = self._state(key, size)
        if state:
            return False
        try:
            self._client.upload_file(
                str(path),
                self.config.bucket,
                key,
                ExtraArgs={"ACL": self._acl} if self._acl is not None else None,
            )
        except (ClientError, BotoCoreError, S3UploadFailedError) as error:
            raise self._failure("upload", key, error) from error
        return self._note_rewrite(name, state)

    def open_writer(self) -> S3ObjectWriter:
        """See :meth:`ObjectStore.open_writer`."""
        return S3ObjectWriter(self)

    def exists(self, name: str) -> bool:
        """See :meth:`ObjectStore.exists`."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return False
            raise self._failure("HEAD", key, error) from error
        except BotoCoreError as error:
            raise self._failure("HEAD", key, error) from error
        return True

    def read(self, name: str) -> bytes:
        """See :meth:`ObjectStore.read`."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        try:
            response = self._client.get_object(Bucket=self.config.bucket, Key=key)
            return response["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise self._failure("GET", key, error) from error

    def delete(self, name: str) -> None:
        """See :meth:`ObjectStore.delete`."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        try:
            self._client.delete_object(Bucket=self.config.bucket, Key=key)
        except (ClientError, BotoCoreError) as error:
            raise self._failure("DELETE", key, error) from error

    def verify(self, name: str) -> bool:
        """Download anonymously and hash; False if refused, missing or not matching."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key_of(name)
        hasher = _hasher_for(name)
        try:
            response = self._anonymous.get_object(Bucket=self.config.bucket, Key=key)
            for piece in response["Body"].iter_chunks(_READ_PIECE):
                hasher.update(piece)
        except ClientError:
            return False
        except BotoCoreError as error:
            raise self._failure("anonymous GET", key, error) from error
        return hasher.checksum() == checksum_of_object(name)

    def flush(self) -> None:
        """Nothing to do: a PUT is durable when it returns."""

    def close(self) -> None:
        """Close the HTTP connections of both clients."""
        self._client.close()
        self._anonymous.close()


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
