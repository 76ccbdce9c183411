"""Benchmark the S3 source: from upload to published, against a plain boto3 download.

moto's S3 server runs in a child process (so that its own disk writes are not counted),
the fake cvmfs_server in child processes as always; this process runs the lane. For each
workload the objects are uploaded under ``run/`` with the ready marker last, and the time
from the marker's upload to ``Lane.sync_once`` returning (listing, downloads, grafting,
transaction, publish) is compared with a plain sequential ``download_file`` of the same
objects to a local directory in the same run. The bytes this process wrote to local disk
(its own ``write_bytes``, children excluded) are reported with the bytes of the data
objects the local repository storage gained: for grafts the two should be the same, the
content itself never being written anywhere else.
A last row grafts the large objects into an S3-backed repository (a second bucket), the
path on which nothing of the content should reach the local disk.

    .venv/bin/python bench/s3.py [--small 2000x16KiB] [--large 8x64MiB] [--crossover]

``--crossover`` times copying against grafting per object size to choose ``copy_below``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from botocore.config import Config as BotoConfig

from cvmfs_syncd import config as config_mod
from cvmfs_syncd import log
from cvmfs_syncd.config import S3Config as SourceConfig
from cvmfs_syncd.cvmfs.outcomes import CommandResult
from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Op, OpKind
from cvmfs_syncd.pipeline.prepare import Preparer
from cvmfs_syncd.service import build_lane, make_server
from cvmfs_syncd.sources.s3 import S3Input
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.sources.s3_support import ADMIN_KEY, ADMIN_SECRET, write_credentials, write_s3_config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REPO = "bench-s3.example.org"
KIB = 1024
MIB = 1024 * KIB
MARKER = ".ready"


# --------------------------------------------------------------------------- plumbing


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_process() -> Iterator[str]:
    """Run moto's S3 server in a child process; yield its endpoint URL."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        child.wait(timeout=30)


def client(endpoint: str) -> S3Client:
    """A signed path-style client."""
    made: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ADMIN_KEY,
        aws_secret_access_key=ADMIN_SECRET,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=16),
    )
    return made


def written_bytes() -> int:
    """Bytes this process (its threads, not its children) caused to be written to disk.

    ``/proc/self/io`` would also count reaped children (the fake cvmfs_server); the
    rusage block count of RUSAGE_SELF is the same ``write_bytes`` counter, per process.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_oublock * 512


def tree_bytes(root: Path) -> int:
    """Total size of the regular files below ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def mixed(seed: int, size: int) -> bytes:
    """``size`` bytes: 4 KiB random then 12 KiB zeros, repeated (zlib keeps about 1/4)."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(0, size, 16 * KIB):
        blocks.append(rng.randbytes(4 * KIB) + bytes(12 * KIB))
    return b"".join(blocks)[:size]


@dataclass
class Workload:
    """``count`` objects of ``size`` bytes."""

    name: str
    count: int
    size: int

    def objects(self) -> dict[str, bytes]:
        """Key below the prefix -> content (distinct contents: nothing deduplicates)."""
        return {
            f"run/{self.name}/obj{i:05d}.bin": mixed(self.size * 1000 + i, self.size)
            for i in range(self.count)
        }


def upload(s3: S3Client, bucket: str, prefix: str, objects: dict[str, bytes]) -> None:
    """Upload in parallel (not measured)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for future in [
            pool.submit(s3.put_object, Bucket=bucket, Key=prefix + key, Body=data)
            for key, data in objects.items()
        ]:
            future.result()


# --------------------------------------------------------------------------- runs


