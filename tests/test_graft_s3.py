"""Preparing staged files into an S3-backed repository's bucket (moto over real HTTP)."""

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
from cvmfs_syncd.config import StagingConfig
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Fingerprint, Op, OpKind
from cvmfs_syncd.pipeline.prepare import Preparer
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.state import State

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
        "CVMFS_MIN_CHUNK_SIZE": str(512 * 1024),
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


def test_prepared_objects_land_in_the_bucket_readable_by_clients(
    layout: RepositoryLayout, moto_endpoint: tuple[str, int], tmp_path: Path
) -> None:
    """Every chunk of a large file is uploaded as <repo>/data/xx/<38 hex>P, a small file as
    one object, all anonymously readable and decodable; deleting them removes them."""
    staging = tmp_path / "staging"
    staging.mkdir()
    data = os.urandom(2 * 1024 * 1024 + 999)
    (staging / "big.bin").write_bytes(data)
    state = State(tmp_path / "state")
    fp = fsops.stat_entry(staging, "big.bin")
    assert isinstance(fp, Fingerprint)
    (staging / "small.txt").write_bytes(b"small file\n" * 10)
    small = fsops.stat_entry(staging, "small.txt")
    assert isinstance(small, Fingerprint)
    source = StagingInput(REPO, StagingConfig(path=staging), state, Metrics())
    preparer = Preparer(layout, state=state)
    op = Op(OpKind.GRAFT, "sw/big.bin", source.name, "big.bin", fp)
    small_op = Op(OpKind.GRAFT, "sw/small.txt", source.name, "small.txt", small)
    prepared = preparer.prepare(1, [op, small_op], source.open_content)
    assert prepared.failed == [] and prepared.fallback == []
    assert sorted(state.created_objects(1)) == sorted(prepared.created)
    fields = dict(line.split("=", 1) for line in prepared.prepared["sw/big.bin"].graft.splitlines())
    assert fields["compression"] == "zlib"
    small_fields = dict(
        line.split("=", 1) for line in prepared.prepared["sw/small.txt"].graft.splitlines()
    )
    assert "chunk_offsets" not in small_fields
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
    digest = small_fields["checksum"]
    body = client.get_object(Bucket=BUCKET, Key=f"{REPO}/data/{digest[:2]}/{digest[2:]}")["Body"]  # type: ignore[attr-defined]
    assert zlib.decompress(body.read()) == b"small file\n" * 10
    assert len(prepared.created) == len(hashes) + 1
    preparer.delete_objects(prepared.created)
    preparer.close()
    for name in prepared.created:
        with pytest.raises(Exception, match=r"404|Not Found|NoSuchKey"):
            client.head_object(Bucket=BUCKET, Key=f"{REPO}/{name}")  # type: ignore[attr-defined]
