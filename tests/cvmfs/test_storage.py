"""Object storage: local directories and S3 (moto's HTTP server), and the recording sink."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import stat
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config

from cvmfs_syncd.cvmfs.graft import GraftOptions, graft_stream
from cvmfs_syncd.cvmfs.objects import ObjectStore, checksum_of_object
from cvmfs_syncd.cvmfs.s3storage import S3Config, S3ObjectStore
from cvmfs_syncd.cvmfs.storage import LocalObjectStore, RecordingSink, open_storage
from cvmfs_syncd.errors import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "syncd-test-access"
SECRET_KEY = "syncd-test-secret-do-not-print"  # noqa: S105 - a fake credential for moto
BUCKET = "refs3"
REPOSITORY = "refs3.local"


def name_for(data: bytes, suffix: str = "") -> str:
    """Return the object name of raw ``data`` (SHA-1) with an optional ``P``-like suffix."""
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    return f"data/{digest[:2]}/{digest[2:]}{suffix}"


# --------------------------------------------------------------------------- local


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    """A local storage directory laid out like ``/srv/cvmfs/<repo>`` (data/, data/txn/)."""
    root = tmp_path / "srv" / "ref.local"
    (root / "data" / "txn").mkdir(parents=True)
    return root


@pytest.fixture
def local_store(storage_root: Path) -> LocalObjectStore:
    """A store on ``storage_root``."""
    return LocalObjectStore(storage_root)


def test_local_put_writes_a_world_readable_object_atomically(
    local_store: LocalObjectStore, storage_root: Path
) -> None:
    """put() creates data/ab/cdef… with mode 0644 (whatever the umask) and no leftovers."""
    data = b"hello\n"
    name = name_for(data)
    previous = os.umask(0o077)
    try:
        assert local_store.put(name, data) is True
    finally:
        os.umask(previous)
    path = storage_root / name
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert list((storage_root / "data" / "txn").iterdir()) == []
    assert local_store.exists(name)
    assert local_store.verify(name)
    assert local_store.read(name) == data


def test_local_put_reuses_a_usable_object(local_store: LocalObjectStore) -> None:
    """A second put of the same object reports that it existed and leaves it alone."""
    data = b"same bytes"
    name = name_for(data)
    assert local_store.put(name, data) is True
    before = (local_store.root / name).stat().st_mtime_ns
    assert local_store.put(name, data) is False
    assert (local_store.root / name).stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["unreadable", "truncated"])
def test_local_put_rewrites_an_unusable_object(local_store: LocalObjectStore, damage: str) -> None:
    """An existing object clients cannot use is rewritten but still counts as existing."""
    data = b"important content"
    name = name_for(data)
    path = local_store.root / name
    path.parent.mkdir(exist_ok=True)
    if damage == "unreadable":
        path.write_bytes(data)
        path.chmod(0o600)
    else:
        path.write_bytes(data[:3])
    assert local_store.verify(name) is False
    assert local_store.put(name, data) is False
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert local_store.verify(name)


def test_local_writer_commits_and_discards(local_store: LocalObjectStore) -> None:
    """A writer's bytes appear under the committed name; a discarded writer leaves nothing."""
    writer = local_store.open_writer()
    for piece in (b"abc", b"def"):
        writer.write(piece)
    assert writer.commit(name_for(b"abcdef", "P")) is True
    writer.discard()  # harmless after commit
    assert local_store.read(name_for(b"abcdef", "P")) == b"abcdef"
    dropped = local_store.open_writer()
    dropped.write(b"never stored")
    dropped.discard()
    assert list((local_store.root / "data" / "txn").iterdir()) == []
    with pytest.raises(StorageError, match="already finished"):
        dropped.write(b"more")


def test_local_verify_detects_corruption(local_store: LocalObjectStore) -> None:
    """verify() is False for a missing object or one whose bytes do not match its name."""
    name = name_for(b"original")
    assert local_store.verify(name) is False
    local_store.put(name, b"original")
    (local_store.root / name).write_bytes(b"tampered")
    assert local_store.verify(name) is False


def test_local_delete_and_missing_read(local_store: LocalObjectStore) -> None:
    """delete() removes an object and tolerates a missing one; reading it then fails."""
    name = name_for(b"x")
    local_store.put(name, b"x")
    local_store.delete(name)
    local_store.delete(name)
    assert not local_store.exists(name)
    with pytest.raises(StorageError, match="cannot read"):
        local_store.read(name)


