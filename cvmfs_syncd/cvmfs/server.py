"""The one door to ``cvmfs_server`` and ``cvmfs_swissknife``: argv as data, outcomes as names.

Every subprocess cvmfs-syncd starts is started here.  Each call:

* builds its argv as a tuple from a configurable prefix (``server_command``,
  ``swissknife_command``) and validated arguments, never through a shell;
* runs with stdin at EOF, an explicit safe working directory, a filtered
  environment and a timeout, in a process group of its own that is killed whole
  when the timeout expires;
* captures stdout and stderr (``cvmfs_server`` prints many errors on stdout) and
  maps exit code and text to a named :class:`Outcome` with :func:`classify`;
* returns a frozen :class:`CommandResult`.  Ordinary command failures are
  results, not exceptions; :class:`~cvmfs_syncd.errors.CvmfsCommandError` is
  raised only for programming or configuration errors (an invalid argument, a
  command that cannot be started).

The mapping is specified by the recordings of the real CernVM-FS 2.12.0 tools;
``docs/failures.md`` lists every outcome with its evidence and what the daemon
does about it.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from cvmfs_syncd.errors import CvmfsCommandError

log = structlog.get_logger(__name__)


class Outcome(enum.StrEnum):
    """What a ``cvmfs_server`` (or ``cvmfs_swissknife``) call amounted to."""

    OK = "ok"
    """Exit code 0."""
    ALREADY_IN_TRANSACTION = "already_in_transaction"
    """``transaction`` exit 17: a transaction (ours, an operator's or gc's) is open."""
    NOT_IN_TRANSACTION = "not_in_transaction"
    """``publish`` exit 1 / ``abort`` exit 22: no transaction is open."""
    OPEN_WRITERS = "open_writers"
    """``publish`` refused: a process holds a file under /cvmfs/R open for writing."""
    OPEN_READERS = "open_readers"
    """``publish`` without ``-f`` stopped at its read-only file descriptor prompt."""
    CWD_INSIDE = "cwd_inside"
    """``publish``/``abort`` refused: the working directory is inside /cvmfs/R."""
    WHITELIST_EXPIRED = "whitelist_expired"
    """The repository whitelist has expired; only ``resign`` recovers."""
    WHITELIST_MALFORMED = "whitelist_malformed"
    """The whitelist cannot be parsed (e.g. written by ``resign -d abc``); ``resign`` recovers."""
    WHITELIST_UNREACHABLE = "whitelist_unreachable"
    """The whitelist could not be downloaded from the stratum 0 (storage endpoint down)."""
    STORAGE_UNREACHABLE = "storage_unreachable"
    """The storage endpoint failed during ``publish`` (refused, hung, died mid-upload)."""
    INVALID_GRAFT = "invalid_graft"
    """``publish`` PANICked on a graft file with invalid grafting information."""
    NOT_MOUNTED = "not_mounted"
    """A mount is missing and auto-repair is off; ``mount`` repairs it."""
    CANNOT_REPAIR = "cannot_repair"
    """The union mount vanished during a transaction; only ``abort`` repairs it."""
    GC_NOT_ENABLED = "gc_not_enabled"
    """``gc`` on a repository without ``CVMFS_GARBAGE_COLLECTION``."""
    GC_IN_TRANSACTION = "gc_in_transaction"
    """``gc`` refused because a transaction is open."""
    NO_SUCH_REPOSITORY = "no_such_repository"
    """The named repository does not exist on this host."""
    PATH_SCOPE_MISSING = "path_scope_missing"
    """``transaction R/path`` exit 2: the parent of the scope path does not exist.

    No transaction is open afterwards.  On a gateway publisher the lease was granted
    and dropped again before this check (gateway.md surprise 1, p_gateway_basic 1, 26).
    """
    LEASE_BUSY = "lease_busy"
    """``transaction`` exit 16 on a gateway publisher: another publisher holds a lease on
    the same path, a parent or a nested one (gateway.md surprises 5-7; p_gateway_conflict
    2-6, p_gateway_down 14).  Nothing was opened here; the other lease has
    ``lease_time_remaining_s`` left."""
    LEASE_INVALID = "lease_invalid"
    """``publish`` on a gateway publisher: the gateway no longer knows our lease (it expired,
    perhaps taken by another publisher since).  The transaction stays open and a retry
    fails the same way; only ``abort -f`` recovers (gateway.md surprises 14, 15;
    p_gateway_lease_expiry 5, 8, 17)."""
    GATEWAY_UNREACHABLE = "gateway_unreachable"
    """The repository gateway could not be reached (a curl error): ``transaction`` opened
    nothing, a ``publish`` left its transaction open, an ``abort -f`` (exit 5) could not
    drop the lease and left the transaction open (gateway.md surprises 16, 17;
    p_gateway_down 2, 10, 11)."""
    GATEWAY_UNSUPPORTED = "gateway_unsupported"
    """``tag -a``/``tag -r``, ``rollback``, ``resign`` (exit 134) or ``gc`` on a gateway
    publisher: they need a session token a publisher only has inside a transaction, so they
    never work there (gateway.md surprise 19; p_gateway_maintenance 4, 6, 9-12, 19, 21)."""
    REFLOG_MISSING = "reflog_missing"
    """``gc`` cannot read the repository's reflog checksum (none in the spool): seen on the
    second publisher of a gateway repository (gateway.md surprise 19; p_gateway_maintenance
    20)."""
    ARCHIVE_UNREADABLE = "archive_unreadable"
    """``ingest`` could not read the archive: truncated, or not an archive at all.  Nothing
    was published and no transaction is left open (gateway.md surprise 27; m2_ingest 51,
    56)."""
    ARCHIVE_HARDLINK_OUTSIDE = "archive_hardlink_outside"
    """``ingest`` aborted on a hard link whose target is not in the archive (e.g.
    ``/etc/passwd``).  Nothing was published and no transaction is left open (gateway.md
    surprise 25; m2_ingest 26)."""
    UNDO_TAG_PROTECTED = "undo_tag_protected"
    """``tag -r`` of ``trunk``/``trunk-previous``: nothing was removed."""
    PROMPT_DECLINED = "prompt_declined"
    """The command asked for confirmation and read "no" (or EOF) on stdin."""
    CHECK_FAILED = "check_failed"
    """``check`` found missing or corrupted objects or catalogs."""
    TIMEOUT = "timeout"
    """No exit within the call's timeout; the whole process group was killed."""
    FAILED = "failed"
    """Any other non-zero exit."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """One line of the outcome table: all given conditions must hold."""

    outcome: Outcome
    pattern: re.Pattern[str] | None = None
    subcommand: str | None = None
    exit_code: int | None = None

    def matches(self, subcommand: str, exit_code: int, text: str) -> bool:
        """Return whether this rule applies to a non-zero exit with the given text."""
        if self.subcommand is not None and self.subcommand != subcommand:
            return False
        if self.exit_code is not None and self.exit_code != exit_code:
            return False
        return self.pattern is None or self.pattern.search(text) is not None


def _p(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.MULTILINE)


# Order matters: the first rule that matches wins.  Messages that name the cause
# precisely come before messages that several causes share (an expired whitelist
# makes `publish` fail before it looks at the transaction; a remount note on stderr
# accompanies an otherwise ordinary "not in a transaction").
_RULES: tuple[_Rule, ...] = (
    _Rule(Outcome.NO_SUCH_REPOSITORY, _p(r"The repository \S+ does not exist")),
    _Rule(Outcome.CWD_INSIDE, _p(r"Current working directory is in /cvmfs/")),
    _Rule(
        Outcome.WHITELIST_EXPIRED,
        _p(
            r"\[expired whitelist\]"
            r"|Repository whitelist for \S+ is expired"
            r"|failed to fetch repository manifest \(8 - bad whitelist\)"
        ),
    ),
    _Rule(Outcome.WHITELIST_MALFORMED, _p(r"\[malformed whitelist\]")),
    _Rule(Outcome.WHITELIST_UNREACHABLE, _p(r"\[failed to download whitelist\]")),
    _Rule(Outcome.GC_IN_TRANSACTION, _p(r"Cannot run garbage collection while in a transaction")),
    _Rule(Outcome.GC_NOT_ENABLED, _p(r"Garbage Collection is not enabled")),
    _Rule(Outcome.ALREADY_IN_TRANSACTION, _p(r"another transaction is already open")),
    _Rule(Outcome.ALREADY_IN_TRANSACTION, subcommand="transaction", exit_code=17),
    _Rule(Outcome.PATH_SCOPE_MISSING, _p(r"cannot open transaction on non-existing path")),
    # The final error line, not the "Path busy. Time remaining" notes: `transaction -t`
    # prints those while it retries and may still get the lease in the end.
    _Rule(Outcome.LEASE_BUSY, _p(r"transaction error: lease path busy")),
    _Rule(Outcome.LEASE_BUSY, subcommand="transaction", exit_code=16),
    _Rule(
        Outcome.GATEWAY_UNREACHABLE,
        _p(
            r"Make lease (?:acquire|drop) request failed: \d+"
            r"|SessionContext::\w+ - curl_easy_perform failed: \d+"
        ),
    ),
    _Rule(
        Outcome.LEASE_INVALID,
        _p(r'"reason"\s*:\s*"invalid lease"' r"|Error from gateway: 'invalid lease'"),
    ),
    *(
        _Rule(
            Outcome.GATEWAY_UNSUPPORTED,
            _p(
                r"Session token file has to be provided when upstream type is gw"
                r"|Failed to configure gateway uploader\. Missing session token file"
            ),
            subcommand=maintenance,
        )
        for maintenance in ("tag", "rollback", "resign", "gc")
    ),
    _Rule(Outcome.REFLOG_MISSING, _p(r"Could not read reflog checksum")),
    _Rule(
        Outcome.ARCHIVE_UNREADABLE,
        _p(
            r"Unrecognized archive format"
            r"|Truncated tar archive"
            r"|failed to read data from the tar entry"
        ),
        subcommand="ingest",
    ),
    _Rule(
        Outcome.ARCHIVE_HARDLINK_OUTSIDE,
        _p(r"catalog for file '.*' cannot be found"),
        subcommand="ingest",
    ),
    _Rule(
        Outcome.CANNOT_REPAIR,
        _p(r"is in a transaction but \S+ is not mounted read/write|and cannot be repaired"),
    ),
    _Rule(
        Outcome.NOT_MOUNTED,
        _p(r"Auto-Repair is disabled|cannot establish writable mountpoint"),
    ),
    _Rule(Outcome.NOT_IN_TRANSACTION, _p(r"Repository \S+ is not in a transaction")),
    _Rule(Outcome.NOT_IN_TRANSACTION, subcommand="abort", exit_code=22),
    _Rule(Outcome.OPEN_WRITERS, _p(r"Open writable file descriptors on ")),
    _Rule(Outcome.OPEN_READERS, _p(r"open read-only file descriptors in ")),
    _Rule(
        Outcome.STORAGE_UNREACHABLE,
        _p(
            r"Repository unavailable under "
            r"|host connection problem"
            r"|HTTP transfer error"
            r"|\(\d+ - network failure\)"
        ),
    ),
    _Rule(Outcome.INVALID_GRAFT, _p(r"with invalid grafting information")),
    _Rule(
        Outcome.UNDO_TAG_PROTECTED, _p(r"undo tags are handled internally and cannot be deleted")
    ),
    _Rule(Outcome.PROMPT_DECLINED, _p(r"YOU ARE ABOUT TO DELETE DATA!")),
    _Rule(Outcome.PROMPT_DECLINED, _p(r"Are you sure \(y/N\)\?"), subcommand="abort", exit_code=4),
    _Rule(
        Outcome.CHECK_FAILED,
        _p(
            r"CATALOG PROBLEMS OR OTHER ERRORS FOUND"
            r"|^FAIL!$"
            r"|mismatch of file name and content hash"
            r"|^(?:partial )?data chunk \S+ .* missing$"
        ),
        subcommand="check",
    ),
)


def classify(subcommand: str, exit_code: int | None, stdout: str, stderr: str) -> Outcome:
    """Given a subcommand (``"publish"``), its exit code and output, return its :class:`Outcome`.

    ``exit_code`` is ``None`` when the command did not exit on its own (it was
    killed on timeout): that is :attr:`Outcome.TIMEOUT`.  Exit code 0 is always
    :attr:`Outcome.OK`.  Otherwise stdout and stderr are searched together, in the
    order of the rule table, and :attr:`Outcome.FAILED` is the fallback.  Pure.
    """
    if exit_code is None:
        return Outcome.TIMEOUT
    if exit_code == 0:
        return Outcome.OK
    text = f"{stdout}\n{stderr}"
    for rule in _RULES:
        if rule.matches(subcommand, exit_code, text):
            return rule.outcome
    return Outcome.FAILED


_NOISE = re.compile(
    r"^(?:\S+: \d+: eval: \[\[: not found"  # dash running a bash-ism in cvmfs_server
    r"|terminate called after throwing an instance of .*"
    r"|Stacktrace:|/\S+\(\S*\) \[0x[0-9a-f]+\])$"
)


def explain(outcome: Outcome, stdout: str, stderr: str) -> str:
    """Given an outcome and the output it came from, return the one line that best says why.

    For a classified failure this is the first line that matched the outcome's rule;
    otherwise the first line of stderr that is not shell or stack-trace noise (else
    the last line of stdout); ``""`` for :attr:`Outcome.OK` and
    :attr:`Outcome.TIMEOUT`.  Pure.
    """
    if outcome in (Outcome.OK, Outcome.TIMEOUT):
        return ""
    text = f"{stdout}\n{stderr}"
    for rule in _RULES:
        if rule.outcome is outcome and rule.pattern is not None:
            match = rule.pattern.search(text)
            if match is not None:
                start = text.rfind("\n", 0, match.start()) + 1
                end = text.find("\n", match.end())
                return text[start : end if end != -1 else len(text)].strip()
    for raw in stderr.splitlines():
        line = raw.strip()
        if line and not _NOISE.match(line):
            return line
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""


_LSOF_HEADER = re.compile(r"lsof report might show")
_LSOF_ENTRY = re.compile(r"^(?P<command>\S+)\s+(?P<pid>\d+)\s+\S+\s+(?P<name>/.*\S)\s*$")
_FD_MOUNTPOINT = re.compile(
    r"open read-only file descriptors in (?P<a>/\S+)|Open file descriptors on (?P<b>/\S+)"
)


def parse_open_file_holders(stdout: str) -> tuple[str, ...]:
    """Given ``publish``'s stdout, return the processes its lsof report names, as text.

    ``publish`` prints an lsof report after its read-only file descriptor warning
    (both the prompting form and the ``-f`` form).  Each holder is returned once as
    ``"<command>[<pid>] <path>"``.  Entries outside the mount point the warning
    names (the FUSE client's own cache files) are dropped unless nothing else is
    left.  Returns ``()`` when there is no report.  Pure.
    """
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if _LSOF_HEADER.search(line)), None)
    if start is None:
        return ()
    mount = _FD_MOUNTPOINT.search(stdout)
    mountpoint = (mount.group("a") or mount.group("b")).rstrip("!") if mount else None
    entries: list[tuple[str, str, str]] = []
    for line in lines[start + 1 :]:
        match = _LSOF_ENTRY.match(line)
        if match is None:
            if entries and not line.strip():
                break
            continue
        entry = (match["command"], match["pid"], match["name"])
        if entry not in entries:
            entries.append(entry)
    if mountpoint is not None:
        inside = [
            e
            for e in entries
            if e[2] == mountpoint or e[2].startswith(mountpoint.rstrip("/") + "/")
        ]
        entries = inside or entries
    return tuple(f"{command}[{pid}] {name}" for command, pid, name in entries)


_GRAFT_PATH = re.compile(r"Encountered a grafted file \((?P<path>.+?)\) with invalid grafting")


def parse_invalid_graft_path(stderr: str) -> str | None:
    """Given ``publish``'s stderr, return the repository-relative path of the rejected graft.

    The PANIC names the placeholder, e.g. ``g/bad_size.bin``; ``None`` when absent.  Pure.
    """
    match = _GRAFT_PATH.search(stderr)
    return match["path"] if match else None


_LEASE_BUSY_NOTE = re.compile(r"^Path busy\. Time remaining = (\S+)[ \t]*$", re.MULTILINE)
# Go's time.Duration.String(): "29.76s", "1m30.5s", "2h0m0s", "850ms", "1.5\u00b5s".
_GO_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
}
_GO_PART = r"(\d+(?:\.\d*)?)(" + "|".join(_GO_UNIT_SECONDS) + ")"  # "ms" before "m", "s"
_GO_DURATION = re.compile(f"(?:{_GO_PART})+")
_GO_DURATION_PART = re.compile(_GO_PART)


def parse_lease_time_remaining(stdout: str) -> float | None:
    """Given ``transaction``'s stdout on a gateway publisher, return the busy lease's time left.

    The gateway refuses a conflicting lease with ``Path busy. Time remaining = 29.76s``
    (a Go duration, e.g. ``1m30.5s`` or ``850ms``); ``transaction -t`` prints one such line
    per attempt, and the last one counts.  Returns seconds, or ``None`` when there is no
    such line or its duration cannot be read.  Pure.
    """
    notes = _LEASE_BUSY_NOTE.findall(stdout)
    if not notes:
        return None
    duration = notes[-1]
    if _GO_DURATION.fullmatch(duration) is None:
        return None
    return sum(
        float(value) * _GO_UNIT_SECONDS[unit] for value, unit in _GO_DURATION_PART.findall(duration)
    )


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What one command did: the raw facts and their classification.

    ``exit_code`` is the raw return code (negative when a signal ended the process,
    e.g. after a timeout kill).  ``open_file_holders`` is filled from ``publish``'s
    lsof report; ``invalid_graft_path`` from an :attr:`Outcome.INVALID_GRAFT` PANIC;
    ``lease_time_remaining_s`` from the gateway's note of an :attr:`Outcome.LEASE_BUSY`.
    """

    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    outcome: Outcome
    reason: str = ""
    open_file_holders: tuple[str, ...] = ()
    invalid_graft_path: str | None = None
    lease_time_remaining_s: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the command succeeded (:attr:`Outcome.OK`)."""
        return self.outcome is Outcome.OK


_UNDO_TAGS = frozenset({"trunk", "trunk-previous"})
_AUTO_TAG = re.compile(r"^generic(?:_\d+)?-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@dataclass(frozen=True, slots=True)
class Tag:
    """One entry of a repository's tag database (``cvmfs_server tag -lx``)."""

    name: str
    root_hash: str
    size_bytes: int
    revision: int
    timestamp: datetime
    branch: str
    description: str

    @property
    def is_undo_tag(self) -> bool:
        """Whether this is ``trunk``/``trunk-previous``, which cannot be removed."""
        return self.name in _UNDO_TAGS

    @property
    def is_auto_tag(self) -> bool:
        """Whether ``publish`` created this tag automatically (``generic[_N]-<UTC time>``)."""
        return _AUTO_TAG.match(self.name) is not None


_TAG_LINE = re.compile(
    r"^(?P<name>\S+) (?P<hash>[0-9a-f]+(?:-[a-z0-9]+)?) (?P<size>\d+) (?P<revision>\d+)"
    r" (?P<timestamp>\d+) \((?P<branch>[^)]*)\)(?: (?P<description>.*))?$"
)


def parse_tag_listing(stdout: str) -> tuple[Tag, ...]:
    """Given the stdout of ``cvmfs_server tag -lx``, return its tags in listed order.

    Each line is ``name root_hash size revision unix_time (branch) description``;
    the branch ``(default)`` becomes ``""``.  Raise :class:`CvmfsCommandError` on a
    line that does not have this form.  Pure.
    """
    tags: list[Tag] = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        match = _TAG_LINE.match(line)
        if match is None:
            raise CvmfsCommandError(f"unexpected line in the tag listing: {line!r}")
        branch = match["branch"]
        tags.append(
            Tag(
                name=match["name"],
                root_hash=match["hash"],
                size_bytes=int(match["size"]),
                revision=int(match["revision"]),
                timestamp=datetime.fromtimestamp(int(match["timestamp"]), tz=UTC),
                branch="" if branch == "default" else branch,
                description=(match["description"] or "").strip(),
            )
        )
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class TagListing:
    """The result of listing tags: the command's result and, when it succeeded, the tags.

    Iterating over a listing iterates over its tags (none when the command failed).
    """

    result: CommandResult
    tags: tuple[Tag, ...]

    @property
    def ok(self) -> bool:
        """Whether the listing command succeeded."""
        return self.result.ok

    def __iter__(self) -> Iterator[Tag]:
        return iter(self.tags)

    def __len__(self) -> int:
        return len(self.tags)


# --- argument validation ------------------------------------------------------------
#
# cvmfs_server is a shell script that re-assembles several arguments into command
# strings run by `sh -c` (the publish message, tag names, the transaction path), so an
# argument that is safe for our argv can still be split or interpreted there.  Only
# characters that mean nothing to a shell are accepted.

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,253}$")
_SCOPE_COMPONENT = re.compile(r"^[A-Za-z0-9._+@%=,-]+$")
_TAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]*$")
_MESSAGE = re.compile(r"^[A-Za-z0-9 ._,:+=@/%-]*$")
_MESSAGE_MAX = 200


