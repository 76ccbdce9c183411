"""Tests of the command line: check-config, release, version, locking of one-shot commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cvmfs_syncd import __version__
from cvmfs_syncd.cli import main, print_lane, print_maintenance
from cvmfs_syncd.locking import RepositoryLock
from cvmfs_syncd.state import State
from tests.fake_cvmfs.stratum0 import FakeStratum0
from tests.support import write_config

REPO = "cli.example.org"

pytestmark = pytest.mark.stratum0(REPO)


def _config(tmp_path: Path, stratum0: FakeStratum0 | None = None) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    return write_config(
        tmp_path / "c.toml",
        state_dir=tmp_path / "state",
        server_command=stratum0.server_command if stratum0 else "/nonexistent/cvmfs_server",
        config_dir=stratum0.config_dir if stratum0 else tmp_path / "etc-cvmfs",
        repo=REPO,
        staging=staging,
    )


def test_check_config_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config lists all problems with key paths and exits 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[daemon]\nstate_dir = "rel"\n[[repository]]\nname = "x.org"\nquiet_seconds = "soon"\n'
        '  [[repository.staging]]\n  path = "also-rel"\n'
    )
    assert main(["check-config", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "daemon.state_dir" in err
    assert "repository[0].quiet_seconds" in err
    assert "repository[0].staging[0].path" in err


def test_check_config_needs_the_repository_on_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repository without server.conf under config_dir is an error naming the key."""
    assert main(["check-config", "-c", str(_config(tmp_path))]) == 2
    assert "repository[0].name" in capsys.readouterr().err