@pytest.mark.parametrize(
    "name",
    [
        "data/ab/cd",
        "data/txn/x",
        "../etc/passwd",
        "data/AB/" + "c" * 38,
        "data/ab/" + "c" * 38 + "-md5",
    ],
)
def test_object_names_are_validated(local_store: LocalObjectStore, name: str) -> None:
    """Names that are not content-addressed object paths are refused."""
    with pytest.raises(StorageError, match="not a data object name"):
        local_store.put(name, b"")


def test_checksum_of_object_strips_kind_suffixes() -> None:
    """The checksum keeps the algorithm suffix and drops the P/C/… kind letter."""
    tail = "c" * 38
    assert checksum_of_object(f"data/ab/{tail}") == "ab" + tail
    assert checksum_of_object(f"data/ab/{tail}-rmd160P") == "ab" + tail + "-rmd160"
    assert checksum_of_object(f"data/ab/{tail}-shake128C") == "ab" + tail + "-shake128"


def test_local_store_needs_a_data_directory(tmp_path: Path) -> None:
    """A directory without data/ is not accepted as a repository storage."""
    with pytest.raises(StorageError, match="has no data/"):
        LocalObjectStore(tmp_path)


def test_open_storage_parses_local_upstream(storage_root: Path) -> None:
    """``local,<txn>,<root>`` opens a local store on the root."""
    store = open_storage(f"local,{storage_root}/data/txn,{storage_root}", "ref.local")
    assert isinstance(store, LocalObjectStore)
    assert store.root == storage_root


@pytest.mark.parametrize(
    "upstream", ["gw,/tmp,http://gateway:4929/api/v1", "local,/only-two", "S3,/tmp,no-config-part"]
)
def test_open_storage_rejects_other_values(upstream: str) -> None:
    """Unsupported types and malformed values raise StorageError naming the repository."""
    with pytest.raises(StorageError, match=r"^ref\.local: "):
        open_storage(upstream, "ref.local")


def test_recording_sink_records_created_and_reused(local_store: LocalObjectStore) -> None:
    """Grafting through the sink stores every object, verified; a repeat creates nothing."""
    data = random.Random(7).randbytes(300_000)
    options = GraftOptions(compression="zlib", chunk_size=64 * 1024, bulk_hash=True)
    sink = RecordingSink(local_store)
    result = graft_stream(io.BytesIO(data), options, sink, workers=2)
    assert set(sink.created) == set(result.object_names())
    assert sink.reused == ()
    chunks = [zlib.decompress(local_store.read(name)) for name in result.object_names()[:-1]]
    assert b"".join(chunks) == data
    again = RecordingSink(local_store)
    assert graft_stream(io.BytesIO(data), options, again) == result
    assert again.created == ()
    assert set(again.reused) == set(result.object_names())


def test_recording_sink_streams_large_objects(local_store: LocalObjectStore) -> None:
    """Unchunked grafts (chunk size 0) are streamed through a writer into the store."""
    data = bytes(3 * 1024 * 1024) + b"end"
    sink = RecordingSink(local_store)
    result = graft_stream(io.BytesIO(data), GraftOptions(chunk_size=0), sink)
    assert sink.created == result.object_names()
    assert local_store.read(sink.created[0]) == data