def _repo(repo: str) -> str:
    if not _REPO_NAME.match(repo):
        raise CvmfsCommandError(f"invalid repository name {repo!r}")
    return repo


def _scoped(repo: str, path: str | None) -> str:
    _repo(repo)
    if path is None:
        return repo
    parts = [part for part in path.split("/") if part]
    if not parts:
        return repo
    for part in parts:
        if part in (".", "..") or not _SCOPE_COMPONENT.match(part):
            raise CvmfsCommandError(f"invalid transaction path {path!r}")
    return repo + "/" + "/".join(parts)


def _message(message: str) -> str:
    words = message.split()
    if (
        len(message) > _MESSAGE_MAX
        or not _MESSAGE.match(message)
        or any(word.startswith("-") for word in words)
    ):
        raise CvmfsCommandError(
            f"publish message {message!r} must be at most {_MESSAGE_MAX} characters of "
            "letters, digits, spaces and ._,:+=@/%- with no word starting with '-'"
        )
    return " ".join(words)


def _tag_name(name: str) -> str:
    if not _TAG_NAME.match(name):
        raise CvmfsCommandError(f"invalid tag name {name!r}")
    if name in _UNDO_TAGS:
        raise CvmfsCommandError(f"the undo tag {name!r} cannot be removed")
    return name


