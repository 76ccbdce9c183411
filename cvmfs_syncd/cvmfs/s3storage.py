"""Data objects in an S3 bucket, as a repository with ``S3`` upstream storage keeps them.

:class:`S3Config` reads the repository's S3 configuration file; :class:`S3ObjectStore`
implements :class:`~cvmfs_syncd.cvmfs.objects.ObjectStore` under ``<prefix>/data/…`` in
the bucket.  Objects are written with the configured ACL (``public-read`` unless the
configuration says otherwise), and whether clients can read them is checked the way
clients read them: anonymously.  boto3 is imported only when a store is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, cast

import structlog

from cvmfs_syncd.cvmfs.objects import READ_PIECE, StagedFile, checksum_of_object, object_hasher
from cvmfs_syncd.cvmfs.repo import parse_shell_assignments
from cvmfs_syncd.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import ObjectCannedACLType

log = structlog.get_logger(__name__)


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
        self._staged = StagedFile(store.spool_dir)

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
        hasher = object_hasher(name)
        try:
            response = self._anonymous.get_object(Bucket=self.config.bucket, Key=key)
            for piece in response["Body"].iter_chunks(READ_PIECE):
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
