"""Checks of systemd/cvmfs-syncd.service: systemd accepts it, and every directive is explained."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from cvmfs_syncd.config import DaemonConfig
from tests.support import require

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "cvmfs-syncd.service"

# Options that give the service a private mount namespace (cvmfs_server's mounts would not
# be visible to the host) or forbid the setuid helper cvmfs_server relies on.
FORBIDDEN = {
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateMounts",
    "PrivateDevices",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "MountFlags",
    "NoNewPrivileges",
    "DynamicUser",
}


def directives(text: str) -> list[tuple[int, str, str]]:
    """Return (line number, key, value) of every assignment in a unit file's text."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";", "[")):
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"line {number} is neither comment, section nor assignment: {line!r}"
        found.append((number, key.strip(), value.strip()))
    return found


def values(key: str) -> list[str]:
    """Return every value the unit assigns to ``key``."""
    return [v for _, k, v in directives(UNIT.read_text()) if k == key]


def seconds(span: str) -> float:
    """Return a systemd time span such as '16min' or '60s' in seconds (the forms used here)."""
    units = {"s": 1, "sec": 1, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]+)", span):
        total += int(number) * units[unit]
    return total


def daemon_command() -> str:
    """Return the ExecStart command line of this test environment's cvmfs-syncd."""
    script = Path(sys.executable).parent / "cvmfs-syncd"
    if script.exists():
        return f"{script} run -c /etc/cvmfs-syncd/cvmfs-syncd.toml"
    return f"{sys.executable} -m cvmfs_syncd run -c /etc/cvmfs-syncd/cvmfs-syncd.toml"


def test_systemd_analyze_verify_accepts_unit(tmp_path: Path) -> None:
    """systemd-analyze verify reports no problem with the unit (ExecStart pointed here)."""
    analyze = shutil.which("systemd-analyze")
    require(analyze, "systemd-analyze not found; install the Debian package 'systemd'")
    assert analyze is not None
    text = UNIT.read_text()
    text, count = re.subn(r"(?m)^ExecStart=.*$", f"ExecStart={daemon_command()}", text)
    assert count == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # Other units on the host may draw warnings of their own; only ours must be clean.
    ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


def test_every_directive_is_explained_by_a_comment() -> None:
    """Each assignment line is directly preceded by a comment line saying why it is there."""
    lines = UNIT.read_text().splitlines()
    unexplained = [
        f"{number}: {key}"
        for number, key, _ in directives("\n".join(lines))
        if not lines[number - 2].lstrip().startswith("#")
    ]
    assert unexplained == []


def test_no_mount_namespace_or_no_new_privileges() -> None:
    """No option that hides cvmfs_server's mounts or blocks its setuid helper is set."""
    used = {key for _, key, _ in directives(UNIT.read_text())}
    assert used & FORBIDDEN == set()


def test_service_contract() -> None:
    """The unit is a notify service with the reload, kill, restart and state settings."""
    assert values("Type") == ["notify"]
    assert values("NotifyAccess") == ["main"]
    assert values("ExecStart") == [
        "/opt/cvmfs-syncd/bin/cvmfs-syncd run -c /etc/cvmfs-syncd/cvmfs-syncd.toml"
    ]
    assert values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values("KillMode") == ["mixed"]
    assert values("Restart") == ["on-failure"]
    assert values("StateDirectory") == ["cvmfs-syncd"]


def test_timeouts_agree_with_daemon_defaults() -> None:
    """The stop timeout outlasts the daemon's drain and stall limits; the watchdog is shorter."""
    defaults = DaemonConfig()
    (watchdog,) = values("WatchdogSec")
    (stop,) = values("TimeoutStopSec")
    assert seconds(stop) > defaults.stop_timeout_seconds
    assert seconds(stop) >= defaults.stall_seconds
    assert 0 < seconds(watchdog) < defaults.stall_seconds