def test_recording_sink_fails_on_verification(
    local_store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object that does not verify raises StorageError but stays recorded for cleanup."""
    monkeypatch.setattr(local_store, "verify", lambda _name: False)
    sink = RecordingSink(local_store)
    with pytest.raises(StorageError, match="failed verification"):
        sink.put(name_for(b"bad"), b"bad")
    assert sink.created == (name_for(b"bad"),)


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3_config_file(moto_endpoint: tuple[str, int], tmp_path: Path) -> Path:
    """An S3 config file like ``/etc/cvmfs/<repo>.s3.conf`` pointing at moto."""
    host, port = moto_endpoint
    path = tmp_path / "refs3.local.s3.conf"
    path.write_text(
        f"CVMFS_S3_HOST={host}\nCVMFS_S3_PORT={port}\nCVMFS_S3_BUCKET={BUCKET}\n"
        f"CVMFS_S3_ACCESS_KEY={ACCESS_KEY}\nCVMFS_S3_SECRET_KEY={SECRET_KEY}\n"
        "CVMFS_S3_DNS_BUCKETS=false\nCVMFS_S3_USE_HTTPS=false\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def admin_client(moto_endpoint: tuple[str, int]) -> Iterator[S3Client]:
    """A signed client for setting up and inspecting the bucket (fresh bucket per test)."""
    host, port = moto_endpoint
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        listing = client.list_objects_v2(Bucket=BUCKET)
        for entry in listing.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=entry["Key"])
        client.delete_bucket(Bucket=BUCKET)
        client.close()


@pytest.fixture
def s3_store(
    s3_config_file: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ObjectStore]:
    """The store ``open_storage`` makes of an S3 upstream value, closed after the test."""
    request.getfixturevalue("admin_client")  # the bucket must exist first
    spool = tmp_path / "spool" / "tmp"
    store = open_storage(f"S3,{spool},{REPOSITORY}@{s3_config_file}", REPOSITORY)
    try:
        yield store
    finally:
        store.close()


def anonymous_get(moto_endpoint: tuple[str, int], key: str) -> tuple[int, bytes]:
    """GET ``key`` over plain HTTP without credentials, as a CernVM-FS client does."""
    host, port = moto_endpoint
    url = f"http://{host}:{port}/{BUCKET}/{key}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        error.close()
        return error.code, b""


def test_s3_config_parsing(tmp_path: Path) -> None:
    """KEY=VALUE lines are read with defaults; credentials never appear in the repr."""
    path = tmp_path / "s3.conf"
    path.write_text(
        "# comment\nCVMFS_S3_HOST=minio.example\nCVMFS_S3_BUCKET=b\n"
        f"CVMFS_S3_ACCESS_KEY={ACCESS_KEY}\nCVMFS_S3_SECRET_KEY='{SECRET_KEY}'\n",
        encoding="utf-8",
    )
    config = S3Config.from_file(path)
    assert (config.host, config.port, config.bucket) == ("minio.example", 80, "b")
    assert config.secret_key == SECRET_KEY
    assert (config.dns_buckets, config.use_https, config.acl) == (True, False, "public-read")
    assert config.endpoint_url == "http://minio.example:80"
    assert SECRET_KEY not in repr(config)
    assert ACCESS_KEY not in repr(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CVMFS_S3_HOST=h\nCVMFS_S3_BUCKET=b\n", "lacks CVMFS_S3_ACCESS_KEY, CVMFS_S3_SECRET_KEY"),
        (
            "CVMFS_S3_HOST=h\nCVMFS_S3_BUCKET=b\nCVMFS_S3_ACCESS_KEY=a\nCVMFS_S3_SECRET_KEY=s\n"
            "CVMFS_S3_PORT=http\n",
            "bad port",
        ),
        (
            "CVMFS_S3_HOST=h\nCVMFS_S3_BUCKET=b\nCVMFS_S3_ACCESS_KEY=a\nCVMFS_S3_SECRET_KEY=s\n"
            "CVMFS_S3_X_AMZ_ACL=everyone\n",
            "unknown CVMFS_S3_X_AMZ_ACL",
        ),
    ],
)
def test_s3_config_errors(tmp_path: Path, text: str, message: str) -> None:
    """Missing keys, bad ports and unknown ACLs raise StorageError."""
    path = tmp_path / "s3.conf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StorageError, match=message):
        S3Config.from_file(path)


def test_s3_put_is_anonymously_readable(
    s3_store: ObjectStore, moto_endpoint: tuple[str, int], admin_client: S3Client
) -> None:
    """put() uploads to <repo>/data/… with a public-read ACL: anonymous GETs succeed."""
    data = b"grafted object\n"
    name = name_for(data)
    assert s3_store.put(name, data) is True
    assert anonymous_get(moto_endpoint, f"{REPOSITORY}/{name}") == (200, data)
    grants = admin_client.get_object_acl(Bucket=BUCKET, Key=f"{REPOSITORY}/{name}")["Grants"]
    assert any(
        grant["Grantee"].get("URI", "").endswith("/global/AllUsers")
        and grant["Permission"] == "READ"
        for grant in grants
    )
    assert s3_store.exists(name)
    assert s3_store.read(name) == data
    assert s3_store.verify(name)
    assert s3_store.put(name, data) is False


def test_s3_private_object_is_rewritten(
    s3_store: ObjectStore, moto_endpoint: tuple[str, int], admin_client: S3Client
) -> None:
    """An existing private object is re-uploaded with the ACL; it still counts as existing."""
    data = b"uploaded without an ACL"
    name = name_for(data, "P")
    key = f"{REPOSITORY}/{name}"
    admin_client.put_object(Bucket=BUCKET, Key=key, Body=data)
    assert anonymous_get(moto_endpoint, key)[0] == 403
    assert s3_store.verify(name) is False
    assert s3_store.put(name, data) is False
    assert anonymous_get(moto_endpoint, key) == (200, data)
    assert s3_store.verify(name)


def test_s3_writer_uploads_large_objects(
    s3_store: ObjectStore, moto_endpoint: tuple[str, int], tmp_path: Path
) -> None:
    """A streamed 20 MiB object goes up as a multipart upload, public and verified."""
    data = random.Random(11).randbytes(20 * 1024 * 1024)
    writer = s3_store.open_writer()
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start : start + (1 << 20)])
    name = name_for(data)
    assert writer.commit(name) is True
    status, body = anonymous_get(moto_endpoint, f"{REPOSITORY}/{name}")
    assert (status, len(body)) == (200, len(data))
    assert body == data
    assert s3_store.verify(name)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_s3_verify_and_delete(s3_store: ObjectStore, admin_client: S3Client) -> None:
    """verify() rejects bytes that do not hash to the name; delete() removes objects."""
    name = name_for(b"expected")
    admin_client.put_object(
        Bucket=BUCKET, Key=f"{REPOSITORY}/{name}", Body=b"other", ACL="public-read"
    )
    assert s3_store.verify(name) is False
    s3_store.delete(name)
    assert not s3_store.exists(name)
    s3_store.delete(name)
    with pytest.raises(StorageError, match="GET"):
        s3_store.read(name)


def test_s3_graft_end_to_end(
    s3_store: ObjectStore, moto_endpoint: tuple[str, int], admin_client: S3Client
) -> None:
    """A chunked zlib graft with bulk hash lands in the bucket, every object public."""
    data = random.Random(12).randbytes(200_000) + bytes(300_000)
    options = GraftOptions(compression="zlib", chunk_size=128 * 1024, bulk_hash=True)
    sink = RecordingSink(s3_store)
    result = graft_stream(io.BytesIO(data), options, sink, workers=2)
    assert set(sink.created) == set(result.object_names())
    keys = {
        entry["Key"] for entry in admin_client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    }
    assert keys == {f"{REPOSITORY}/{name}" for name in result.object_names()}
    pieces = []
    for chunk in result.chunks:
        status, body = anonymous_get(
            moto_endpoint, f"{REPOSITORY}/data/{chunk.checksum[:2]}/{chunk.checksum[2:]}P"
        )
        assert status == 200
        pieces.append(zlib.decompress(body))
    assert b"".join(pieces) == data


def test_s3_errors_do_not_reveal_secrets(tmp_path: Path) -> None:
    """An unreachable endpoint raises StorageError whose text holds no credentials."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = S3Config(
        host="127.0.0.1",
        port=closed_port,
        bucket=BUCKET,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        dns_buckets=False,
    )
    store = S3ObjectStore(config, REPOSITORY, tmp_path / "spool")
    try:
        with pytest.raises(StorageError) as raised:
            store.put(name_for(b"x"), b"x")
    finally:
        store.close()
    message = str(raised.value)
    assert "HEAD" in message
    assert SECRET_KEY not in message
    assert ACCESS_KEY not in message


def test_a_corrupt_existing_object_is_rewritten_and_still_counts_as_reused(
    local_store: LocalObjectStore, storage_root: Path
) -> None:
    """Bit rot in a stored object (same size) is repaired from the bytes in hand; the object
    is not recorded as created, so abandoning the batch can never delete it."""
    data = b"hello world" * 100
    name = name_for(data)
    RecordingSink(local_store).put(name, data)
    path = storage_root / name
    rotten = bytearray(path.read_bytes())
    rotten[0] ^= 1
    path.write_bytes(bytes(rotten))
    sink = RecordingSink(local_store)
    sink.put(name, data)
    assert path.read_bytes() == data
    assert sink.created == ()
    assert sink.reused == (name,)