class PublishClock:
    """Adds up the wall time of ``cvmfs_server publish`` calls (the fake's share of a run)."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        """Wrap :meth:`CvmfsServer.publish` once."""
        original = CvmfsServer.publish

        def timed(self: CvmfsServer, repo: str, **kwargs: Any) -> CommandResult:
            start = time.perf_counter()
            try:
                return original(self, repo, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start

        CvmfsServer.publish = timed  # type: ignore[method-assign]


@dataclass
class Result:
    """One measured run."""

    what: str
    objects: int
    nbytes: int
    seconds: float
    disk_written: int
    stored: int = 0
    publish_seconds: float = 0.0

    def row(self) -> str:
        """A markdown table row."""
        mib = self.nbytes / MIB
        publish = f"{self.publish_seconds:.2f}" if self.publish_seconds else "-"
        return (
            f"| {self.what} | {self.objects} | {mib:.0f} | {self.seconds:.2f} | {publish} | "
            f"{self.objects / self.seconds:.0f} | {mib / self.seconds:.1f} | "
            f"{self.disk_written / MIB:.1f} | {self.stored / MIB:.1f} |"
        )


def baseline(
    endpoint: str, bucket: str, prefix: str, objects: dict[str, bytes], how: str
) -> Result:
    """Download every object to a local directory, one by one: with ``download_file`` (the
    managed transfer, a HEAD and ranged GETs in worker threads) or a plain ``get_object``
    whose body is copied to the file in 1 MiB pieces."""
    s3 = client(endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        before = written_bytes()
        start = time.perf_counter()
        for i, key in enumerate(objects):
            target = os.path.join(tmp, f"{i}")
            if how == "download_file":
                s3.download_file(bucket, prefix + key, target)
                continue
            body = s3.get_object(Bucket=bucket, Key=prefix + key)["Body"]
            with open(target, "wb") as out:
                while piece := body.read(MIB):
                    out.write(piece)
        os.sync()
        seconds = time.perf_counter() - start
        disk = written_bytes() - before
    s3.close()
    size = sum(map(len, objects.values()))
    return Result(f"plain boto3 {how}", len(objects), size, seconds, disk)


def publish(
    root: Path,
    endpoint: str,
    bucket: str,
    prefix: str,
    objects: dict[str, bytes],
    copy_below: int,
    what: str,
) -> Result:
    """Publish the objects with a lane (ready marker last); verify them through the client."""
    fake = FakeStratum0(root / "s0")
    fake.mkfs(REPO)
    storage = fake.storage_dir(REPO) / "data"
    stored_before = tree_bytes(storage)
    path = write_s3_config(
        root / "bench.toml",
        state_dir=root / "state",
        server_command=fake.server_command,
        config_dir=fake.config_dir,
        repo=REPO,
        endpoint=endpoint,
        bucket=bucket,
        credentials_file=write_credentials(root / "credentials"),
        prefix=prefix,
        target="/ci",
        s3_extra=f'  ready_marker = "{MARKER}"\n  copy_below = {copy_below}',
        repo_extra='max_batch_files = 1000000\nmax_batch_bytes = "64GiB"',
    )
    config = config_mod.load(path)
    state = State(config.daemon.state_dir)
    lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
    s3 = client(endpoint)
    s3.put_object(Bucket=bucket, Key=f"{prefix}run/{MARKER}", Body=b"")
    before = written_bytes()
    published_before = PublishClock.seconds
    start = time.perf_counter()
    ok, why = lane.sync_once(3600)
    os.sync()
    seconds = time.perf_counter() - start
    disk = written_bytes() - before
    publish_seconds = PublishClock.seconds - published_before
    s3.close()
    for source in lane.inputs:
        source.stop()
    lane.lock.release()
    state.close()
    if not ok:
        raise RuntimeError(f"not published: {why}")
    for key, data in objects.items():
        got = fake.read_file(REPO, "ci/" + key)
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            raise RuntimeError(f"{key} differs after publishing")
    stored = tree_bytes(storage) - stored_before
    return Result(
        what, len(objects), sum(map(len, objects.values())), seconds, disk, stored, publish_seconds
    )


def graft_into_s3_repository(
    root: Path, endpoint: str, bucket: str, prefix: str, objects: dict[str, bytes]
) -> Result:
    """Graft every object into a repository whose storage is another bucket (no publish:
    the fake serves no S3 storage); the data path of an S3-backed stratum 0."""
    s3 = client(endpoint)
    s3.create_bucket(Bucket="bench-repository")
    conf = root / "repo.s3.conf"
    host, port = endpoint.removeprefix("http://").split(":")
    conf.write_text(
        f"CVMFS_S3_HOST={host}\nCVMFS_S3_PORT={port}\nCVMFS_S3_BUCKET=bench-repository\n"
        f"CVMFS_S3_ACCESS_KEY={ADMIN_KEY}\nCVMFS_S3_SECRET_KEY={ADMIN_SECRET}\n"
        "CVMFS_S3_DNS_BUCKETS=false\nCVMFS_S3_USE_HTTPS=false\n"
    )
    spool = root / "spool"
    union = root / "union"
    union.mkdir()
    layout = RepositoryLayout(
        name=REPO,
        union_dir=union,
        spool_dir=spool,
        stratum0="",
        upstream_storage=f"S3,{spool / 'tmp'},{REPO}@{conf}",
        settings={"CVMFS_COMPRESSION_ALGORITHM": "default", "CVMFS_MAX_CHUNK_SIZE": str(16 * MIB)},
    )
    state = State(root / "graft-state")
    source = S3Input(
        REPO,
        SourceConfig(
            bucket=bucket,
            prefix=prefix,
            target="/ci",
            endpoint_url=endpoint,
            credentials_file=write_credentials(root / "graft-credentials"),
            copy_below=0,
        ),
        state,
        Metrics(),
    )
    preparer = Preparer(layout, state=state)
    _, listing = source.refresh(time.time())
    ops = [
        Op(OpKind.GRAFT, "ci/" + rel, source.name, key, listing.objects[key].fingerprint())
        for rel, key in listing.winners.items()
        if key.removeprefix(prefix) in objects  # not the ready marker
    ]
    before = written_bytes()
    start = time.perf_counter()
    prepared = preparer.prepare(1, ops, source.open_content)
    if len(prepared.prepared) != len(ops):
        raise RuntimeError(f"{len(ops) - len(prepared.prepared)} objects not grafted")
    os.sync()
    seconds = time.perf_counter() - start
    disk = written_bytes() - before
    source.stop()
    preparer.close()
    state.close()
    s3.close()
    spooled = tree_bytes(spool) if spool.exists() else 0
    return Result(
        "graft into an S3-backed repository (no publish)",
        len(ops),
        sum(map(len, objects.values())),
        seconds,
        disk + spooled,
    )


def parse_workload(name: str, text: str) -> Workload:
    """``2000x16KiB`` -> Workload."""
    count, _, size = text.lower().partition("x")
    units = {"kib": KIB, "mib": MIB, "b": 1}
    for unit, factor in units.items():
        if size.endswith(unit):
            return Workload(name, int(count), int(float(size[: -len(unit)]) * factor))
    return Workload(name, int(count), int(size))


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default="2000x16KiB", help="copied objects, COUNTxSIZE")
    parser.add_argument("--large", default="8x64MiB", help="grafted objects, COUNTxSIZE")
    parser.add_argument("--copy-below", default=str(MIB), help="bytes (default 1 MiB)")
    parser.add_argument("--crossover", action="store_true", help="copy vs graft per size")
    args = parser.parse_args()
    log.configure("warning", "console")
    PublishClock.install()
    copy_below = int(args.copy_below)
    small, large = parse_workload("small", args.small), parse_workload("large", args.large)
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, moto server in a child "
        "process on 127.0.0.1, fake cvmfs_server, local repository storage, zlib + SHA-1, "
        f"16 MiB graft chunks, copy_below {copy_below / MIB:g} MiB, mixed data\n"
    )
    header = (
        "| run | objects | MiB | seconds | of which publish | objects/s | MiB/s | "
        "local disk written (MiB) | objects stored (MiB) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    with moto_process() as endpoint, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        s3 = client(endpoint)
        s3.create_bucket(Bucket="bench")
        print(header)
        for workload in (small, large):
            objects = workload.objects()
            prefix = f"{workload.name}/"
            upload(s3, "bench", prefix, objects)
            for how in ("download_file", "get_object"):
                print(baseline(endpoint, "bench", prefix, objects, how).row(), flush=True)
            mode = "copied" if workload.size < copy_below else "grafted"
            run = root / workload.name
            run.mkdir()
            result = publish(
                run, endpoint, "bench", prefix, objects, copy_below, f"cvmfs-syncd, {mode}"
            )
            print(result.row(), flush=True)
            if workload is large:
                graft_root = root / "s3-repo"
                graft_root.mkdir()
                print(
                    graft_into_s3_repository(graft_root, endpoint, "bench", prefix, objects).row(),
                    flush=True,
                )
        if args.crossover:
            print(
                "\n| object size | objects | copy: lane ms/object | copy: publish ms/object | "
                "copy: disk KiB/object | graft: lane ms/object | graft: publish ms/object | "
                "graft: disk KiB/object |"
            )
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for size in (64 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB, 4 * MIB, 16 * MIB):
                count = max(16, min(256, (128 * MIB) // size))
                workload = Workload(f"x{size}", count, size)
                objects = workload.objects()
                prefix = f"cross{size}/"
                upload(s3, "bench", prefix, objects)
                cells = [f"{size // KIB} KiB", str(count)]
                for mode, below in (("copy", 1 << 62), ("graft", 0)):
                    run = root / f"{mode}-{size}"
                    run.mkdir()
                    result = publish(run, endpoint, "bench", prefix, objects, below, mode)
                    lane_ms = 1000 * (result.seconds - result.publish_seconds) / count
                    cells += [
                        f"{lane_ms:.1f}",
                        f"{1000 * result.publish_seconds / count:.1f}",
                        f"{result.disk_written / KIB / count:.0f}",
                    ]
                print("| " + " | ".join(cells) + " |", flush=True)
        s3.close()


if __name__ == "__main__":
    main()