def _timeout(value: float | None, default: float) -> float:
    chosen = default if value is None else value
    if not chosen > 0:
        raise CvmfsCommandError(f"timeout must be positive, not {chosen!r}")
    return float(chosen)


def _argv_prefix(name: str, prefix: tuple[str, ...]) -> tuple[str, ...]:
    if (
        not isinstance(prefix, tuple)
        or not prefix
        or not all(isinstance(part, str) and part for part in prefix)
    ):
        raise CvmfsCommandError(f"{name} must be a non-empty tuple of non-empty strings")
    return prefix


# --- environment ----------------------------------------------------------------------

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


def _safe_cwd(cwd: str) -> str:
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


# --- logging helpers ------------------------------------------------------------------

_LOG_TEXT_MAX = 1500


def _clip(text: str, limit: int = _LOG_TEXT_MAX) -> str:
    """Shorten text for a log line, keeping its head and its tail."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = limit // 3
    tail = limit - head
    return f"{text[:head]} …[{len(text) - limit} chars omitted]… {text[-tail:]}"


# --- the adapter ----------------------------------------------------------------------


class CvmfsServer:
    """Typed calls of ``cvmfs_server`` (and ``cvmfs_swissknife``) for one host.

    ``server_command`` and ``swissknife_command`` are argv prefixes, e.g.
    ``("cvmfs_server",)`` or ``("/usr/bin/python3", "/srv/fake_cvmfs_server.py")``.
    ``default_timeout`` applies to every call that does not pass its own
    ``timeout``; on expiry the command's process group gets SIGTERM, then SIGKILL
    after ``kill_grace`` seconds.  ``cwd`` is the working directory of every
    command; it must not lie under /cvmfs.  The environment is
    :func:`command_environment` of ``environ`` (default: the daemon's) plus
    ``extra_env``.  Raise :class:`CvmfsCommandError` for an invalid setting.
    """

    def __init__(
        self,
        server_command: tuple[str, ...],
        swissknife_command: tuple[str, ...] = ("cvmfs_swissknife",),
        *,
        default_timeout: float = 900.0,
        cwd: str = "/",
        kill_grace: float = 5.0,
        environ: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.server_command = _argv_prefix("server_command", server_command)
        self.swissknife_command = _argv_prefix("swissknife_command", swissknife_command)
        self.default_timeout = _timeout(None, default_timeout)
        self.kill_grace = _timeout(None, kill_grace)
        self.cwd = _safe_cwd(cwd)
        self._env = command_environment(os.environ if environ is None else environ, extra_env)

    # -- transactions and publishing

    def transaction(
        self,
        repo: str,
        *,
        path: str | None = None,
        timeout: float | None = None,
        on_spawn: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> CommandResult:
        """Open a transaction on ``repo`` (``transaction R`` or ``transaction R/path``).

        Never waits for a busy repository (no ``-t``): :attr:`Outcome.ALREADY_IN_TRANSACTION`
        comes back at once and the caller retries.  A path scope does not restrict
        what is published; its parent must exist (:attr:`Outcome.PATH_SCOPE_MISSING`).
        """
        return self._server(("transaction", _scoped(repo, path)), timeout, on_spawn, tag)

    def publish(
        self,
        repo: str,
        *,
        message: str = "",
        force: bool = False,
        timeout: float | None = None,
        on_spawn: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> CommandResult:
        """Publish the open transaction of ``repo`` with ``message`` (``publish [-f] [-m M] R``).

        Contract for ``force``: pass it only after a publish returned
        :attr:`Outcome.OPEN_READERS` and the holders in ``open_file_holders`` were
        logged.  ``-f`` answers the read-only descriptor prompt with yes (and may
        take a minute); it does not help against :attr:`Outcome.OPEN_WRITERS`.
        ``cvmfs_server`` pastes the message into a shell command line, so it may hold
        only letters, digits, spaces and ``._,:+=@/%-``, no word may start with ``-``,
        and it is at most 200 characters; otherwise :class:`CvmfsCommandError`.
        """
        args: tuple[str, ...] = ("publish",)
        if force:
            args += ("-f",)
        text = _message(message)
        if text:
            args += ("-m", text)
        return self._server((*args, _repo(repo)), timeout, on_spawn, tag)

    def abort(
        self, repo: str, *, timeout: float | None = None, tag: str | None = None
    ) -> CommandResult:
        """Discard the open transaction of ``repo`` (``abort -f R``); never prompts."""
        return self._server(("abort", "-f", _repo(repo)), timeout, None, tag)

    # -- signatures

    def resign(self, repo: str, *, days: int, timeout: float | None = None) -> CommandResult:
        """Re-sign the whitelist of ``repo`` for ``days`` days (``resign -f -d N R``).

        ``days`` must be an int from 1 to 365: the tool itself accepts ``-d abc`` and
        writes a whitelist that nothing can read.  Works during an open transaction.
        """
        if type(days) is not int or not 1 <= days <= 365:
            raise CvmfsCommandError(f"whitelist validity must be 1..365 days, not {days!r}")
        return self._server(("resign", "-f", "-d", str(days), _repo(repo)), timeout)

    def resign_manifest(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Re-sign the published manifest of ``repo`` (``resign -p R``)."""
        return self._server(("resign", "-p", _repo(repo)), timeout)

    # -- garbage collection and tags

    def gc(
        self,
        repo: str,
        *,
        keep_revisions: int | None = None,
        keep_since: datetime | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> CommandResult:
        """Collect garbage in ``repo`` (``gc -f [-d] [-r N | -t @EPOCH] R``).

        ``keep_revisions`` (``-r``, >= 0) and ``keep_since`` (``-t``, a timezone-aware
        datetime, passed as ``@<unix seconds>``) are mutually exclusive; with neither,
        the tool keeps revisions of the last three days.  Tagged revisions are always
        kept.  A running gc holds its own transaction, so a concurrent ``transaction``
        gets :attr:`Outcome.ALREADY_IN_TRANSACTION`.
        """
        if keep_revisions is not None and keep_since is not None:
            raise CvmfsCommandError("gc: keep_revisions and keep_since are mutually exclusive")
        args: tuple[str, ...] = ("gc", "-f")
        if dry_run:
            args += ("-d",)
        if keep_revisions is not None:
            if type(keep_revisions) is not int or keep_revisions < 0:
                raise CvmfsCommandError(
                    f"gc: keep_revisions must be an int >= 0: {keep_revisions!r}"
                )
            args += ("-r", str(keep_revisions))
        if keep_since is not None:
            if keep_since.tzinfo is None or keep_since.utcoffset() is None:
                raise CvmfsCommandError("gc: keep_since must be timezone-aware")
            args += ("-t", f"@{int(keep_since.timestamp())}")
        return self._server((*args, _repo(repo)), timeout)

    def tag_list(self, repo: str, *, timeout: float | None = None) -> TagListing:
        """List the tags of ``repo`` (``tag -lx R``).

        Return a :class:`TagListing`; its tags are empty when the command failed
        (see ``listing.result.outcome``).  Raise :class:`CvmfsCommandError` when a
        successful listing cannot be parsed.
        """
        result = self._server(("tag", "-lx", _repo(repo)), timeout)
        tags = parse_tag_listing(result.stdout) if result.ok else ()
        return TagListing(result=result, tags=tags)

    def tag_remove(
        self, repo: str, names: Iterable[str], *, timeout: float | None = None
    ) -> CommandResult:
        """Remove the named tags from ``repo`` in one call (``tag -r A -r B -f R``).

        Raise :class:`CvmfsCommandError` for no names, an invalid name, or an undo
        tag (``trunk``, ``trunk-previous``), which the tool refuses to remove.
        """
        args: list[str] = ["tag"]
        for name in names:
            args += ["-r", _tag_name(name)]
        if len(args) == 1:
            raise CvmfsCommandError("tag_remove needs at least one tag name")
        return self._server((*args, "-f", _repo(repo)), timeout)

    # -- inspection and repair

    def check(
        self, repo: str, *, integrity: bool = False, timeout: float | None = None
    ) -> CommandResult:
        """Verify the published revision of ``repo`` (``check [-i] R``).

        With ``integrity`` every object file in the storage is re-hashed, referenced
        or not.  Problems found give :attr:`Outcome.CHECK_FAILED`.
        """
        args: tuple[str, ...] = ("check", "-i") if integrity else ("check",)
        return self._server((*args, _repo(repo)), timeout)

    def mount(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Mount the union and read-only mounts of ``repo`` again (``mount R``)."""
        return self._server(("mount", _repo(repo)), timeout)

    def info(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Describe ``repo`` (``info R``); fails like ``abort`` on a bad whitelist."""
        return self._server(("info", _repo(repo)), timeout)

    # -- swissknife

    def swissknife(self, *args: str, timeout: float | None = None) -> CommandResult:
        """Run ``cvmfs_swissknife`` with ``args`` (``args[0]`` is its subcommand)."""
        if not args:
            raise CvmfsCommandError("swissknife needs a subcommand")
        return self._execute(self.swissknife_command, args, timeout)

    # -- execution

    def _server(
        self,
        args: tuple[str, ...],
        timeout: float | None,
        on_spawn: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> CommandResult:
        return self._execute(self.server_command, args, timeout, on_spawn, tag)

    def _execute(
        self,
        prefix: tuple[str, ...],
        args: tuple[str, ...],
        timeout: float | None,
        on_spawn: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> CommandResult:
        """Run ``prefix + args`` under the rules of this module and return its result.

        ``tag`` goes into the command's environment as :data:`COMMAND_TAG_VARIABLE`; every
        process the command starts inherits it, also one in a session of its own, so that
        a later run can find and stop what a killed daemon left running
        (:func:`stop_tagged`).

        ``on_spawn(pgid)`` is called with the command's process group as soon as it runs
        (the caller journals it: a group that outlives a killed daemon can be stopped at
        the next start). Raise :class:`CvmfsCommandError` when the command cannot be
        started.
        """
        limit = _timeout(timeout, self.default_timeout)
        argv = (*prefix, *args)
        if any("\0" in part for part in argv):
            raise CvmfsCommandError(f"argv contains a NUL byte: {argv!r}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=self._env if tag is None else {**self._env, COMMAND_TAG_VARIABLE: tag},
                start_new_session=True,
                close_fds=True,
                # Whatever the caller's umask: objects the tool writes must be readable by
                # the web server, or publish fails at tagging with the transaction open (F4).
                umask=COMMAND_UMASK,
            )
        except OSError as exc:
            raise CvmfsCommandError(f"cannot start {argv[0]!r}: {exc}") from exc
        if on_spawn is not None:
            try:
                on_spawn(proc.pid)
            except BaseException:
                self._kill_group(proc, argv)
                raise
        timed_out = False
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = self._kill_group(proc, argv)
        except BaseException:
            # Do not leave a headless command group behind if the caller is unwinding.
            self._kill_group(proc, argv)
            raise
        duration = time.monotonic() - started
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        subcommand = args[0]
        outcome = classify(subcommand, None if timed_out else proc.returncode, stdout, stderr)
        result = CommandResult(
            argv=argv,
            exit_code=proc.returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            outcome=outcome,
            reason=f"no exit within {limit:g} s" if timed_out else explain(outcome, stdout, stderr),
            open_file_holders=parse_open_file_holders(stdout) if subcommand == "publish" else (),
            invalid_graft_path=(
                parse_invalid_graft_path(stderr) if outcome is Outcome.INVALID_GRAFT else None
            ),
            lease_time_remaining_s=(
                parse_lease_time_remaining(stdout) if outcome is Outcome.LEASE_BUSY else None
            ),
        )
        self._log(result)
        return result

    def _kill_group(
        self, proc: subprocess.Popen[bytes], argv: tuple[str, ...]
    ) -> tuple[bytes, bytes]:
        """Terminate the whole process group of ``proc``; return what it wrote meanwhile.

        SIGTERM first, SIGKILL after ``kill_grace``.  A killed ``cvmfs_server
        transaction`` would otherwise leave its ``cvmfs_publish`` child behind, which
        opens the transaction later on its own.
        """
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            return proc.communicate(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            return proc.communicate(timeout=self.kill_grace)
        except subprocess.TimeoutExpired as exc:
            partial = (exc.output or b"", exc.stderr or b"")
        # Something that left the group still holds our pipes: stop reading.
        log.error("cvmfs command pipes held open after kill", argv=list(argv))
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return partial

    @staticmethod
    def _log(result: CommandResult) -> None:
        fields: dict[str, object] = {
            "argv": list(result.argv),
            "outcome": result.outcome.value,
            "exit_code": result.exit_code,
            "duration_s": round(result.duration_s, 3),
        }
        if result.reason:
            fields["reason"] = result.reason
        if result.open_file_holders:
            fields["open_file_holders"] = list(result.open_file_holders)
        if result.invalid_graft_path:
            fields["invalid_graft_path"] = result.invalid_graft_path
        if result.lease_time_remaining_s is not None:
            fields["lease_time_remaining_s"] = round(result.lease_time_remaining_s, 3)
        fields["stdout"] = _clip(result.stdout)
        fields["stderr"] = _clip(result.stderr)
        if result.ok:
            log.info("cvmfs command", **fields)
        else:
            log.warning("cvmfs command failed", **fields)


#: The environment variable that tags every process of a batch's command (faults.md F7-F9).
COMMAND_TAG_VARIABLE = "CVMFS_SYNCD_BATCH"

#: The umask every command runs with, and the daemon's own (faults.md F4).
COMMAND_UMASK = 0o022


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to process group ``pgid``; a group that is gone already is fine."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.exception("cannot signal cvmfs command group", pgid=pgid, signal=signum.name)


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
