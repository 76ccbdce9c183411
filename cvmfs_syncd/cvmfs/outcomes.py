"""What a ``cvmfs_server`` or ``cvmfs_swissknife`` call amounted to: outcomes as names.

:func:`classify` maps a subcommand, its exit code and its output to an :class:`Outcome`
through an ordered rule table; :func:`explain` picks the line that says why.  The
``parse_*`` functions read the details a caller acts on (the processes holding files
open, the rejected graft, the time left on a busy lease) and :class:`CommandResult`
carries all of it.  Everything here is pure; :mod:`cvmfs_syncd.cvmfs.server` runs the
commands.

The mapping is specified by the recordings of the real CernVM-FS 2.12.0 tools;
``docs/failures.md`` lists every outcome with its evidence and what the daemon
does about it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


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


_MISSING_SCOPE = re.compile(r"cannot open transaction on non-existing path (\S+)")


def parse_missing_scope(text: str) -> str | None:
    """Given a :attr:`Outcome.PATH_SCOPE_MISSING` output, return the first missing component
    of the transaction path as a repository path (``sw`` for ``/sw``), or None.

    The tool names the first component that does not exist (``/sw`` for ``sw/a``,
    ``/sw/a/new`` for ``sw/a/new/deeper``; gateway.md 1).  Pure.
    """
    match = _MISSING_SCOPE.search(text)
    return match.group(1).strip("/") if match else None


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
