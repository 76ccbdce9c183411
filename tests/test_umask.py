"""faults.md F4: a restrictive umask of the caller must not reach the storage."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.storage import unreadable_objects
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "umask.example.org"


def test_commands_run_with_umask_022_whatever_the_callers() -> None:
    """Every cvmfs command starts with umask 022, also from a 027 shell."""
    server = CvmfsServer(("/bin/sh", "-c", "umask; exit 0", "sh"), ("/bin/true",))
    old = os.umask(0o027)
    try:
        result = server.info(REPO)
    finally:
        os.umask(old)
    assert result.stdout.strip() == "0022"


@pytest.mark.stratum0(REPO)
def test_a_sync_from_a_027_shell_leaves_every_object_world_readable(
    tmp_path: Path, stratum0: FakeStratum0, staging: Path
) -> None:
    """The daemon's own objects and those its commands write are 0644 (clients read them
    through a web server that is neither owner nor group)."""
    (staging / "sub").mkdir()
    (staging / "sub" / "prepared.txt").write_text("prepared before the transaction\n")
    (staging / "copied.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # above min chunk
    config = write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command,
        config_dir=stratum0.config_dir,
        repo=REPO,
        staging=staging,
        metrics_address="",
    )
    result = subprocess.run(
        [
            "/bin/sh",
            "-c",
            'umask 027 && exec "$0" -m cvmfs_syncd sync -c "$1"',
            sys.executable,
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = stratum0.storage_dir(REPO) / "data"
    objects = [p for p in data.glob("??/*") if p.is_file()]
    assert objects
    assert [p for p in objects if not p.stat().st_mode & stat.S_IROTH] == []
    tree = stratum0.published_tree(REPO)
    assert tree["sub/prepared.txt"].grafted and not tree["copied.bin"].grafted


def test_unreadable_objects_are_reported_never_changed(tmp_path: Path) -> None:
    """The start-up sample names objects others cannot read and leaves their mode alone."""
    data = tmp_path / "data"
    (data / "ab").mkdir(parents=True)
    (data / "cd").mkdir()
    good = data / "ab" / ("1" * 38)
    bad = data / "cd" / ("2" * 38 + "P")
    good.write_bytes(b"x")
    bad.write_bytes(b"y")
    good.chmod(0o644)
    bad.chmod(0o640)
    seen, unreadable = unreadable_objects(tmp_path)
    assert seen == 2
    assert unreadable == [f"data/cd/{'2' * 38}P"]
    assert stat.S_IMODE(bad.stat().st_mode) == 0o640
