"""check with check_integrity: what it verified is said, never assumed (faults.md F3).

``check -i`` on S3 storage prints "Storage integrity check only works locally. skipping."
and "no problems found"; a stub cvmfs_server returns that output. The sampled pass of the
daemon itself runs against moto.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config as BotoConfig

from cvmfs_syncd.config import Config
from cvmfs_syncd.cvmfs.outcomes import CommandResult, classify, explain
from cvmfs_syncd.cvmfs.repo import load_layout
from cvmfs_syncd.cvmfs.s3storage import S3ObjectStore
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.storage import open_storage
from cvmfs_syncd.maintenance import RepositoryMaintenance, Verdict, integrity
from cvmfs_syncd.maintenance.integrity import integrity_skipped, sample_s3
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.test_maintenance import REPO, load_config, maintenance_toml, sample

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "integrity-access"
SECRET_KEY = "integrity-secret-not-real"  # noqa: S105 - a fake credential for moto
BUCKET = "integrity"
#: Recorded: `check -i` of a repository whose storage is not local (p_gateway_maintenance 8).
SKIPPED = (
    "Storage integrity check only works locally. skipping.\n"
    f"Verifying integrity of {REPO}...\nInspecting log of references\n"
    "Inspecting tag database\n[inspecting catalog] 53f33653d459e2ee72f10f86cd3b70138c1ac6ab at /\n"
    "no problems found\n"
)
CHECKED = f"Verifying integrity of {REPO}...\nno problems found\n"

# Of the stratum0 fixture only the server.conf is read.
pytestmark = pytest.mark.stratum0(REPO, gc=True)


class CheckStub(CvmfsServer):
    """`check` answers with the given stdout and exit 0."""

    def __init__(self, stdout: str) -> None:
        super().__init__(("cvmfs_server",))
        self.stdout = stdout
        self.checks: list[bool] = []

    def check(
        self, repo: str, *, integrity: bool = False, timeout: float | None = None
    ) -> CommandResult:
        del timeout
        self.checks.append(integrity)
        args = ("check", "-i", repo) if integrity else ("check", repo)
        outcome = classify("check", 0, self.stdout, "")
        return CommandResult(
            ("cvmfs_server", *args), 0, self.stdout, "", 0.1, outcome, explain(outcome, "", "")
        )


def name_for(data: bytes) -> str:
    """The object name of stored bytes (SHA-1)."""
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    return f"data/{digest[:2]}/{digest[2:]}"


Build = Callable[[CheckStub], RepositoryMaintenance]


@pytest.fixture
def build(tmp_path: Path, stratum0: FakeStratum0, staging: Path) -> Iterator[Build]:
    """RepositoryMaintenance of REPO with check_integrity, checks going to a stub."""
    states: list[State] = []

    def make(server: CheckStub) -> RepositoryMaintenance:
        keys = maintenance_toml(check_schedule='"0 4 * * *"', check_integrity="true")
        config: Config = load_config(tmp_path, stratum0, staging, keys)
        states.append(State(config.daemon.state_dir))
        return RepositoryMaintenance(
            config,
            config.repositories[0],
            layout=load_layout(config.cvmfs.config_dir, REPO),
            server=server,
            metrics=Metrics(),
            state=states[-1],
        )

    yield make
    for state in states:
        state.close()


def integrity_of(maint: RepositoryMaintenance) -> dict[str, float | None]:
    """The cvmfs_syncd_integrity series by result."""
    return {
        result: sample(maint.metrics, "cvmfs_syncd_integrity", result=result)
        for result in integrity.RESULTS
    }


def test_skip_line_is_recognised() -> None:
    """The recorded skip line is found in stdout or stderr; a real check -i has none."""
    assert integrity_skipped(SKIPPED, "")
    assert integrity_skipped("", SKIPPED)
    assert not integrity_skipped(CHECKED, "")


def test_check_i_that_skipped_is_reported_not_checked(build: Build) -> None:
    """A check -i that printed the skip line passes the plain check but is not "verified"
    (even on storage the daemon thinks local): metric and /status say not_checked."""
    maint = build(CheckStub(SKIPPED))
    result = maint.check()
    assert result is not None
    assert result.verdict is Verdict.DONE
    assert "integrity NOT checked" in result.message
    assert integrity_of(maint) == {"verified": 0, "not_checked": 1, "problems": 0}
    status = maint.status()["integrity"]
    assert status["result"] == "not_checked"
    assert "skips object contents" in status["detail"]


def test_check_i_on_local_storage_is_verified(build: Build) -> None:
    """A check -i without the skip line on local storage verified every object."""
    server = CheckStub(CHECKED)
    maint = build(server)
    result = maint.check()
    assert result is not None
    assert result.ok
    assert server.checks == [True]
    assert integrity_of(maint) == {"verified": 1, "not_checked": 0, "problems": 0}
    assert maint.status()["integrity"]["result"] == "verified"


# -- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def admin(moto_endpoint: tuple[str, int]) -> Iterator[S3Client]:
    """A signed client of a fresh bucket."""
    host, port = moto_endpoint
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}),
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
def s3_upstream(
    tmp_path: Path, moto_endpoint: tuple[str, int], stratum0: FakeStratum0, admin: S3Client
) -> str:
    """REPO's server.conf points its storage at the moto bucket; return the upstream value."""
    del admin  # the bucket exists
    host, port = moto_endpoint
    conf = tmp_path / f"{REPO}.s3.conf"
    conf.write_text(
        f"CVMFS_S3_HOST={host}\nCVMFS_S3_PORT={port}\nCVMFS_S3_BUCKET={BUCKET}\n"
        f"CVMFS_S3_ACCESS_KEY={ACCESS_KEY}\nCVMFS_S3_SECRET_KEY={SECRET_KEY}\n"
        "CVMFS_S3_DNS_BUCKETS=false\n",
        encoding="utf-8",
    )
    spool = tmp_path / "spool"
    spool.mkdir()
    upstream = f"S3,{spool},{REPO}@{conf}"
    stratum0.set_config(REPO, "CVMFS_UPSTREAM_STORAGE", upstream)
    return upstream


