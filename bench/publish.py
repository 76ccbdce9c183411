"""Benchmark the core path against the fake cvmfs_server.

Measures, for a burst of N files dropped into a staging directory while the daemon runs:
how many publishes the burst took, drop-to-published latency (p50/p99, from the moment each
file was closed to the moment the index recorded it live), and the daemon's own CPU time
per file (the fake cvmfs_server runs in child processes and is not counted).

    .venv/bin/python bench/publish.py [--files 10000] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cvmfs_syncd import config as config_mod
from cvmfs_syncd.service import Service
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "bench.example.org"


class _Quiet:
    def ready(self, status: str | None = None) -> None: ...
    def status(self, text: str) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(files: int, size: int, quiet: float, max_batch: float) -> dict[str, float]:
    """Drop ``files`` files and return the measured figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = FakeStratum0(root / "s0")
        fake.mkfs(REPO)
        staging = root / "staging"
        staging.mkdir()
        cfg_path = write_config(
            root / "c.toml",
            state_dir=root / "state",
            server_command=fake.server_command,
            config_dir=fake.config_dir,
            repo=REPO,
            staging=staging,
            metrics_address="",
        )
        text = cfg_path.read_text()
        text = text.replace("quiet_seconds = 0.2", f"quiet_seconds = {quiet}")
        text = text.replace("max_batch_seconds = 2", f"max_batch_seconds = {max_batch}")
        text = text.replace('log_format = "json"', 'log_format = "json"\nlog_level = "warning"')
        cfg_path.write_text(text)
        config = config_mod.load(cfg_path)
        from cvmfs_syncd import log

        log.configure(
            "info" if os.environ.get("BENCH_DEBUG") else "warning",
            "json",
            stream=open(os.environ.get("BENCH_LOG", os.devnull), "w"),  # noqa: SIM115
        )
        service = Service(config, notifier=_Quiet())  # type: ignore[arg-type]
        service.start()
        time.sleep(0.5)
        cpu0 = _cpu()
        dropped: dict[str, float] = {}
        payload = os.urandom(size)
        started = time.time()
        for i in range(files):
            sub = staging / f"d{i // 1000:03d}"
            sub.mkdir(exist_ok=True)
            path = sub / f"f{i:05d}"
            path.write_bytes(payload)
            dropped[f"d{i // 1000:03d}/f{i:05d}"] = time.time()
        write_seconds = time.time() - started
        state = State(config.daemon.state_dir)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if state.count_published(
                REPO, config.repositories[0].staging[0].name
            ) >= files + files // 1000 + (1 if files % 1000 else 0):
                break
            time.sleep(0.2)
        cpu = _cpu() - cpu0
        if os.environ.get("BENCH_DEBUG"):
            for b in reversed(state.recent_batches(REPO)):
                print(b.id, b.stage, b.reason, round(b.created_at - started, 2), b.summary)
        latencies = []
        live_at = []
        for rel, at in dropped.items():
            entry = state.published_entry(REPO, rel)
            if entry is not None:
                latencies.append(entry.published_at - at)
                live_at.append(entry.published_at)
        publishes = (
            service.metrics.registry.get_sample_value(
                "cvmfs_syncd_publishes_total", {"repository": REPO}
            )
            or 0.0
        )
        service.stop()
        state.close()
        latencies.sort()
        return {
            "files": files,
            "published": len(latencies),
            "publishes": publishes,
            "p50_s": latencies[len(latencies) // 2] if latencies else float("nan"),
            "p99_s": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
            "cpu_ms_per_file": 1000 * cpu / max(1, files),
            "write_s": write_seconds,
            "all_live_s": max(live_at) - started if live_at else float("nan"),
        }


def main() -> int:
    """Run the benchmark and print a markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--max-batch", type=float, default=30.0)
    args = parser.parse_args()
    result = run(args.files, args.size, args.quiet, args.max_batch)
    print(
        "| files | published | publishes | p50 latency (s) | p99 latency (s) "
        "| daemon CPU per file (ms) | writing the burst (s) | burst start to all live (s) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {result['files']} | {result['published']} | {result['publishes']:.0f} | "
        f"{result['p50_s']:.2f} | {result['p99_s']:.2f} | {result['cpu_ms_per_file']:.3f} | "
        f"{result['write_s']:.2f} | {result['all_live_s']:.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
