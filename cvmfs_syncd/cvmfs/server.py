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
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import structlog

from cvmfs_syncd.cvmfs import arguments
from cvmfs_syncd.cvmfs.feed import POLL_SECONDS, FedResult, Feed, drain, feed_from
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
from cvmfs_syncd.cvmfs.tags import TagListing, parse_tag_listing
from cvmfs_syncd.errors import CvmfsCommandError

log = structlog.get_logger(__name__)


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
        self.server_command = arguments.argv_prefix("server_command", server_command)
        self.swissknife_command = arguments.argv_prefix("swissknife_command", swissknife_command)
        self.default_timeout = arguments.timeout(None, default_timeout)
        self.kill_grace = arguments.timeout(None, kill_grace)
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
        return self._server(("transaction", arguments.scoped(repo, path)), timeout, on_spawn, tag)

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
        text = arguments.message(message)
        if text:
            args += ("-m", text)
        return self._server((*args, arguments.repo_name(repo)), timeout, on_spawn, tag)

    def abort(
        self, repo: str, *, timeout: float | None = None, tag: str | None = None
    ) -> CommandResult:
        """Discard the open transaction of ``repo`` (``abort -f R``); never prompts."""
        return self._server(("abort", "-f", arguments.repo_name(repo)), timeout, None, tag)

    # -- signatures

    def resign(self, repo: str, *, days: int, timeout: float | None = None) -> CommandResult:
        """Re-sign the whitelist of ``repo`` for ``days`` days (``resign -f -d N R``).

        ``days`` must be an int from 1 to 365: the tool itself accepts ``-d abc`` and
        writes a whitelist that nothing can read.  Works during an open transaction.
        """
        if type(days) is not int or not 1 <= days <= 365:
            raise CvmfsCommandError(f"whitelist validity must be 1..365 days, not {days!r}")
        return self._server(("resign", "-f", "-d", str(days), arguments.repo_name(repo)), timeout)

    def resign_manifest(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Re-sign the published manifest of ``repo`` (``resign -p R``)."""
        return self._server(("resign", "-p", arguments.repo_name(repo)), timeout)

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
        return self._server((*args, arguments.repo_name(repo)), timeout)

    def tag_list(self, repo: str, *, timeout: float | None = None) -> TagListing:
        """List the tags of ``repo`` (``tag -lx R``).

        Return a :class:`TagListing`; its tags are empty when the command failed
        (see ``listing.result.outcome``).  Raise :class:`CvmfsCommandError` when a
        successful listing cannot be parsed.
        """
        result = self._server(("tag", "-lx", arguments.repo_name(repo)), timeout)
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
            args += ["-r", arguments.tag_name(name)]
        if len(args) == 1:
            raise CvmfsCommandError("tag_remove needs at least one tag name")
        return self._server((*args, "-f", arguments.repo_name(repo)), timeout)

    # -- inspection and repair

    def check(
        self, repo: str, *, integrity: bool = False, timeout: float | None = None
    ) -> CommandResult:
        """Verify the published revision of ``repo`` (``check [-i] R``).

        With ``integrity`` every object file in the storage is re-hashed, referenced
        or not.  Problems found give :attr:`Outcome.CHECK_FAILED`.
        """
        args: tuple[str, ...] = ("check", "-i") if integrity else ("check",)
        return self._server((*args, arguments.repo_name(repo)), timeout)

    def mount(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Mount the union and read-only mounts of ``repo`` again (``mount R``)."""
        return self._server(("mount", arguments.repo_name(repo)), timeout)

    def info(self, repo: str, *, timeout: float | None = None) -> CommandResult:
        """Describe ``repo`` (``info R``); fails like ``abort`` on a bad whitelist."""
        return self._server(("info", arguments.repo_name(repo)), timeout)

    # -- tarballs

    def ingest(
        self,
        repo: str,
        *,
        base: str,
        feed: Callable[[Feed], object],
        catalog: bool = True,
        deletes: Iterable[str] = (),
        inactivity: float = 300.0,
        on_spawn: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> FedResult:
        """Unpack the tar that ``feed`` writes under ``base`` in one revision.

        ``ingest -t - -b BASE [-c] [-d PATH]... R``: ``feed`` writes a plain tar to the
        :class:`Feed` it is given (the command's stdin); ``catalog`` puts a nested catalog
        at the base; ``deletes`` are removed in the same revision.  ``ingest`` opens its own
        transaction (:attr:`Outcome.ALREADY_IN_TRANSACTION` when one is open) and merges
        into an existing base.  The tool pastes base and deletions into a shell command
        unquoted, so each must be :func:`~cvmfs_syncd.cvmfs.arguments.is_shell_safe_path`
        (else :class:`CvmfsCommandError`).  There is no total time limit: the command is
        stopped after ``inactivity`` seconds in which nothing was fed and nothing printed.
        """
        args: tuple[str, ...] = ("ingest", "-t", "-", "-b", arguments.repo_path(base, "base"))
        if catalog:
            args += ("-c",)
        for path in deletes:
            args += ("-d", arguments.repo_path(path, "path to delete"))
        return self._execute_fed(
            (*args, arguments.repo_name(repo)), feed, inactivity, on_spawn, tag
        )

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
        limit = arguments.timeout(timeout, self.default_timeout)
        argv = (*prefix, *args)
        started = time.monotonic()
        proc = self._spawn(argv, on_spawn, tag, stdin=subprocess.DEVNULL)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = kill_group(proc, argv, self.kill_grace)
        except BaseException:
            # Do not leave a headless command group behind if the caller is unwinding.
            kill_group(proc, argv, self.kill_grace)
            raise
        reason = f"no exit within {limit:g} s" if timed_out else None
        return self._result(argv, args[0], proc.returncode, out, err, started, reason)

    def _execute_fed(
        self,
        args: tuple[str, ...],
        feed: Callable[[Feed], object],
        inactivity: float,
        on_spawn: Callable[[int], None] | None,
        tag: str | None,
    ) -> FedResult:
        """Run ``argv`` with ``feed`` writing its stdin; kill it after ``inactivity`` idle seconds.

        Idle means: nothing fed and nothing printed.  When ``feed`` raises, the command is
        given a tar header that promises more data than ever comes (:data:`_TRUNCATION`)
        before its stdin closes, so that it reads a truncated archive and fails cleanly
        instead of taking what it got so far for a whole one.  A command that stops reading
        (a broken pipe) ends the feeding without an error of the feed's.
        """
        limit = arguments.timeout(inactivity, inactivity)
        argv = (*self.server_command, *args)
        started = time.monotonic()
        proc = self._spawn(argv, on_spawn, tag, stdin=subprocess.PIPE)
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:  # pragma: no cover
            raise CvmfsCommandError("pipes missing")
        stream = Feed(proc.stdin)
        out: list[bytes] = []
        err: list[bytes] = []
        failure: list[BaseException] = []
        threads = [
            threading.Thread(target=drain, args=(proc.stdout, out, stream), daemon=True),
            threading.Thread(target=drain, args=(proc.stderr, err, stream), daemon=True),
            threading.Thread(target=feed_from, args=(feed, stream, failure), daemon=True),
        ]
        idle = False
        try:
            for thread in threads:
                thread.start()
            while not _exited(proc, POLL_SECONDS):  # returns as soon as it exits
                if time.monotonic() - stream.last_activity > limit:
                    idle = True
                    stop_group(proc, self.kill_grace)
                    break
        except BaseException:
            stop_group(proc, self.kill_grace)
            raise
        finally:
            for thread in threads:
                thread.join(self.kill_grace)
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
        reason = f"idle for more than {limit:g} s" if idle else None
        result = self._result(
            argv, args[0], proc.wait(), b"".join(out), b"".join(err), started, reason
        )
        return FedResult(result, stream.fed, failure[0] if failure else None)

    def _spawn(
        self,
        argv: tuple[str, ...],
        on_spawn: Callable[[int], None] | None,
        tag: str | None,
        *,
        stdin: int,
    ) -> subprocess.Popen[bytes]:
        if any("\0" in part for part in argv):
            raise CvmfsCommandError(f"argv contains a NUL byte: {argv!r}")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
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
                kill_group(proc, argv, self.kill_grace)
                raise
        return proc

    def _result(
        self,
        argv: tuple[str, ...],
        subcommand: str,
        exit_code: int | None,
        out: bytes,
        err: bytes,
        started: float,
        timeout_reason: str | None,
    ) -> CommandResult:
        """Classify and log what a finished command did; ``timeout_reason`` when it was killed."""
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        timed_out = timeout_reason is not None
        outcome = classify(subcommand, None if timed_out else exit_code, stdout, stderr)
        result = CommandResult(
            argv=argv,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            duration_s=time.monotonic() - started,
            outcome=outcome,
            reason=timeout_reason or explain(outcome, stdout, stderr),
            open_file_holders=parse_open_file_holders(stdout) if subcommand == "publish" else (),
            invalid_graft_path=(
                parse_invalid_graft_path(stderr) if outcome is Outcome.INVALID_GRAFT else None
            ),
            lease_time_remaining_s=(
                parse_lease_time_remaining(stdout) if outcome is Outcome.LEASE_BUSY else None
            ),
        )
        log_result(result)
        return result


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to process group ``pgid``; a group that is gone already is fine."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.exception("cannot signal cvmfs command group", pgid=pgid, signal=signum.name)


def kill_group(
    proc: subprocess.Popen[bytes], argv: tuple[str, ...], grace: float
) -> tuple[bytes, bytes]:
    """Terminate the whole process group of ``proc``; return what it wrote meanwhile.

    SIGTERM first, SIGKILL after ``grace`` seconds.  A killed ``cvmfs_server
    transaction`` would otherwise leave its ``cvmfs_publish`` child behind, which
    opens the transaction later on its own.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired as exc:
        partial = (exc.output or b"", exc.stderr or b"")
    # Something that left the group still holds our pipes: stop reading.
    log.error("cvmfs command pipes held open after kill", argv=list(argv))
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    proc.wait()
    return partial


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Terminate the process group of a fed command whose pipes other threads read.

    SIGTERM first, SIGKILL after ``grace`` seconds; its output keeps being drained.
    """
    for signum in (signal.SIGTERM, signal.SIGKILL):
        _signal_group(proc.pid, signum)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        return


def log_result(result: CommandResult) -> None:
    """Log one command's result: info when it succeeded, a warning otherwise."""
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


def _exited(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``proc`` to exit; return whether it has."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True
