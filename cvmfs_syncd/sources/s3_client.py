"""S3 clients of the S3 sources: construction, credential reloads, errors, GetObject.

Everything here speaks boto3; :mod:`cvmfs_syncd.sources.s3` decides what to do with the
answers.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import SourceError
from cvmfs_syncd.model import S3_FILE_MODE, Fingerprint, Op
from cvmfs_syncd.planner import Applied, ApplyOutcome

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

#: Bytes per read of a downloaded object.
READ_PIECE = 1 << 20

MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
CHANGED = frozenset({"PreconditionFailed", "412"})
REFUSED = frozenset({"AccessDenied", "403", "InvalidObjectState"})

ClientFactory = Callable[[S3Config], "S3Client"]


def make_client(config: S3Config) -> S3Client:
    """Return an S3 client for a source; raise SourceError if it cannot be configured.

    With ``credentials_file`` the keys come from that AWS shared-credentials file (profile
    ``profile``), set on this client's own botocore session rather than through
    ``os.environ``, and an explicit profile keeps ``AWS_ACCESS_KEY_ID`` & co. from
    overriding it; without it boto3's standard chain applies. Custom endpoints (MinIO)
    get path-style addressing.
    """
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError

    core = botocore.session.get_session()
    explicit = config.credentials_file is not None or config.profile != "default"
    if config.credentials_file is not None:
        core.set_config_variable("credentials_file", os.fspath(config.credentials_file))
    try:
        session = boto3.session.Session(
            botocore_session=core, profile_name=config.profile if explicit else None
        )
        client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            region_name=config.region or None,
            config=BotoConfig(
                connect_timeout=5,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path"} if config.endpoint_url else {},
            ),
        )
    except BotoCoreError as exc:
        raise SourceError(f"cannot configure the S3 client: {exc}") from exc
    return client


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    """Say what went wrong without anything a request carried (no credentials, no URLs
    with signatures): the error code and HTTP status, or botocore's own sentence."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error_code(exc)}" + (f" (HTTP {status})" if status else "")
    return str(exc)[:300] or type(exc).__name__


def s3_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exceptions a boto3 call raises when S3 cannot be used (plus ``extra``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, OSError, *extra)


class ClientCache:
    """The S3 client of one source, rebuilt when its credentials file changes on disk."""

    def __init__(self, config: S3Config, factory: ClientFactory) -> None:
        self._config = config
        self._factory = factory
        self._lock = threading.Lock()  # guards the fields below
        self._client: S3Client | None = None
        self._signature: object = None
        self._retired: list[S3Client] = []

    def get(self) -> S3Client:
        """Return the client, rebuilt when the credentials file changed on disk."""
        signature = self._credentials_signature()
        with self._lock:
            if self._client is not None and signature == self._signature:
                return self._client
            old = self._client
        fresh = self._factory(self._config)
        with self._lock:
            if old is not None:
                # The lane may be downloading with the old client right now: close it later.
                self._retired.append(old)
            self._client, self._signature = fresh, signature
        return fresh

    def close(self) -> None:
        """Close the current client and every one it replaced."""
        with self._lock:
            clients = [*self._retired, *([self._client] if self._client else [])]
            self._client, self._retired = None, []
        for client in clients:
            client.close()

    def _credentials_signature(self) -> object:
        path = self._config.credentials_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError as exc:
            return ("missing", exc.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns)


def open_object(
    client: S3Client, bucket: str, key: str, fp: Fingerprint
) -> StreamingBody | Applied:
    """GET exactly the version ``fp`` of ``key``; an Applied says why not.

    Raises OSError when S3 fails.
    """
    from botocore.exceptions import ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key, IfMatch=fp.etag)
    except ClientError as exc:
        code = error_code(exc)
        if code in MISSING:
            return Applied(ApplyOutcome.VANISHED)
        if code in CHANGED:
            return Applied(ApplyOutcome.CHANGED)
        if code in REFUSED:
            return Applied(ApplyOutcome.REFUSED, f"S3 GET refused: {describe(exc)}")
        raise OSError(errno.EIO, f"S3 GET of {key!r} failed: {describe(exc)}") from exc
    except s3_errors() as exc:
        raise OSError(errno.EIO, f"S3 GET of {key!r} failed: {describe(exc)}") from exc
    body = response["Body"]
    if response.get("ContentLength") != fp.size:
        body.close()
        return Applied(ApplyOutcome.CHANGED)
    return body


class Reader:
    """A file-like view of a GetObject body for the graft engine: errors become OSError
    (which the engine reports as an unreadable input)."""

    def __init__(self, body: StreamingBody, key: str) -> None:
        self._body = body
        self._key = key

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self._body.read(size if size >= 0 else None))
        except s3_errors() as exc:
            raise OSError(errno.EIO, f"reading {self._key!r} from S3: {describe(exc)}") from exc


def pieces(body: StreamingBody, key: str) -> Iterator[bytes]:
    """The bytes of ``body`` in pieces of :data:`READ_PIECE`."""
    reader = Reader(body, key)
    while piece := reader.read(READ_PIECE):
        yield piece


class S3Content:
    """An object body opened for preparing (pinned to its ETag by ``If-Match``).

    ``trouble`` hears of a failed read, ``downloaded`` of an object that changed.
    """

    def __init__(
        self,
        body: StreamingBody,
        op: Op,
        fp: Fingerprint,
        trouble: Callable[[str], None],
        downloaded: Callable[[Applied], None],
    ) -> None:
        self._body = body
        self._trouble = trouble
        self._downloaded = downloaded
        self._reader = Reader(body, op.source_path)
        self._size = fp.size
        self.mode = S3_FILE_MODE
        self.mtime_ns = fp.mtime_ns

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._reader.read(size)
        except OSError as exc:
            self._trouble(str(exc))
            raise

    def unchanged(self, size: int) -> bool:
        complete = size == self._size
        if not complete:
            self._downloaded(Applied(ApplyOutcome.CHANGED))
        return complete

    def close(self) -> None:
        self._body.close()
