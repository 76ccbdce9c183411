"""The publish pipeline against the bare shell script, side by side, with the calibrated fake.

For N files of 100 B-8 KiB in 100 directories (a fresh target each run), measured in the
same process one after another:

- **bare**: ``cvmfs_server transaction R; cp -a staging/. /cvmfs/R/; cvmfs_server publish R``
- **syncd**: ``cvmfs-syncd sync -c FILE`` as a separate process (start-up included),
  ``settle_seconds = 0``, with ``prepare = true`` (the default) and ``prepare = false``.

For each: end-to-end seconds, and the seconds ``<spool>/in_transaction.lock`` existed
(sampled every 2 ms by a thread: the time the repository was locked for everyone else), and
the number of publishes. The fake ``cvmfs_server`` is calibrated (tests/fake_cvmfs
``CALIBRATED_COSTS``) to take the time the real CernVM-FS 2.12.0 takes for a copied file and
for a graft marker, so the ratios predict the real tool's.

Then the single-file latency: the daemon running (``settle_seconds`` S, ``quiet_seconds``
Q), one file dropped, time until the index records it live, against a bare one-file
``transaction; cp; publish``.

    .venv/bin/python bench/pipeline.py [--files 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import CALIBRATED_COSTS, FakeStratum0
from tests.support import write_config

CP = shutil.which("cp") or "/bin/cp"


@dataclass
class Run:
    """One measured run."""

    name: str
    seconds: float
    locked: float
    publishes: int


class LockWatch:
    """Samples whether a lock file exists, every 2 ms, and adds up the time it did."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.locked = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.002)
            now = time.perf_counter()
            if self.path.exists():
                self.locked += now - last
            last = now