def put_objects(upstream: str, contents: list[bytes]) -> list[str]:
    """Store ``contents`` as objects (world-readable); return their names, sorted."""
    store = open_storage(upstream, REPO)
    try:
        for data in contents:
            store.put(name_for(data), data)
    finally:
        store.close()
    return sorted(name_for(data) for data in contents)


def test_s3_sample_resumes_from_its_cursor(
    build: Build, s3_upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 the daemon verifies a bounded sample itself, resuming where the last check
    stopped (the cursor survives in the state database); the metric says verified."""
    names = put_objects(s3_upstream, [b"one\n", b"two\n", b"three\n"])
    monkeypatch.setattr(integrity, "SAMPLE_OBJECTS", 2)
    monkeypatch.setattr(integrity, "SAMPLE_RATE", 0.0)
    first = build(CheckStub(SKIPPED))
    result = first.check()
    assert result is not None
    assert result.ok, result.message
    assert "2 S3 objects downloaded and hashed" in result.message
    assert f"resumes after {REPO}/{names[1]}" in result.message
    assert integrity_of(first) == {"verified": 1, "not_checked": 0, "problems": 0}
    assert first.status()["integrity"]["objects_verified"] == 2
    again = build(CheckStub(SKIPPED)).check()  # a restarted daemon
    assert again is not None
    assert again.ok
    assert "1 S3 objects downloaded and hashed (sampled; starts over next time)" in again.message


def test_s3_sample_finds_a_corrupted_object(
    build: Build, s3_upstream: str, admin: S3Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object whose bytes do not hash to its name fails the check (no quick retry)."""
    put_objects(s3_upstream, [b"fine\n"])
    wrong = name_for(b"expected\n")
    admin.put_object(Bucket=BUCKET, Key=f"{REPO}/{wrong}", Body=b"other\n", ACL="public-read")
    admin.put_object(Bucket=BUCKET, Key=f"{REPO}/data/txn/leftover", Body=b"x")
    monkeypatch.setattr(integrity, "SAMPLE_RATE", 0.0)
    maint = build(CheckStub(SKIPPED))
    result = maint.check()
    assert result is not None
    assert result.verdict is Verdict.FAILED
    assert result.outcome == "integrity_problems"
    assert wrong in result.message
    assert "1 of 2 sampled" in result.message
    assert integrity_of(maint) == {"verified": 0, "not_checked": 0, "problems": 1}
    assert maint.status()["integrity"]["bad_objects"] == [wrong]


def test_s3_sample_is_paced(s3_upstream: str) -> None:
    """The pass waits between downloads to stay under its rate (waits recorded, not slept)."""
    put_objects(s3_upstream, [b"a", b"b", b"c", b"d"])
    waits: list[float] = []
    store = open_storage(s3_upstream, REPO)
    assert isinstance(store, S3ObjectStore)
    try:
        report = sample_s3(store, "", count=10, rate=1.0, sleep=waits.append)
    finally:
        store.close()
    assert report.checked == 4
    assert report.cursor == ""
    # None before the first download; then the n-th is due n seconds after the first
    # (the recorded waits were not slept, so they add up).
    assert len(waits) == 3
    assert all(0 < wait <= n for n, wait in enumerate(waits, start=1))


def test_s3_unreachable_is_not_checked(
    build: Build, s3_upstream: str, tmp_path: Path, stratum0: FakeStratum0
) -> None:
    """A bucket that cannot be listed leaves integrity not_checked; the plain check passed."""
    del s3_upstream
    conf = tmp_path / f"{REPO}.s3.conf"
    text = conf.read_text().replace(f"CVMFS_S3_BUCKET={BUCKET}", "CVMFS_S3_BUCKET=no-such-bucket")
    conf.write_text(text)
    maint = build(CheckStub(SKIPPED))
    result = maint.check()
    assert result is not None
    assert result.ok
    assert "sampled pass over S3 failed" in result.message
    assert integrity_of(maint) == {"verified": 0, "not_checked": 1, "problems": 0}
    assert stratum0.config_dir.exists()
