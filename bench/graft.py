"""Benchmark the graft engine against a plain hashlib + zlib loop over the same file.

Writes a test file (1 GiB by default), then grafts it with every combination of
compression (none, zlib), chunking (24 MiB chunks, never chunked) and workers (1, 2),
and runs the equivalent hand-written loop (read, compress, hash; single-threaded) for each
compression/chunking pair. One more row grafts into a local object store through the
recording sink (write, fsync, rename, verify). Prints a markdown table.

    .venv/bin/python bench/graft.py [--size-mib 1024] [--data mixed|random|text]

``mixed`` data is 4 KiB of random bytes followed by 12 KiB of zeros, repeated (zlib
shrinks it to about a quarter); ``random`` is incompressible (zlib's slowest case).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_syncd.cvmfs.graft import DEFAULT_CHUNK_SIZE, GraftOptions, graft_file
from cvmfs_syncd.cvmfs.storage import LocalObjectStore, RecordingSink

MIB = 1 << 20
BLOCK = 16 * MIB


def write_test_file(path: Path, size: int, kind: str) -> None:
    """Write ``size`` bytes of the chosen kind of data to ``path``."""
    rng = random.Random(20260101)
    text = b"".join(
        b"export PATH=/cvmfs/software/bin:$PATH  # %d\n" % i for i in range(BLOCK // 40)
    )
    with path.open("wb") as out:
        remaining = size
        while remaining:
            if kind == "random":
                block = rng.randbytes(BLOCK)
            elif kind == "text":
                block = text
            else:
                block = b"".join(rng.randbytes(4096) + bytes(12288) for _ in range(BLOCK // 16384))
            piece = block[:remaining]
            out.write(piece)
            remaining -= len(piece)


def plain_loop(path: Path, compression: str, chunk_size: int) -> None:
    """Read, compress (each chunk on its own, or one stream) and SHA-1 hash, single-threaded."""
    with path.open("rb") as stream:
        if chunk_size:
            while piece := stream.read(chunk_size):
                stored = zlib.compress(piece, 6) if compression == "zlib" else piece
                hashlib.sha1(stored, usedforsecurity=False).hexdigest()
            return
        hasher = hashlib.sha1(usedforsecurity=False)
        compressor = zlib.compressobj(6) if compression == "zlib" else None
        while piece := stream.read(MIB):
            hasher.update(compressor.compress(piece) if compressor is not None else piece)
        if compressor is not None:
            hasher.update(compressor.flush())
        hasher.hexdigest()


def timed(action: Callable[[], object]) -> float:
    """Return the wall time of ``action`` in seconds."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> int:
    """Run the benchmark and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="test file size (MiB)")
    parser.add_argument("--data", choices=("mixed", "random", "text"), default="mixed")
    arguments = parser.parse_args()
    size = arguments.size_mib * MIB

    with tempfile.TemporaryDirectory(prefix="graft-bench-") as scratch:
        root = Path(scratch)
        source = root / "input.bin"
        write_test_file(source, size, arguments.data)
        # Warm the page cache so that every run reads from memory alike.
        plain_loop(source, "none", DEFAULT_CHUNK_SIZE)

        rows: list[tuple[str, str, str, float, float | None]] = []
        for compression in ("none", "zlib"):
            for chunk_size, chunking in ((DEFAULT_CHUNK_SIZE, "24 MiB chunks"), (0, "unchunked")):
                loop_seconds = timed(partial(plain_loop, source, compression, chunk_size))
                rows.append((compression, chunking, "plain loop", loop_seconds, None))
                options = GraftOptions(compression=compression, chunk_size=chunk_size)
                for workers in (1, 2):
                    seconds = timed(partial(graft_file, source, options, workers=workers))
                    rows.append(
                        (compression, chunking, f"engine, {workers}", seconds, loop_seconds)
                    )

        storage = root / "srv"
        (storage / "data" / "txn").mkdir(parents=True)
        store = LocalObjectStore(storage)
        options = GraftOptions(compression="zlib", chunk_size=DEFAULT_CHUNK_SIZE)
        zlib_chunked_baseline = next(
            row[3] for row in rows if row[:3] == ("zlib", "24 MiB chunks", "plain loop")
        )
        seconds = timed(partial(graft_file, source, options, RecordingSink(store), workers=2))
        rows.append(
            ("zlib", "24 MiB chunks", "engine, 2, + local store", seconds, zlib_chunked_baseline)
        )

    cpus = os.cpu_count()
    print(
        f"{arguments.size_mib} MiB of {arguments.data} data, Python {platform.python_version()}, "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}, {cpus} CPUs, SHA-1, page cache warm\n"
    )
    print("| compression | chunking | run (workers) | seconds | MiB/s | vs. plain loop |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for compression, chunking, run, seconds, baseline in rows:
        speed = arguments.size_mib / seconds
        ratio = "1.00" if baseline is None else f"{baseline / seconds:.2f}"
        print(f"| {compression} | {chunking} | {run} | {seconds:.2f} | {speed:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