def make_tree(root: Path, files: int, seed: int = 7) -> int:
    """N files of 100 B-8 KiB (random-ish text) in 100 directories; return bytes."""
    rng = random.Random(seed)
    total = 0
    per_dir = max(1, files // 100)
    for i in range(files):
        directory = root / f"d{i // per_dir:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(100, 8192)
        body = (f"{i:08d} " * (size // 9 + 1)).encode()[:size]
        (directory / f"f{i:05d}.txt").write_bytes(body)
        total += size
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)
    return total


def fresh_repository(fake: FakeStratum0, name: str) -> None:
    fake.mkfs(name)
    fake.set_costs(CALIBRATED_COSTS)


def bare(fake: FakeStratum0, repo: str, tree: Path) -> Run:
    lock = fake.spool_dir(repo) / "in_transaction.lock"
    revision = fake.revision(repo)
    with LockWatch(lock) as watch:
        start = time.perf_counter()
        fake.run("transaction", repo).check_returncode()
        subprocess.run([CP, "-a", f"{tree}/.", str(fake.union_dir(repo))], check=True)
        fake.run("publish", repo).check_returncode()
        seconds = time.perf_counter() - start
    return Run("bare script", seconds, watch.locked, fake.revision(repo) - revision)


def syncd(fake: FakeStratum0, repo: str, tree: Path, work: Path, *, prepare: bool) -> Run:
    config = write_config(
        work / f"{repo}.toml",
        state_dir=work / f"state-{repo}",
        server_command=fake.server_command,
        config_dir=fake.config_dir,
        repo=repo,
        staging=tree,
        metrics_address="",
        staging_extra=f"  prepare = {str(prepare).lower()}",
    )
    text = config.read_text().replace("settle_seconds = 0.1", "settle_seconds = 0")
    config.write_text(
        text.replace('log_format = "json"', 'log_format = "json"\nlog_level = "warning"')
    )
    lock = fake.spool_dir(repo) / "in_transaction.lock"
    revision = fake.revision(repo)
    with LockWatch(lock) as watch:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cvmfs_syncd", "sync", "-c", str(config)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
    name = "cvmfs-syncd sync" + ("" if prepare else " (prepare = false)")
    return Run(name, seconds, watch.locked, fake.revision(repo) - revision)


def single_file(fake: FakeStratum0, work: Path, settle: float, quiet: float) -> tuple[float, float]:
    """Return (bare one-file publish seconds, daemon drop-to-live seconds)."""
    repo = "latency.bench.org"
    fresh_repository(fake, repo)
    start = time.perf_counter()
    fake.run("transaction", repo).check_returncode()
    (fake.union_dir(repo) / "one.txt").write_bytes(b"one file\n")
    fake.run("publish", repo).check_returncode()
    bare_seconds = time.perf_counter() - start
    staging = work / "latency-staging"
    staging.mkdir()
    config = write_config(
        work / "latency.toml",
        state_dir=work / "latency-state",
        server_command=fake.server_command,
        config_dir=fake.config_dir,
        repo=repo,
        staging=staging,
        metrics_address="",
    )
    text = config.read_text()
    text = text.replace("settle_seconds = 0.1", f"settle_seconds = {settle}")
    text = text.replace("quiet_seconds = 0.2", f"quiet_seconds = {quiet}")
    config.write_text(text)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_syncd", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = State(work / "latency-state")
    try:
        deadline = time.monotonic() + 60
        while state.unfinished_batch(repo) is None and time.monotonic() < deadline:
            if (work / "latency-state" / "locks").exists():
                break
            time.sleep(0.05)
        time.sleep(2.0)  # the lane's start-up scan is over
        path = staging / "dropped.txt"
        with path.open("wb") as handle:
            handle.write(b"dropped by a team\n")
        closed = time.time()
        while time.monotonic() < deadline:
            entry = state.published_entry(repo, "dropped.txt")
            if entry is not None:
                return bare_seconds, entry.published_at - closed
            time.sleep(0.01)
        raise RuntimeError("the dropped file never went live")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        state.close()


def main() -> int:
    """Run the benchmark; print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--quiet", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        fake = FakeStratum0(work / "s0")
        tree = work / "tree"
        total = make_tree(tree, args.files)
        print(
            f"{args.files} files, {total / 1e6:.1f} MB, in 100 directories; "
            f"{args.rounds} rounds, order rotated\n"
        )
        runs: dict[str, list[Run]] = {}
        for round_no in range(args.rounds):
            order = ["bare", "prepared", "copied"]
            order = order[round_no % 3 :] + order[: round_no % 3]
            for kind in order:
                repo = f"{kind}{round_no}.bench.org"
                fresh_repository(fake, repo)
                if kind == "bare":
                    run = bare(fake, repo, tree)
                else:
                    run = syncd(fake, repo, tree, work, prepare=kind == "prepared")
                runs.setdefault(run.name, []).append(run)
                shutil.rmtree(fake.union_dir(repo), ignore_errors=True)
        base = runs["bare script"]
        base_total = statistics.median(r.seconds for r in base)
        base_locked = statistics.median(r.locked for r in base)
        print("| run | end to end (s) | vs bare | in transaction (s) | vs bare | publishes |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, measured in runs.items():
            total_s = statistics.median(r.seconds for r in measured)
            locked = statistics.median(r.locked for r in measured)
            print(
                f"| {name} | {total_s:.2f} | {total_s / base_total:.2f}x | {locked:.2f} | "
                f"{locked / base_locked:.2f}x | {max(r.publishes for r in measured)} |"
            )
        bare_one, live = single_file(fake, work, args.settle, args.quiet)
        print()
        print("| single file | seconds |")
        print("| --- | ---: |")
        print(f"| bare one-file transaction + publish | {bare_one:.2f} |")
        label = f"daemon: closed to live (settle {args.settle} s, quiet {args.quiet} s)"
        print(f"| {label} | {live:.2f} |")
        extra = live - args.settle - args.quiet - bare_one
        print(f"| beyond settle + quiet + bare publish | {extra:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
