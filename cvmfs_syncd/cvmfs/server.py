"""The one door to ``cvmfs_server`` and ``cvmfs_swissknife``: argv as data, outcomes as names.

Every subprocess cvmfs-syncd starts is started here.  Each call:

* builds its argv as a tuple from a configurable prefix (``server_command``,
  ``swissknife_command``) and validated arguments, never through a shell;
* runs with stdin at EOF, an explicit safe working directory, a filtered
  environment and a timeout, in a process group of its own that is killed whole
  when the timeout expires;
* captures stdout and stderr (``cvmfs_server`` prints many errors on stdout) and
  maps exit code and text to a named :class:`~cvmfs_syncd.cvmfs.outcomes.Outcome`
  with :func:`~cvmfs_syncd.cvmfs.outcomes.classify`;
* returns a frozen :class:`~cvmfs_syncd.cvmfs.outcomes.CommandResult`.  Ordinary
  command failures are results, not exceptions;
  :class:`~cvmfs_syncd.errors.CvmfsCommandError` is raised only for programming or
  configuration errors (an invalid argument, a command that cannot be started).

What an outcome means is decided in :mod:`cvmfs_syncd.cvmfs.outcomes`; the environment,
working directory, umask and process tag in :mod:`cvmfs_syncd.cvmfs.procs`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import structlog

from cvmfs_syncd.cvmfs.outcomes import (
    CommandResult,
    Outcome,
    classify,
    explain,
    parse_invalid_graft_path,
    parse_lease_time_remaining,
    parse_open_file_holders,
)
from cvmfs_syncd.cvmfs.procs import (
    COMMAND_TAG_VARIABLE,
    COMMAND_UMASK,
    command_environment,
    safe_cwd,
)
from cvmfs_syncd.cvmfs.tags import UNDO_TAGS, TagListing, parse_tag_listing
from cvmfs_syncd.errors import CvmfsCommandError

log = structlog.get_logger(__name__)


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
    if name in UNDO_TAGS:
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
        self.cwd = safe_cwd(cwd)
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
        (:func:`~cvmfs_syncd.cvmfs.procs.stop_tagged`).

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


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to process group ``pgid``; a group that is gone already is fine."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.exception("cannot signal cvmfs command group", pgid=pgid, signal=signum.name)