def test_check_config_accepts_a_valid_setup(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid configuration with an existing repository passes."""
    assert main(["check-config", "-c", str(_config(tmp_path, stratum0))]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_explains_a_gateway_publisher(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind a gateway check-config says how the repository is served and what is off."""
    upstream = f"gw,/srv/cvmfs/{REPO}/data/txn,http://gateway.example:4929/api/v1"
    stratum0.set_config(REPO, "CVMFS_UPSTREAM_STORAGE", upstream)
    assert main(["check-config", "-c", str(_config(tmp_path, stratum0))]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}: gateway publisher through http://gateway.example:4929/api/v1" in out
    assert "copied through the transaction" in out
    assert "resign, gc and tag cleanup are off" in out


def test_check_config_names_a_maintenance_only_repository(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repository with no inputs is valid: the daemon only maintains it (the gateway host)."""
    path = tmp_path / "m.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[cvmfs]\nconfig_dir = "{stratum0.config_dir}"\n'
        f'[[repository]]\nname = "{REPO}"\n'
    )
    assert main(["check-config", "-c", str(path)]) == 0
    assert f"{REPO}: no inputs: maintenance only" in capsys.readouterr().out


def test_check_config_refuses_world_readable_s3_credentials(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """An S3 credentials file readable by other users is refused."""
    creds = tmp_path / "creds"
    creds.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n")
    creds.chmod(0o644)
    path = _config(tmp_path, stratum0)
    text = path.read_text().replace(
        "  [[repository.staging]]",
        "  [[repository.s3]]\n"
        f'  bucket = "b"\n  target = "/ci"\n  credentials_file = "{creds}"\n\n'
        "  [[repository.staging]]",
        1,
    )
    path.write_text(text.replace('target = "/"', 'target = "/sw"'))
    assert main(["check-config", "-c", str(path)]) == 2
    assert "readable by other users" in capsys.readouterr().err
    creds.chmod(0o600)
    assert main(["check-config", "-c", str(path)]) == 0


def test_release_records_a_confirmation(tmp_path: Path) -> None:
    """release stores a confirmation that a lane consumes once; unknown repositories fail."""
    path = _config(tmp_path)
    assert main(["release", "-c", str(path), REPO]) == 0
    assert main(["release", "-c", str(path), "nope.org"]) == 2
    state = State(tmp_path / "state")
    assert state.take_release(REPO)
    assert not state.take_release(REPO)
    state.close()


def test_version_and_module_entry_point() -> None:
    """`python -m cvmfs_syncd --version` prints the version."""
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_syncd", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_sync_waits_for_the_repository_lock(
    tmp_path: Path, stratum0: FakeStratum0, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-shot sync waits (publishing nothing) while another process holds the lock."""
    import fcntl

    path = _config(tmp_path, stratum0)
    (tmp_path / "staging" / "f").write_text("f")
    lock = RepositoryLock(tmp_path / "state", REPO)
    assert lock.acquire(timeout=5)
    blocked = threading.Event()
    real_flock = fcntl.flock

    def observed_flock(fd: int, operation: int) -> None:
        try:
            real_flock(fd, operation)
        except BlockingIOError:
            blocked.set()
            raise

    monkeypatch.setattr(fcntl, "flock", observed_flock)
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(main(["sync", "-c", str(path), "--timeout", "60"]))
    )
    worker.start()
    try:
        assert blocked.wait(30), "sync never tried the lock"
        assert stratum0.revision(REPO) == 1
        assert worker.is_alive()
    finally:
        lock.release()
    worker.join(timeout=60)
    assert results == [0]
    assert "f" in stratum0.published_tree(REPO)


def _tree_snapshot(top: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``top`` with its size and mtime (to prove nothing was written)."""
    if not top.exists():
        return {}
    return {
        str(p.relative_to(top)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in top.rglob("*")
    }


def test_sync_dry_run_prints_the_plan_and_changes_nothing(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run --json prints the ops per source, the bytes to prepare, what is held or
    refused, and the revisions the caps cut the batch into; it opens no transaction, writes
    no object, takes no lock and writes nothing under state_dir, even with a journal there."""
    import json

    path = _config(tmp_path, stratum0)
    staging = tmp_path / "staging"
    (staging / "old").write_text("published before")
    assert main(["sync", "-c", str(path), "--timeout", "60"]) == 0
    capsys.readouterr()
    (staging / "sub").mkdir()
    for i in range(3):
        (staging / "sub" / f"f{i}").write_bytes(b"x" * (10 + i))
    for settled in ("f0", "f1", "f2"):
        os.utime(staging / "sub" / settled, (1, 1))
    writing = (staging / "sub" / "f2").open("ab")  # still open for writing: deferred
    (staging / ".cvmfscatalog").write_text("reserved")
    (staging / "old").unlink()
    state_before = _tree_snapshot(tmp_path / "state")
    storage_before = _tree_snapshot(stratum0.storage_dir(REPO))
    revision = stratum0.revision(REPO)
    assert main(["sync", "-c", str(path), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [repo] = report["repositories"]
    [source] = repo["sources"]
    assert source["ops"] == {"graft": 2, "mkdir": 1, "delete": 1}
    assert source["bytes_to_prepare"] == 10 + 11
    assert source["deferred"] == ["sub/f2"]
    assert [r["path"] for r in source["refused"]] == [".cvmfscatalog"]
    assert repo["revisions"] == [4]
    assert stratum0.revision(REPO) == revision
    assert not stratum0.in_transaction(REPO)
    assert _tree_snapshot(tmp_path / "state") == state_before
    assert _tree_snapshot(stratum0.storage_dir(REPO)) == storage_before
    assert main(["sync", "-c", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 revision(s)" in text
    assert "21 bytes to prepare" in text
    writing.close()


def test_sync_exits_4_when_its_deadline_expires_with_a_batch_unfinished(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """sync --timeout bounds publish retries; the exit code (4) differs from 'not in sync'
    (1) so that cron and CI can tell a deadline from a held batch."""
    from cvmfs_syncd.cli import EXIT_DEADLINE

    path = _config(tmp_path, stratum0)
    (tmp_path / "staging" / "f").write_text("f")
    stratum0.inject_fault("publish", "fail")
    assert main(["sync", "-c", str(path), "--timeout", "2"]) == EXIT_DEADLINE == 4
    assert "deadline reached" in capsys.readouterr().err
    assert not stratum0.in_transaction(REPO)


def test_status_without_a_daemon_reports_the_last_publish_from_the_journal(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a host that publishes with a cron `sync`, status says when the last publish was
    (from the journal), not "never", and writes nothing under state_dir."""
    path = _config(tmp_path, stratum0)
    (tmp_path / "staging" / "f").write_text("f")
    assert main(["sync", "-c", str(path), "--timeout", "60"]) == 0
    capsys.readouterr()
    before = _tree_snapshot(tmp_path / "state")
    assert main(["status", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no daemon answering" in out
    assert f"{REPO}: last publish" in out and "never" not in out
    assert f"(revision {stratum0.revision(REPO)})" in out
    assert _tree_snapshot(tmp_path / "state") == before


def test_a_restarted_lane_reports_its_last_publish(tmp_path: Path, stratum0: FakeStratum0) -> None:
    """/status of a freshly started daemon shows the journal's last publish."""
    from cvmfs_syncd import config as config_mod
    from cvmfs_syncd.metrics import Metrics
    from cvmfs_syncd.service import build_lane, make_server

    path = _config(tmp_path, stratum0)
    (tmp_path / "staging" / "f").write_text("f")
    assert main(["sync", "-c", str(path), "--timeout", "60"]) == 0
    config = config_mod.load(path)
    state = State(config.daemon.state_dir)
    try:
        lane = build_lane(config, config.repositories[0], state, Metrics(), make_server(config))
        status = lane.status()
        assert status.last_publish_at is not None
        assert status.last_revision == stratum0.revision(REPO)
    finally:
        state.close()


def test_status_shows_the_gateway_lease_and_what_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    """Behind a gateway ``status`` shows the lease held with its time left, and which
    maintenance tasks this host leaves to the gateway host and why."""
    print_lane(
        REPO,
        {"state": "publishing", "lease": {"path": "sw/a", "expires_at": 1100.0}},
        now=1000.0,
    )
    print_maintenance(
        REPO,
        {"gateway_publisher": {"off": ["resign", "gc", "tag cleanup"], "why": "a publisher"}},
    )
    out = capsys.readouterr().out
    assert "gateway lease on sw/a: 100 s left" in out
    assert "gateway publisher: resign, gc, tag cleanup off (a publisher)" in out


def test_check_config_refuses_tarball_ingest_on_a_gateway_publisher(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ingest through a gateway is not recorded: check-config names the key and says why."""
    upstream = f"gw,/srv/cvmfs/{REPO}/data/txn,http://gateway.example:4929/api/v1"
    stratum0.set_config(REPO, "CVMFS_UPSTREAM_STORAGE", upstream)
    path = _config(tmp_path, stratum0)
    path.write_text(path.read_text() + '  tarballs = "ingest"\n')
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "repository[0].staging[0].tarballs" in err
    assert "not recorded" in err


def test_check_config_names_the_gateway_host(
    tmp_path: Path, stratum0: FakeStratum0, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the host whose gateway serves the repository, check-config says gc is off there."""
    gateway_conf = stratum0.config_dir / "gateway" / "repo.json"
    gateway_conf.parent.mkdir(parents=True, exist_ok=True)
    gateway_conf.write_text(json.dumps({"version": 2, "repos": [{"domain": REPO, "keys": []}]}))
    assert main(["check-config", "-c", str(_config(tmp_path, stratum0))]) == 0
    assert f"{REPO}: gateway host: gc and tag cleanup are off" in capsys.readouterr().out
