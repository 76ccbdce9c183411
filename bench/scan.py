"""Benchmark the reconciliation scan of a large staging tree that is live already.

Builds (or reuses, ``--tree DIR``) a staging tree of N entries, directories of
``--per-dir`` small files, fills a state index so that every entry is live (rows written
in bulk, straight into SQLite), then times in one run, each warm (run twice, the second
counted):

- ``find DIR -printf '%p %s %T@\\n' > /dev/null``: the floor, one lstat per entry in C;
- a bare Python walk: ``os.scandir`` on directory descriptors plus one lstat per entry;
- ``StagingInput.reconcile`` in a child process (which must return no hints), with its
  own peak RSS (``ru_maxrss``) and its RSS before the scan;
- with ``--dict``, also the comparison the scan replaced (every live entry in a dict);

each with its CPU seconds too (user and system, every thread): on a shared machine they
vary less than the elapsed seconds.

    .venv/bin/python bench/scan.py [--entries 1000000] [--per-dir 1000] [--tree DIR]

A tree built by ``--tree DIR`` is kept and reused by later runs with the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_syncd import fsops, log
from cvmfs_syncd.config import StagingConfig
from cvmfs_syncd.metrics import Metrics
from cvmfs_syncd.model import Fingerprint
from cvmfs_syncd.paths import repo_path
from cvmfs_syncd.sources.staging import StagingInput
from cvmfs_syncd.sources.staging_merge import StagingMerge
from cvmfs_syncd.state import State

TARGET = "/sw"
REPO = "bench.example.org"


def build_tree(tree: Path, entries: int, per_dir: int) -> Path:
    """Create ``tree/staging`` with about ``entries`` entries (or reuse a matching one)."""
    staging = tree / "staging"
    stamp = tree / "tree.json"
    shape = {"entries": entries, "per_dir": per_dir}
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return staging
    if staging.exists():
        raise SystemExit(f"{staging} exists but was not built for {shape}: remove it first")
    staging.mkdir(parents=True)
    dirs = max(1, entries // (per_dir + 1))
    started = time.monotonic()
    for d in range(dirs):
        name = f"d{d:05}"
        (staging / name).mkdir()
        dir_fd = os.open(staging / name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for f in range(per_dir):
                fd = os.open(
                    f"f{f:05}.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd
                )
                os.write(fd, b"%d\n" % f)
                os.close(fd)
        finally:
            os.close(dir_fd)
    stamp.write_text(json.dumps(shape))
    print(f"built {dirs * (per_dir + 1)} entries in {time.monotonic() - started:.0f} s")
    return staging


def fill_index(state_dir: Path, staging: Path) -> int:
    """Record every entry of the tree as live; return the number of rows."""
    config = StagingConfig(path=staging, target=TARGET)
    State(state_dir).close()  # create the database at the current schema
    db = sqlite3.connect(state_dir / "state.sqlite", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'published'"
        " AND sql IS NOT NULL"
    ).fetchall()
    db.execute("BEGIN")
    for name, _ in indexes:
        db.execute(f'DROP INDEX "{name}"')

    def rows() -> object:
        for rel_b, found in fsops.scan_staging(staging):
            fp = fsops.fingerprint_of(found) if isinstance(found, os.stat_result) else found
            if not isinstance(fp, Fingerprint):
                continue
            rel = os.fsdecode(rel_b)
            yield (
                REPO,
                os.fsencode(repo_path(TARGET, rel)),
                config.name,
                rel_b,
                json.dumps(fp.to_json()),
                1,
                0.0,
            )

    db.executemany(
        "INSERT INTO published(repo, path, source, source_path, fingerprint, revision,"
        " published_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
        rows(),  # type: ignore[arg-type]
    )
    for _, sql in indexes:
        db.execute(sql)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    count = int(db.execute("SELECT count(*) FROM published").fetchone()[0])
    db.close()
    return count


def bare_walk(root: Path) -> int:
    """Count the entries below ``root`` the simplest fast way: scandir plus one lstat each."""

    def walk(dir_fd: int) -> int:
        count = 0
        with os.scandir(dir_fd) as it:
            entries = list(it)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            count += 1
            if stat.S_ISDIR(st.st_mode):
                child = os.open(
                    entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd
                )
                try:
                    count += walk(child)
                finally:
                    os.close(child)
        return count

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return walk(fd)
    finally:
        os.close(fd)


def twice(run: object) -> tuple[float, float, object]:
    """Run a callable twice; return the second run's seconds, CPU seconds (this process
    and its finished children, user and system) and result."""
    assert callable(run)
    run()
    cpu_before = _cpu()
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, _cpu() - cpu_before, result


def _cpu() -> float:
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(staging: Path, state_dir: Path, how: str) -> None:
    """In a child process: scan twice, print seconds, CPU seconds, hints and RSS as JSON."""
    log.configure("warning", "console")
    state = State(state_dir)
    source = StagingInput(REPO, StagingConfig(path=staging, target=TARGET), state, Metrics())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run() -> list[object]:
        if how == "merge":
            return list(source.reconcile(time.time()))
        return list(dict_reconcile(source))

    seconds, cpu, hints = twice(run)  # CPU: every thread of the process
    assert isinstance(hints, list)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "hints": len(hints),
                "rss_before": before,
                "rss_peak": peak,
            }
        )
    )


def dict_reconcile(source: StagingInput) -> list[str]:
    """The comparison the merge replaced: every live entry in a dict, every entry in a list."""
    target = repo_path(TARGET, "")
    live = {
        e.source_path: e for e in source.state.published_under(source.repo, target, source.name)
    }
    found_entries = list(fsops.walk_staging(source.root))
    merge = StagingMerge(source, target, time.time())
    hints = [rel for rel, found in found_entries if merge.differs(rel, found, live.get(rel))]
    seen = {rel for rel, _ in found_entries}
    hints += [rel for rel in live if rel and rel not in seen]
    return hints


def in_child(staging: Path, state_dir: Path, how: str) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter (so that its peak RSS is its own)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            how,
            "--tree-staging",
            str(staging),
            "--state",
            str(state_dir),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Build or reuse the tree, fill the index, time the three scans, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--tree", type=Path, help="build the tree here and keep it for reuse")
    parser.add_argument("--dict", action="store_true", help="also time the dict comparison")
    parser.add_argument("--child", choices=["merge", "dict"], help=argparse.SUPPRESS)
    parser.add_argument("--tree-staging", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.tree_staging, args.state, args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        staging = build_tree(args.tree or Path(tmp) / "tree", args.entries, args.per_dir)
        state_dir = Path(tmp) / "state"
        started = time.monotonic()
        rows = fill_index(state_dir, staging)
        print(f"indexed {rows} live entries in {time.monotonic() - started:.0f} s")
        find = ["find", str(staging), "-printf", "%p %s %T@\\n"]
        find_s, find_cpu, _ = twice(
            lambda: subprocess.run(find, check=True, stdout=subprocess.DEVNULL)
        )
        walk_s, walk_cpu, walked = twice(lambda: bare_walk(staging))
        results = {"merge": in_child(staging, state_dir, "merge")}
        if args.dict:
            results["dict"] = in_child(staging, state_dir, "dict")
    print(
        f"\nPython {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {walked} entries, all live\n"
    )
    print(
        "| scan | seconds | ratio to find | CPU seconds | hints | RSS before (MB) | peak RSS (MB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| `find -printf` | {find_s:.2f} | 1.00 | {find_cpu:.2f} | | | |")
    print(f"| bare Python walk | {walk_s:.2f} | {walk_s / find_s:.2f} | {walk_cpu:.2f} | | | |")
    labels = {"merge": "`reconcile` (merge)", "dict": "dict comparison (before)"}
    for how, r in results.items():
        print(
            f"| {labels[how]} | {r['seconds']:.2f} | {r['seconds'] / find_s:.2f} | "
            f"{r['cpu']:.2f} | {r['hints']:.0f} | {r['rss_before'] / 1024:.0f} | "
            f"{r['rss_peak'] / 1024:.0f} |"
        )
    if results["merge"]["hints"]:
        raise SystemExit("the scan of a tree that is all live returned hints")


if __name__ == "__main__":
    main()
