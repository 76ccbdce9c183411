"""How long the fake's own ``publish`` work takes (no calibrated costs), per shape.

    python -m tests.fake_cvmfs.bench_publish [--files 10000] [--dirs 100] [--rounds 3]
    python -m tests.fake_cvmfs.bench_publish --profile graft   # cProfile of one publish

Shapes, each in a fresh repository with N files spread over D directories:

- **copy**: N files of 4 KiB (distinct content) written into the transaction;
- **graft**: N empty placeholders with ``.cvmfsgraft-<name>`` markers whose zlib objects
  are already in the storage (as a graft uploader leaves them);
- **unchanged**: a publish after the copy shape when only one file changed.

The figures are the wall time of ``cvmfs_server publish`` (interpreter start-up included;
the best and the median of the rounds) and its CPU time (user + system), which other load
on the machine disturbs less. The calibrated costs (``CALIBRATED_COSTS``) are only
meaningful while the wall time stays below ``base + N * per_file`` and
``base + N * per_graft``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from .server.cli import main as engine_main
from .stratum0 import CALIBRATED_COSTS, FakeStratum0

REPO = "bench.example.org"
FILE_SIZE = 4096


def _content(index: int) -> bytes:
    seed = hashlib.sha256(str(index).encode()).digest()
    return (seed * (FILE_SIZE // len(seed) + 1))[:FILE_SIZE]


def _fresh(root: Path) -> FakeStratum0:
    fake = FakeStratum0(root)
    fake.mkfs(REPO)
    fake.check_run("transaction", REPO)
    return fake


def _write_copies(fake: FakeStratum0, files: int, dirs: int) -> None:
    union = str(fake.union_dir(REPO))
    for d in range(dirs):
        os.mkdir(f"{union}/d{d:03d}")
    for i in range(files):
        with open(f"{union}/d{i % dirs:03d}/f{i:05d}", "wb") as handle:
            handle.write(_content(i))


def _write_grafts(fake: FakeStratum0, files: int, dirs: int) -> None:
    union = str(fake.union_dir(REPO))
    data = str(fake.storage_dir(REPO) / "data")
    for d in range(dirs):
        os.mkdir(f"{union}/d{d:03d}")
    for i in range(files):
        content = _content(i)
        stored = zlib.compress(content)
        name = hashlib.sha1(stored, usedforsecurity=False).hexdigest()
        with open(f"{data}/{name[:2]}/{name[2:]}", "wb") as handle:
            handle.write(stored)
        base = f"{union}/d{i % dirs:03d}"
        with open(f"{base}/f{i:05d}", "wb"):
            pass
        with open(f"{base}/.cvmfsgraft-f{i:05d}", "w") as handle:
            handle.write(f"size={len(content)}\nchecksum={name}\ncompression=zlib\n")


def _change_one(fake: FakeStratum0, files: int, dirs: int) -> None:
    _write_copies(fake, files, dirs)
    fake.check_run("publish", REPO)
    fake.check_run("transaction", REPO)
    (fake.union_dir(REPO) / "d000" / "f00000").write_bytes(b"changed\n")


SHAPES: dict[str, Callable[[FakeStratum0, int, int], None]] = {
    "copy": _write_copies,
    "graft": _write_grafts,
    "unchanged": _change_one,
}


def measure(shape: str, files: int, dirs: int, *, profile: bool = False) -> tuple[float, float]:
    """Wall and CPU seconds of one publish of ``shape`` (in-process under cProfile when
    ``profile``)."""
    with tempfile.TemporaryDirectory(prefix="fake-bench-") as tmp:
        fake = _fresh(Path(tmp) / "root")
        SHAPES[shape](fake, files, dirs)
        if profile:
            profiler = cProfile.Profile()
            started = time.perf_counter()
            cpu = time.process_time()
            profiler.enable()
            code = engine_main(["--root", str(fake.root), "publish", REPO])
            profiler.disable()
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
            if code != 0:
                raise SystemExit(f"publish exited {code}")
            return seconds, cpu
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        fake.check_run("publish", REPO)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return seconds, cpu


def main() -> None:
    """Print the median publish time of every shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", choices=sorted(SHAPES))
    args = parser.parse_args()
    if args.profile:
        seconds, cpu = measure(args.profile, args.files, args.dirs, profile=True)
        print(f"{args.profile}: {seconds:.2f} s ({cpu:.2f} s CPU) under the profiler")
        return
    costs = CALIBRATED_COSTS["publish"]
    budget = {
        "copy": costs["base"] + args.files * costs["per_file"],
        "graft": costs["base"] + args.files * costs["per_graft"],
        "unchanged": costs["base"] + costs["per_file"],
    }
    for shape in SHAPES:
        runs = [measure(shape, args.files, args.dirs) for _ in range(args.rounds)]
        walls = [wall for wall, _ in runs]
        cpus = [cpu for _, cpu in runs]
        print(
            f"{shape:9} {args.files} files: wall best {min(walls):.2f} s, median "
            f"{statistics.median(walls):.2f} s; CPU median {statistics.median(cpus):.2f} s "
            f"(calibrated {budget[shape]:.2f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
