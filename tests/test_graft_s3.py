"""Grafting a staged file into an S3-backed repository's bucket (moto over real HTTP)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

from cvmfs_syncd import fsops
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.grafting import RepositoryGrafter
from cvmfs_syncd.model import Fingerprint, Op, OpKind
from cvmfs_syncd.planner import ApplyOutcome

REPO = "s3graft.example.org"
BUCKET = "cvmfs"
KEY_ID = "graft-test-key"
SECRET = "graft-test-secret"  # noqa: S105 (a credential for the local moto server)


@pytest.fixture
def layout(moto_endpoint: tuple[str, int], tmp_path: Path) -> RepositoryLayout:
    """An S3 repository layout whose server.conf names an S3 config pointing at moto."""
    host, port = moto_endpoint
    conf = tmp_path / f"{REPO}.s3.conf"
    conf.write_text(
        f"CVMFS_S3_HOST={host}\nCVMFS_S3_PORT={port}\nCVMFS_S3_BUCKET={BUCKET}\n"
        f"CVMFS_S3_ACCESS_KEY={KEY_ID}\nCVMFS_S3_SECRET_KEY={SECRET}\n"
        "CVMFS_S3_DNS_BUCKETS=false\nCVMFS_S3_USE_HTTPS=false\n"
    )
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    settings = {
        "CVMFS_COMPRESSION_ALGORITHM": "default",
        "CVMFS_HASH_ALGORITHM": "sha1",
        "CVMFS_USE_FILE_CHUNKING": "true",
        "CVMFS_MAX_CHUNK_SIZE": str(1024 * 1024),
    }
    return RepositoryLayout(
        name=REPO,
        union_dir=tmp_path / "union",
        spool_dir=tmp_path / "spool",
        stratum0=f"http://{host}:{port}/{BUCKET}/{REPO}",
        upstream_storage=f"S3,{tmp_path / 'spool' / 'tmp'},{REPO}@{conf}",
        settings=settings,
    )


def _anonymous(moto_endpoint: tuple[str, int]) -> object:
    host, port = moto_endpoint
    return boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        config=BotoConfig(signature_version=UNSIGNED),
        region_name="us-east-1",
    )


def test_grafted_objects_land_in_the_bucket_readable_by_clients(
    layout: RepositoryLayout, moto_endpoint: tuple[str, int], tmp_path: Path
) -> None:
    """Every chunk is uploaded as <repo>/data/xx/<38 hex>P, anonymously readable, decodable."""
    staging = tmp_path / "staging"
    staging.mkdir()
    data = os.urandom(2 * 1024 * 1024 + 999)
    (staging / "big.bin").write_bytes(data)
    (tmp_path / "union").mkdir()
    fp = fsops.stat_entry(staging, "big.bin")
    assert isinstance(fp, Fingerprint)
    grafter = RepositoryGrafter(layout)
    op = Op(OpKind.GRAFT, "sw/big.bin", "s", "big.bin", fp)
    applied = grafter.graft_staged(staging, op, tmp_path / "union", 1)
    assert applied.outcome is ApplyOutcome.APPLIED
    graft_text = (tmp_path / "union" / "sw" / ".cvmfsgraft-big.bin").read_text()
    fields = dict(line.split("=", 1) for line in graft_text.splitlines())
    assert fields["compression"] == "zlib"
    assert (tmp_path / "union" / "sw" / "big.bin").stat().st_size == 0
    offsets = [int(x) for x in fields["chunk_offsets"].split(",")]
    hashes = fields["chunk_checksums"].split(",")
    client = _anonymous(moto_endpoint)
    rebuilt = b""
    for offset, digest in zip(offsets, hashes, strict=True):
        key = f"{REPO}/data/{digest[:2]}/{digest[2:]}P"
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
        assert hashlib.sha1(body).hexdigest() == digest  # noqa: S324 (CVMFS content hash)
        piece = zlib.decompress(body)
        assert offset == len(rebuilt)
        rebuilt += piece
    assert rebuilt == data
    assert len(applied.created_objects) == len(hashes)
    grafter.delete_objects(applied.created_objects)
    for name in applied.created_objects:
        with pytest.raises(Exception, match=r"404|Not Found|NoSuchKey"):
            client.head_object(Bucket=BUCKET, Key=f"{REPO}/{name}")  # type: ignore[attr-defined]
