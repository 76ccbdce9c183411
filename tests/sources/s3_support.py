"""Helpers for the S3 source tests: moto servers, buckets, credentials, configurations, and
an in-memory client for listing-level tests that need no HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from moto.server import ThreadedMotoServer

from tests.support import config_head

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ADMIN_KEY = "s3-source-admin"
ADMIN_SECRET = "s3-source-admin-secret"  # noqa: S105 (a credential for the local moto server)


class Moto:
    """A moto S3 server over real HTTP on 127.0.0.1; can be stopped and started again on
    the same port (its data lives in the process, so it survives a restart)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None
        self.start()

    def start(self) -> None:
        """Start serving (on the previous port after a stop)."""
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = int(server.get_host_and_port()[1])
        self._server = server

    def stop(self) -> None:
        """Stop serving: connections are refused until :meth:`start`."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    @property
    def url(self) -> str:
        """The endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = ADMIN_KEY, secret: str = ADMIN_SECRET) -> S3Client:
        """A signed path-style client (close it after use)."""
        client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}),
        )
        return client

    def iam(self) -> Any:
        """An IAM client on the same server (close it after use)."""
        return boto3.session.Session().client(
            "iam",
            endpoint_url=self.url,
            aws_access_key_id=ADMIN_KEY,
            aws_secret_access_key=ADMIN_SECRET,
            region_name="us-east-1",
        )


class Bucket:
    """A fresh bucket on a moto server, with helpers to upload and inspect it."""

    def __init__(self, moto: Moto) -> None:
        self.name = f"ci-{uuid.uuid4().hex[:12]}"
        self.client = moto.client()
        self.client.create_bucket(Bucket=self.name)

    def put(self, key: str, data: bytes) -> str:
        """Upload ``data`` as ``key``; return its ETag."""
        return self.client.put_object(Bucket=self.name, Key=key, Body=data)["ETag"]

    def delete(self, key: str) -> None:
        """Delete ``key``."""
        self.client.delete_object(Bucket=self.name, Key=key)

    def keys(self) -> set[str]:
        """Every key in the bucket."""
        found: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            found.update(item["Key"] for item in page.get("Contents", []))
        return found

    def last_modified(self, key: str) -> datetime:
        """The LastModified of ``key`` as a listing reports it."""
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=key)
        return next(item["LastModified"] for item in listing["Contents"] if item["Key"] == key)

    def close(self) -> None:
        """Empty and remove the bucket; close the client."""
        with contextlib.suppress(ClientError):
            for key in self.keys():
                self.delete(key)
            self.client.delete_bucket(Bucket=self.name)
        self.client.close()


def grant_iam_user(moto: Moto, user: str) -> tuple[str, str]:
    """Create an IAM user allowed every S3 action; return its (key id, secret)."""
    iam = moto.iam()
    try:
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    finally:
        iam.close()
    return key["AccessKeyId"], key["SecretAccessKey"]


def write_credentials(
    path: Path, key: str = ADMIN_KEY, secret: str = ADMIN_SECRET, profile: str = "default"
) -> Path:
    """Write an AWS shared-credentials file readable by its owner only."""
    path.write_text(
        f"[{profile}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def write_s3_config(
    path: Path,
    *,
    state_dir: Path,
    server_command: Path | str,
    config_dir: Path,
    repo: str,
    endpoint: str,
    bucket: str,
    credentials_file: Path,
    prefix: str = "builds/",
    target: str = "/ci",
    metrics_address: str = "127.0.0.1:0",
    s3_extra: str = "",
    repo_extra: str = "",
) -> Path:
    """Write a daemon configuration whose repository has one S3 source (no staging)."""
    head = config_head(
        state_dir=state_dir,
        server_command=server_command,
        config_dir=config_dir,
        repo=repo,
        metrics_address=metrics_address,
        repo_extra=repo_extra,
    )
    path.write_text(
        head
        + f"""
  [[repository.s3]]
  endpoint_url = "{endpoint}"
  region = "us-east-1"
  bucket = "{bucket}"
  prefix = "{prefix}"
  target = "{target}"
  credentials_file = "{credentials_file}"
  poll_seconds = 1
{s3_extra}
""",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- in-memory S3


_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class _Paginator:
    def __init__(self, fake: FakeS3) -> None:
        self.fake = fake

    def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Yield pages of the keys under ``Prefix`` in key order, like ListObjectsV2."""
        self.fake.listings += 1
        if self.fake.failure is not None:
            raise self.fake.failure
        prefix = kwargs.get("Prefix", "")
        size = kwargs.get("PaginationConfig", {}).get("PageSize", 1000)
        keys = sorted(k for k in self.fake.objects if k.startswith(prefix))
        for start in range(0, max(len(keys), 1), size):
            contents = [
                {
                    "Key": key,
                    "Size": len(self.fake.objects[key][0]),
                    "ETag": self.fake.objects[key][1],
                    "LastModified": self.fake.objects[key][2],
                }
                for key in keys[start : start + size]
            ]
            yield {"Contents": contents} if contents else {}


class FakeS3:
    """An in-memory stand-in for the few client calls the source makes when listing.

    ``failure``, when set, is raised by every listing and download; ``listings`` counts
    the listings.
    """

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str, datetime]] = {}
        self.failure: Exception | None = None
        self.listings = 0
        self.closed = False
        self._clock = 0

    def put(self, key: str, data: bytes) -> None:
        """Store ``key`` with an MD5 ETag and a LastModified one second after the last."""
        self._clock += 1
        etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        self.objects[key] = (data, etag, _EPOCH + timedelta(seconds=self._clock))

    def get_paginator(self, name: str) -> _Paginator:
        """Only ``list_objects_v2`` is supported."""
        assert name == "list_objects_v2"
        return _Paginator(self)

    def get_object(self, *, Bucket: str, Key: str, IfMatch: str = "") -> dict[str, Any]:
        """Return the object like GetObject; 404 and 412 as ClientError."""
        del Bucket
        if self.failure is not None:
            raise self.failure
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        data, etag, _ = self.objects[Key]
        if IfMatch and IfMatch != etag:
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "GetObject")
        return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}

    def close(self) -> None:
        """Record that the source closed its client."""
        self.closed = True
