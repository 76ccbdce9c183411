"""Inbox mode of an S3 source: objects leave the bucket once they are live."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from cvmfs_syncd.config import S3Config
from cvmfs_syncd.errors import SourceError
from cvmfs_syncd.model import Op, OpKind
from cvmfs_syncd.sources.s3_client import CHANGED, MISSING, describe, error_code, s3_errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)


class InboxCleaner:
    """Deletes published objects, and then the ready markers left alone, from the bucket.

    ``client`` returns the source's S3 client; ``known_etag`` the ETag of a key in the
    source's latest listing (None if it is not listed).
    """

    def __init__(
        self,
        config: S3Config,
        full_prefix: str,
        client: Callable[[], S3Client],
        known_etag: Callable[[str], str | None],
    ) -> None:
        self.config = config
        self.full_prefix = full_prefix
        self._client = client
        self._known_etag = known_etag

    def published(self, ops: Sequence[Op]) -> None:
        """Delete each published object (if still that version) and the ready markers of
        the directories published."""
        tops: set[str] = set()
        for op in ops:
            kinds = (OpKind.COPY_FILE, OpKind.GRAFT, OpKind.INGEST)
            if op.kind not in kinds or op.fingerprint is None:
                continue
            if self.delete_object(op.source_path, op.fingerprint.etag):
                rel = op.source_path[len(self.full_prefix) :]
                top, sep, _ = rel.partition("/")
                if sep:
                    tops.add(top)
        marker = self.config.ready_marker
        if marker:
            for top in sorted(tops):
                self._delete_marker_if_alone(top, marker)

    def _delete_marker_if_alone(self, top: str, marker: str) -> None:
        """Delete ``top``'s ready marker once nothing but it (and folder markers) is left.

        An object of the directory that could not be published yet keeps the marker, so
        it goes live later instead of waiting for a marker that will never come back; the
        marker is deleted only in the version that was listed (a new drop's marker stays).
        """
        prefix = f"{self.full_prefix}{top}/"
        key = prefix + marker
        try:
            pages = (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.config.bucket, Prefix=prefix)
            )
            others = any(
                item["Key"] != key and not item["Key"].endswith("/")
                for page in pages
                for item in page.get("Contents", [])
            )
        except s3_errors(SourceError) as exc:
            log.warning("could not list before deleting a marker", key=repr(key), error=str(exc))
            return
        if others:
            return
        self.delete_object(key, self._known_etag(key))

    def delete_object(self, key: str, etag: str | None) -> bool:
        """Delete ``key`` if it still has ``etag`` (any version when None); True if gone.

        S3 has no conditional delete everywhere, so the ETag is checked just before: a
        newer upload in between is the remaining (small) window.
        """
        from botocore.exceptions import ClientError

        try:
            client = self._client()
            if etag is not None:
                client.head_object(Bucket=self.config.bucket, Key=key, IfMatch=etag)
            client.delete_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            code = error_code(exc)
            if code in MISSING:
                return True
            if code not in CHANGED:
                log.warning("could not delete an S3 object", key=repr(key), error=describe(exc))
            return False
        except s3_errors(SourceError) as exc:
            log.warning("could not delete an S3 object", key=repr(key), error=describe(exc))
            return False
        return True
