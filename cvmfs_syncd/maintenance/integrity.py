"""What a check with ``check_integrity`` verified of the object contents (faults.md F3).

``cvmfs_server check -i`` re-hashes every object only on local storage. On S3 (and
through a gateway) it prints "Storage integrity check only works locally. skipping.",
runs the plain check and says "no problems found": that is not a verified storage.
:func:`integrity_skipped` recognises the skip from the output; on S3 the daemon then
verifies a sample itself (:func:`sample_s3`): it lists ``<prefix>/data/`` keys after a
cursor and downloads each the way clients do (anonymously) and hashes it
(:meth:`~cvmfs_syncd.cvmfs.s3storage.S3ObjectStore.verify`), at most SAMPLE_OBJECTS per
check and SAMPLE_RATE per second. The next check resumes after the last key verified;
the cursor is kept in the state database as the maintenance record of the pseudo task
``integrity`` (its message is the key), so that it survives restarts. The sample covers
objects in the bucket, referenced by a catalog or not: finding unreferenced objects is
gc's business, finding missing referenced ones the plain check's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from cvmfs_syncd.cvmfs.objects import OBJECT_NAME_PATTERN
from cvmfs_syncd.cvmfs.s3storage import S3ObjectStore
from cvmfs_syncd.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Objects verified by one check (a GET of each: bounded cost per check).
SAMPLE_OBJECTS: Final = 1000
#: Objects verified per second at most.
SAMPLE_RATE: Final = 20.0
#: The pseudo task whose maintenance record holds the cursor.
CURSOR_TASK: Final = "integrity"
SKIP_LINE: Final = "Storage integrity check only works locally"

Result = Literal["verified", "not_checked", "problems"]
RESULTS: Final[tuple[Result, ...]] = ("verified", "not_checked", "problems")


def integrity_skipped(stdout: str, stderr: str) -> bool:
    """Return whether ``check -i`` said it skipped the storage integrity check. Pure."""
    return SKIP_LINE in stdout or SKIP_LINE in stderr


@dataclass(frozen=True)
class SampleReport:
    """One sampled pass: objects verified, those that failed, and where the next starts
    (``""``: the listing ended, the next pass starts from the first key again)."""

    checked: int
    bad: tuple[str, ...]
    cursor: str


def _listing_client(store: S3ObjectStore) -> S3Client:
    import boto3
    from botocore.config import Config

    config = store.config
    style: Literal["virtual", "path"] = "virtual" if config.dns_buckets else "path"
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint_url,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        region_name=config.region,
        config=Config(retries={"mode": "standard"}, s3={"addressing_style": style}),
    )
    return client


def sample_s3(
    store: S3ObjectStore,
    cursor: str,
    *,
    count: int = SAMPLE_OBJECTS,
    rate: float = SAMPLE_RATE,
    sleep: Callable[[float], None] = time.sleep,
) -> SampleReport:
    """Verify up to ``count`` objects of ``store`` whose keys follow ``cursor``.

    ``rate`` > 0 paces the downloads (``sleep`` waits). Raise :class:`StorageError`
    when the bucket cannot be listed or an object cannot be fetched for a reason other
    than the object itself (a connection error).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    base = f"{store.prefix}/" if store.prefix else ""
    client = _listing_client(store)
    checked = 0
    bad: list[str] = []
    last = cursor
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    try:
        token: str | None = None
        while checked < count:
            bucket, prefix, limit = store.config.bucket, base + "data/", min(1000, count - checked)
            try:
                if token is not None:
                    page = client.list_objects_v2(
                        Bucket=bucket, Prefix=prefix, ContinuationToken=token, MaxKeys=limit
                    )
                elif last:
                    page = client.list_objects_v2(
                        Bucket=bucket, Prefix=prefix, StartAfter=last, MaxKeys=limit
                    )
                else:
                    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
            except (ClientError, BotoCoreError) as error:
                raise StorageError(
                    f"cannot list {store.config.bucket}/{base}data/: {type(error).__name__}"
                ) from error
            for entry in page.get("Contents", []):
                key = entry["Key"]
                name = key[len(base) :]
                last = key
                if OBJECT_NAME_PATTERN.fullmatch(name) is None:
                    continue
                wait = next_at - time.monotonic()
                if wait > 0:
                    sleep(wait)
                next_at = max(next_at, time.monotonic()) + interval
                checked += 1
                if not store.verify(name):
                    bad.append(name)
                if checked >= count:
                    return SampleReport(checked, tuple(bad), last)
            if not page.get("IsTruncated"):
                return SampleReport(checked, tuple(bad), "")
            token = page.get("NextContinuationToken")
    finally:
        client.close()
    return SampleReport(checked, tuple(bad), last)
