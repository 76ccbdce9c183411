"""Running the real daemon process against the fake stratum 0, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import Tree, client_tree, staging_tree, wait_for, write_config

REPO = "e2e.example.org"


def free_port() -> int:
    """Return a TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonUnderTest:
    """A ``cvmfs-syncd run`` child process with its configuration and fake stratum 0."""

    def __init__(self, tmp_path: Path, **config: str) -> None:
        self.tmp_path = tmp_path
        self.stratum0 = FakeStratum0(tmp_path / "root")
        self.stratum0.mkfs(REPO)
        self.staging = tmp_path / "staging"
        self.staging.mkdir(exist_ok=True)
        self.port = free_port()
        self.config_path = write_config(
            tmp_path / "cvmfs-syncd.toml",
            state_dir=tmp_path / "state",
            server_command=self.stratum0.server_command,
            config_dir=self.stratum0.config_dir,
            repo=REPO,
            staging=self.staging,
            metrics_address=f"127.0.0.1:{self.port}",
            **config,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / "daemon.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start the daemon and wait until it answers /healthz."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cvmfs_syncd", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=self.tmp_path,
        )
        log.close()
        wait_for(self._answers, 30, "the daemon's HTTP endpoint")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{self.log()}")
        try:
            self.get("/healthz")
        except OSError:
            return False
        return True

    def get(self, path: str) -> tuple[int, Any]:
        """GET an endpoint; return (HTTP status, JSON body or text)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                data = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            data = exc.read()
            status = exc.code
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a one-shot ``cvmfs-syncd`` command with this daemon's configuration."""
        command, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "cvmfs_syncd", command, "-c", str(self.config_path), *rest],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def signal(self, signum: int) -> None:
        """Send a signal to the daemon."""
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self, *, orphans: bool = True) -> None:
        """kill -9 the daemon, and (unless told not to) any fake command it left running."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        if orphans:
            self.stratum0.kill_orphans()

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the daemon to exit; return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop the daemon if it still runs (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.stratum0.kill_orphans()

    def log(self) -> str:
        """The daemon's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def published(self) -> Tree:
        """What a client sees at the latest revision (mkfs's own file left out)."""
        return client_tree(self.stratum0, REPO)

    def converged(self) -> bool:
        """True when the published tree equals staging and no transaction is open."""
        return not self.stratum0.in_transaction(REPO) and self.published() == staging_tree(
            self.staging
        )

    def wait_converged(self, timeout: float = 60) -> None:
        """Wait until the repository equals staging; fail with the daemon's log otherwise."""
        try:
            wait_for(self.converged, timeout, "the repository to equal staging")
        except AssertionError:
            published, staged = self.published(), staging_tree(self.staging)
            differ = sorted(
                k for k in set(published) | set(staged) if published.get(k) != staged.get(k)
            )
            raise AssertionError(
                f"not converged: paths differing {differ[:20]}, "
                f"in transaction {self.stratum0.in_transaction(REPO)}\nlog:\n{self.log()[-4000:]}"
            ) from None
