"""The processes the commands run as, and finding them again after a restart.

Every command gets a filtered environment (:func:`command_environment`), a working
directory outside /cvmfs (:func:`safe_cwd`), the umask :data:`COMMAND_UMASK` and, for a
batch's commands, the tag :data:`COMMAND_TAG_VARIABLE` that its children inherit.  A
daemon that was killed leaves tagged processes behind; :func:`stop_tagged` stops them
at the next start, and :func:`boot_id` tells whether recorded process ids still mean
anything.  :mod:`cvmfs_syncd.cvmfs.server` starts the commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from cvmfs_syncd.errors import CvmfsCommandError

log = structlog.get_logger(__name__)

INHERITED_ENV_NAMES = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "TMPDIR")
"""Variables passed on from the daemon's environment (plus every ``LC_*``)."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` used when the daemon has none: ``cvmfs_server`` needs the sbin directories."""


def command_environment(
    base: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Given the daemon's environment and explicit additions, return the commands' environment.

    Only :data:`INHERITED_ENV_NAMES` and ``LC_*`` are kept: nothing that would
    change how the tools behave comes through (``CVMFS_*`` overrides, ``LD_PRELOAD``
    and ``LD_LIBRARY_PATH``, the shell's ``ENV``/``BASH_ENV`` start-up files,
    ``IFS``, Python variables).  ``PATH`` falls back to :data:`DEFAULT_PATH`.
    ``extra`` is added last, verbatim.  Pure.
    """
    env = {
        key: value
        for key, value in base.items()
        if key in INHERITED_ENV_NAMES or key.startswith("LC_")
    }
    env.setdefault("PATH", DEFAULT_PATH)
    if extra:
        env.update(extra)
    return env


FORBIDDEN_CWD_ROOT = "/cvmfs"
"""Commands never run with a working directory at or below this path (``CWD_INSIDE``)."""


def safe_cwd(cwd: str) -> str:
    """Return ``cwd`` normalised; raise :class:`CvmfsCommandError` unless it is an absolute
    directory outside :data:`FORBIDDEN_CWD_ROOT` (also after resolving symlinks)."""
    path = Path(cwd)
    if not path.is_absolute():
        raise CvmfsCommandError(f"the commands' working directory must be absolute: {cwd!r}")
    normal = os.path.normpath(cwd)
    forbidden = Path(FORBIDDEN_CWD_ROOT)
    for candidate in (Path(normal), path.resolve()):
        if candidate == forbidden or forbidden in candidate.parents:
            raise CvmfsCommandError(
                f"the commands' working directory {cwd!r} is inside {FORBIDDEN_CWD_ROOT}: "
                "publish and abort refuse to run there"
            )
    if not path.is_dir():
        raise CvmfsCommandError(f"the commands' working directory {cwd!r} is not a directory")
    return normal


#: The environment variable that tags every process of a batch's command (faults.md F7-F9).
COMMAND_TAG_VARIABLE = "CVMFS_SYNCD_BATCH"

#: The umask every command runs with, and the daemon's own (faults.md F4).
COMMAND_UMASK = 0o022


def tagged_processes(tag: str) -> list[int]:
    """Return the processes whose environment carries ``tag`` (a command a daemon started,
    and every child of it: ``sync``, ``jq``, a ``publish`` in its own session)."""
    needle = f"{COMMAND_TAG_VARIABLE}={tag}".encode()
    found = []
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue  # gone, or a kernel thread
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def stop_tagged(tag: str, *, term_seconds: float = 30.0, kill_seconds: float = 10.0) -> list[int]:
    """Stop every process carrying ``tag``: SIGTERM, then SIGKILL what is left after
    ``term_seconds`` (a flushing ``sync`` takes seconds, F7), then wait ``kill_seconds``.
    Return the processes still alive (none, normally; a process stuck in the kernel may
    survive SIGKILL for a while)."""
    pids = tagged_processes(tag)
    if not pids:
        return []
    log.warning("stopping commands left by the previous run", tag=tag, pids=pids)
    for signum, wait in ((signal.SIGTERM, term_seconds), (signal.SIGKILL, kill_seconds)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = tagged_processes(tag)
        if not pids:
            return []
    return pids


def boot_id() -> str:
    """Return this boot's identity (process ids are only meaningful within one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""
