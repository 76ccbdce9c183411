"""Helpers for tests: waiting on conditions, tree snapshots, configurations for the fake."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cvmfs_syncd.lane import Lane
    from cvmfs_syncd.state import State
    from tests.fake_cvmfs.stratum0 import FakeStratum0

#: path -> (type, permission bits, content or link target), as staging and clients see it.
Tree = dict[str, tuple[str, int, bytes]]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def staging_tree(root: Path, *, ignore: Callable[[str], bool] = lambda _: False) -> Tree:
    """Return path -> (type, permission bits, content or link target) of a directory tree."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = os.fsdecode(os.path.relpath(full, root))
            if ignore(rel):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("symlink", 0o777, os.fsencode(os.readlink(full)))
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = ("file", stat.S_IMODE(st.st_mode) & 0o777, full.read_bytes())
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return tree


def client_tree(stratum0: FakeStratum0, repo: str, revision: int | None = None) -> Tree:
    """Return what a client sees of ``repo`` at ``revision`` (by default the latest) in the
    shape of :func:`staging_tree`, from ``FakeStratum0.published_tree``; mkfs's own
    ``new_repository`` file is left out. Raise OSError for a file a client cannot read."""
    tree: Tree = {}
    for path, entry in stratum0.published_tree(repo, revision).items():
        if path == "new_repository":
            continue
        if entry.type == "symlink":
            tree[path] = ("symlink", 0o777, os.fsencode(entry.target or ""))
        elif entry.type == "dir":
            tree[path] = ("dir", entry.mode & 0o7777, b"")
        elif entry.content is None:
            raise OSError(entry.error, f"a client cannot read {path} of {repo}", path)
        else:
            tree[path] = ("file", entry.mode & 0o777, entry.content)
    return tree


def config_head(
    *,
    state_dir: Path,
    server_command: Path | str,
    config_dir: Path,
    repo: str,
    metrics_address: str = "127.0.0.1:0",
    daemon_extra: str = "",
    repo_extra: str = "",
) -> str:
    """Return the [daemon], [cvmfs] and [[repository]] tables of a test configuration
    (short quiet periods, fast retries); a source table is appended by the caller."""
    return f"""
[daemon]
state_dir = "{state_dir}"
metrics_address = "{metrics_address}"
log_format = "json"
rescan_seconds = 30
stop_timeout_seconds = 60
{daemon_extra}

[cvmfs]
server_command = "{server_command}"
config_dir = "{config_dir}"
transaction_timeout_seconds = 20
publish_timeout_seconds = 60
command_timeout_seconds = 20

[[repository]]
name = "{repo}"
quiet_seconds = 0.2
max_batch_seconds = 2
retry_initial_seconds = 0.1
retry_max_seconds = 1
{repo_extra}
"""


def write_config(
    path: Path,
    *,
    state_dir: Path,
    server_command: Path | str,
    config_dir: Path,
    repo: str,
    staging: Path,
    metrics_address: str = "127.0.0.1:0",
    repo_extra: str = "",
    staging_extra: str = "",
    daemon_extra: str = "",
) -> Path:
    """Write a daemon configuration with one staging source for tests."""
    head = config_head(
        state_dir=state_dir,
        server_command=server_command,
        config_dir=config_dir,
        repo=repo,
        metrics_address=metrics_address,
        daemon_extra=daemon_extra,
        repo_extra=repo_extra,
    )
    path.write_text(
        head
        + f"""
  [[repository.staging]]
  path = "{staging}"
  target = "/"
  settle_seconds = 0.1
{staging_extra}
"""
    )
    return path


def reference_dir() -> Path:
    """Where the recordings of the real CVMFS tools are: ``$CVMFS_REFERENCE_DIR``, else the
    ``shared/cvmfs-reference`` folder beside the checkout (as CI lays it out)."""
    explicit = os.environ.get("CVMFS_REFERENCE_DIR")
    if explicit:
        return Path(explicit)
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "cvmfs-reference"
    return beside if beside.is_dir() else Path("/work/shared/cvmfs-reference")


def require(available: object, why: str) -> None:
    """Skip the calling test when ``available`` is falsy — but fail it under CI
    (``CI=true``): there ``.ci/run`` installs every checker and the recordings are laid
    beside the checkout, so a missing one is a broken set-up, not a reason to skip."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required under CI: {why}")
    pytest.skip(why)


def needs(available: object, why: str) -> pytest.MarkDecorator:
    """A module's ``pytestmark``: skip its tests when ``available`` is falsy, except under
    CI, where a missing input (the recordings) stops the run at collection instead."""
    if not available and os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(f"required under CI: {why}")
    return pytest.mark.skipif(not available, reason=why)


def close_lanes(built: Iterable[tuple[Lane, State]]) -> None:
    """Tear down lanes a test built (stopping one that runs), their sources, lock and state."""
    for lane, state in built:
        if lane.is_alive():
            lane.request_stop()
            lane.join(timeout=60)
        for source in lane.inputs:
            source.stop()
        lane.lock.release()
        state.close()
