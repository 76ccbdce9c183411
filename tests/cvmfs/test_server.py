"""Execution and argv tests of the cvmfs_server adapter, driven by tiny stub executables."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog

from cvmfs_syncd.cvmfs.outcomes import (
    CommandResult,
    Outcome,
    classify,
    explain,
    parse_lease_time_remaining,
)
from cvmfs_syncd.cvmfs.procs import command_environment
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.cvmfs.tags import Tag
from cvmfs_syncd.errors import CvmfsCommandError

STUB_HEADER = """\
import json, os, signal, subprocess, sys, threading, time
args = sys.argv[1:]
"""

# A stub that reports what it was given: argv, cwd, environment and stdin.
ECHO_STUB = """\
stdin_is_devnull = os.path.samestat(os.fstat(0), os.stat(os.devnull))
data = sys.stdin.read()
print(json.dumps({
    "argv": args,
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "stdin": data,
    "stdin_is_devnull": stdin_is_devnull,
}))
"""


def write_stub(directory: Path, body: str, name: str = "stub.py") -> tuple[str, ...]:
    """Write a Python stub executable; return the argv prefix that runs it."""
    path = directory / name
    path.write_text(STUB_HEADER + textwrap.dedent(body), encoding="utf-8")
    return (sys.executable, str(path))


@pytest.fixture
def safe_cwd(tmp_path: Path) -> Path:
    """A working directory for the commands, outside /cvmfs."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def echo_server(tmp_path: Path, safe_cwd: Path) -> CvmfsServer:
    """An adapter whose cvmfs_server and cvmfs_swissknife report their invocation."""
    prefix = write_stub(tmp_path, ECHO_STUB)
    return CvmfsServer(prefix, prefix, default_timeout=30.0, cwd=str(safe_cwd))


def echoed(result: CommandResult) -> dict[str, object]:
    """Decode the echo stub's report."""
    assert result.outcome is Outcome.OK, result
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def echoed_args(result: CommandResult) -> list[str]:
    """The arguments the echo stub received after the argv prefix."""
    args = echoed(result)["argv"]
    assert isinstance(args, list)
    return [str(a) for a in args]


def process_exits_within(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily our child) has exited, up to ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


@pytest.fixture
def reap_strays() -> Iterator[list[int]]:
    """Collect pids a test learns of; any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- capture, exit codes, outcome -------------------------------------------------------


def test_stdout_stderr_and_exit_code_are_captured(tmp_path: Path, safe_cwd: Path) -> None:
    """A failing command's stdout, stderr, exit code and argv are kept and classified."""
    prefix = write_stub(
        tmp_path,
        """\
        print("Repository ref.local is not in a transaction")
        print("some note", file=sys.stderr)
        sys.exit(1)
        """,
    )
    server = CvmfsServer(prefix, cwd=str(safe_cwd))
    result = server.publish("ref.local", message="first publish")
    assert result.argv == (*prefix, "publish", "-m", "first publish", "ref.local")
    assert result.exit_code == 1
    assert result.stdout == "Repository ref.local is not in a transaction\n"
    assert result.stderr == "some note\n"
    assert result.outcome is Outcome.NOT_IN_TRANSACTION
    assert result.reason == "Repository ref.local is not in a transaction"
    assert not result.ok
    assert result.duration_s >= 0


def test_exit_17_of_transaction_is_already_in_transaction(tmp_path: Path, safe_cwd: Path) -> None:
    """Exit 17 of `transaction` names a foreign open transaction even without a message."""
    prefix = write_stub(tmp_path, "sys.exit(17)\n")
    result = CvmfsServer(prefix, cwd=str(safe_cwd)).transaction("ref.local")
    assert result.outcome is Outcome.ALREADY_IN_TRANSACTION
    assert result.exit_code == 17


def test_success_is_ok(echo_server: CvmfsServer) -> None:
    """Exit 0 is OK with an empty reason."""
    result = echo_server.info("ref.local")
    assert result.ok
    assert result.reason == ""
    assert result.open_file_holders == ()
    assert result.invalid_graft_path is None


def test_undecodable_output_is_replaced_not_fatal(tmp_path: Path, safe_cwd: Path) -> None:
    """Bytes that are not UTF-8 are replaced, so odd file names in output never crash a call."""
    prefix = write_stub(tmp_path, "sys.stdout.buffer.write(b'caf\\xe9\\n')\n")
    result = CvmfsServer(prefix, cwd=str(safe_cwd)).info("ref.local")
    assert result.stdout == "caf\ufffd\n"


def test_open_readers_result_carries_holders(tmp_path: Path, safe_cwd: Path) -> None:
    """A publish stopped at the read-only fd prompt reports the processes lsof named."""
    prefix = write_stub(
        tmp_path,
        r"""
        print("WARNING! There are open read-only file descriptors in /cvmfs/ref.local")
        print("      The following lsof report might show the processes with open file handles")
        print("      ")
        print("cvmfs2     4711  root      /var/spool/cvmfs/ref.local/cache/ref.local")
        print("tail       4800  root      /cvmfs/ref.local/logs/a b.txt")
        print("tail       4800  root      /cvmfs/ref.local/logs/a b.txt")
        print("")
        print("         Do you want to proceed anyway? (y/N) aborted.")
        sys.exit(1)
        """,
    )
    result = CvmfsServer(prefix, cwd=str(safe_cwd)).publish("ref.local", message="m")
    assert result.outcome is Outcome.OPEN_READERS
    assert result.open_file_holders == ("tail[4800] /cvmfs/ref.local/logs/a b.txt",)


def test_invalid_graft_result_names_the_placeholder(tmp_path: Path, safe_cwd: Path) -> None:
    """A publish PANIC on a graft file reports the repository path of the placeholder."""
    prefix = write_stub(
        tmp_path,
        """\
        print("  what():  PANIC: <src>/sync_mediator.cc : 965", file=sys.stderr)
        print("Encountered a grafted file (sw/x y.bin) with invalid grafting information; "
              "check contents of .cvmfsgraft-* file.  Aborting publish.", file=sys.stderr)
        sys.exit(1)
        """,
    )
    result = CvmfsServer(prefix, cwd=str(safe_cwd)).publish("ref.local", message="m")
    assert result.outcome is Outcome.INVALID_GRAFT
    assert result.invalid_graft_path == "sw/x y.bin"


def test_busy_lease_result_carries_time_remaining(tmp_path: Path, safe_cwd: Path) -> None:
    """A lease refused as busy reports the other lease's time left, also in the log line."""
    prefix = write_stub(
        tmp_path,
        """\
        print("Path busy. Time remaining = 1m2.5s")
        print("repository busy, retrying")
        print("Path busy. Time remaining = 41.25s")
        print("CernVM-FS transaction error: lease path busy", file=sys.stderr)
        sys.exit(16)
        """,
    )
    server = CvmfsServer(prefix, cwd=str(safe_cwd))
    with structlog.testing.capture_logs() as logs:
        result = server.transaction("gw.example.org", path="sw/x")
    assert result.outcome is Outcome.LEASE_BUSY
    assert result.lease_time_remaining_s == pytest.approx(41.25)
    assert result.reason == "CernVM-FS transaction error: lease path busy"
    (entry,) = logs
    assert entry["lease_time_remaining_s"] == 41.25


def test_other_results_carry_no_lease_time(tmp_path: Path, safe_cwd: Path) -> None:
    """Only a busy lease fills ``lease_time_remaining_s``."""
    prefix = write_stub(
        tmp_path,
        """\
        print("Path busy. Time remaining = 3s")
        print("Gateway reply: ok")
        print("CernVM-FS transaction error: cannot open transaction on non-existing path /a",
              file=sys.stderr)
        sys.exit(2)
        """,
    )
    result = CvmfsServer(prefix, cwd=str(safe_cwd)).transaction("gw.example.org", path="a/b")
    assert result.outcome is Outcome.PATH_SCOPE_MISSING
    assert result.lease_time_remaining_s is None


# --- stdin, cwd, environment ------------------------------------------------------------


def test_stdin_is_devnull_at_eof(echo_server: CvmfsServer) -> None:
    """Commands read EOF from /dev/null: abort/publish/gc prompts never see the daemon's stdin."""
    report = echoed(echo_server.abort("ref.local"))
    assert report["stdin"] == ""
    assert report["stdin_is_devnull"] is True


def test_commands_run_in_the_configured_cwd(
    echo_server: CvmfsServer, safe_cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's cwd is the configured directory, whatever the daemon's own cwd is."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert echoed(echo_server.publish("ref.local", message="m"))["cwd"] == str(safe_cwd)


def test_default_cwd_is_root(tmp_path: Path) -> None:
    """Without a cwd setting, commands run in /."""
    prefix = write_stub(tmp_path, ECHO_STUB)
    assert echoed(CvmfsServer(prefix).abort("ref.local"))["cwd"] == "/"


@pytest.mark.parametrize(
    "cwd", ["/cvmfs", "/cvmfs/ref.local", "/cvmfs/ref.local/sub/dir", "/cvmfs/../cvmfs/x"]
)
def test_cwd_inside_cvmfs_is_refused(cwd: str) -> None:
    """A working directory at or below /cvmfs is a configuration error (publish would refuse)."""
    with pytest.raises(CvmfsCommandError, match="inside /cvmfs"):
        CvmfsServer(("cvmfs_server",), cwd=cwd)


def test_cwd_symlinked_into_cvmfs_is_refused(tmp_path: Path) -> None:
    """A working directory that resolves into /cvmfs through a symlink is refused too."""
    link = tmp_path / "link"
    link.symlink_to("/cvmfs/ref.local")
    with pytest.raises(CvmfsCommandError, match="inside /cvmfs"):
        CvmfsServer(("cvmfs_server",), cwd=str(link))


@pytest.mark.parametrize("cwd", ["relative/dir", "/nonexistent/state/dir"])
def test_cwd_must_be_an_absolute_existing_directory(cwd: str) -> None:
    """A relative or missing working directory is a configuration error."""
    with pytest.raises(CvmfsCommandError, match="working directory"):
        CvmfsServer(("cvmfs_server",), cwd=cwd)


def test_environment_keeps_only_the_allowed_variables() -> None:
    """The commands' environment keeps PATH/HOME/LANG/LC_*/TZ and drops what changes behaviour."""
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "en_US.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "CVMFS_AUTO_REPAIR_MOUNTPOINT": "false",
        "LD_PRELOAD": "/usr/lib/faketime/libfaketime.so.1",
        "LD_LIBRARY_PATH": "/opt/lib",
        "BASH_ENV": "/root/.evil",
        "ENV": "/root/.evil",
        "IFS": ",",
        "PYTHONPATH": "/x",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    assert command_environment(base, {"EXTRA": "1"}) == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "en_US.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "EXTRA": "1",
    }


def test_environment_falls_back_to_a_default_path() -> None:
    """Without PATH in the daemon's environment, the commands still find the sbin tools."""
    assert "/usr/sbin" in command_environment({})["PATH"].split(":")


def test_subprocess_sees_the_filtered_environment(tmp_path: Path, safe_cwd: Path) -> None:
    """The stub really runs with the filtered environment plus the explicit extras."""
    prefix = write_stub(tmp_path, ECHO_STUB)
    server = CvmfsServer(
        prefix,
        cwd=str(safe_cwd),
        environ={"PATH": os.environ.get("PATH", ""), "LD_PRELOAD": "", "CVMFS_X": "1"},
        extra_env={"FAKE_CVMFS_STATE": "/tmp/state"},
    )
    env = echoed(server.info("ref.local"))["env"]
    assert isinstance(env, dict)
    assert env["FAKE_CVMFS_STATE"] == "/tmp/state"
    assert "LD_PRELOAD" not in env
    assert "CVMFS_X" not in env


# --- timeouts and process groups --------------------------------------------------------

HANGING_PARENT = """\
pid_file, marker, ignore_term = args[-3], args[-2], args[-1] == "ignore"
child_code = (
    "import os, signal, sys, threading\\n"
    "if sys.argv[3] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\\n"
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
    "threading.Event().wait(30)\\n"
    "open(sys.argv[2], 'w').write('written late')\\n"
)
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", child_code, pid_file, marker, args[-1]])
while not os.path.exists(pid_file):
    threading.Event().wait(0.01)
print("child started", flush=True)
threading.Event().wait(60)
"""


@pytest.mark.parametrize(
    ("mode", "signal_seen"), [("term", -signal.SIGTERM), ("ignore", -signal.SIGKILL)]
)
def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, safe_cwd: Path, reap_strays: list[int], mode: str, signal_seen: int
) -> None:
    """On timeout the command and its children die (SIGTERM, else SIGKILL): no late writes."""
    prefix = write_stub(tmp_path, HANGING_PARENT)
    pid_file = tmp_path / "child.pid"
    marker = tmp_path / "late-write"
    server = CvmfsServer(prefix, prefix, cwd=str(safe_cwd), kill_grace=0.5)
    result = server.swissknife("hang", str(pid_file), str(marker), mode, timeout=2.0)
    child = int(pid_file.read_text())
    reap_strays.append(child)
    assert result.outcome is Outcome.TIMEOUT
    assert result.exit_code == signal_seen
    assert "child started" in result.stdout
    assert result.reason == "no exit within 2 s"
    assert process_exits_within(child, timeout=10.0)
    assert not marker.exists()


def test_timeout_is_measured(tmp_path: Path, safe_cwd: Path) -> None:
    """A killed command reports a duration of at least its timeout."""
    prefix = write_stub(tmp_path, "threading.Event().wait(60)\n")
    result = CvmfsServer(prefix, cwd=str(safe_cwd), kill_grace=0.5).mount("ref.local", timeout=0.5)
    assert result.outcome is Outcome.TIMEOUT
    assert result.duration_s >= 0.5


def test_default_timeout_applies(tmp_path: Path, safe_cwd: Path) -> None:
    """A call without its own timeout is bounded by the adapter's default timeout."""
    prefix = write_stub(tmp_path, "threading.Event().wait(60)\n")
    server = CvmfsServer(prefix, cwd=str(safe_cwd), default_timeout=0.5, kill_grace=0.5)
    started = time.monotonic()
    assert server.check("ref.local").outcome is Outcome.TIMEOUT
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeout_must_be_positive(echo_server: CvmfsServer, timeout: float) -> None:
    """A non-positive timeout is a programming error."""
    with pytest.raises(CvmfsCommandError, match="timeout"):
        echo_server.info("ref.local", timeout=timeout)


# --- argv ---------------------------------------------------------------------------------


def test_argv_is_passed_verbatim_with_odd_characters(echo_server: CvmfsServer) -> None:
    """Arguments reach the command as given, with no shell in between."""
    odd = ["a b", "$(touch /tmp/pwned)", "; rm -rf /", "'\"", "*?[x]", "grüße-日本", "line\nbreak"]
    assert echoed_args(echo_server.swissknife("graft", *odd)) == ["graft", *odd]


def test_argv_prefix_may_hold_several_elements(tmp_path: Path, safe_cwd: Path) -> None:
    """A multi-element server_command prefix is used as given, before the subcommand."""
    prefix = write_stub(tmp_path, ECHO_STUB)
    server = CvmfsServer((*prefix, "--state", "/x y"), cwd=str(safe_cwd))
    result = server.mount("ref.local")
    assert result.argv == (*prefix, "--state", "/x y", "mount", "ref.local")
    assert echoed_args(result) == ["--state", "/x y", "mount", "ref.local"]


ArgvCase = tuple[Callable[[CvmfsServer], CommandResult], list[str]]

ARGV_CASES: dict[str, ArgvCase] = {
    "transaction": (lambda s: s.transaction("ref.local"), ["transaction", "ref.local"]),
    "transaction scoped": (
        lambda s: s.transaction("ref.local", path="/sub//dir/"),
        ["transaction", "ref.local/sub/dir"],
    ),
    "transaction root scope": (
        lambda s: s.transaction("ref.local", path="/"),
        ["transaction", "ref.local"],
    ),
    "publish": (
        lambda s: s.publish("ref.local", message="batch 12: 3 files"),
        ["publish", "-m", "batch 12: 3 files", "ref.local"],
    ),
    "publish without message": (lambda s: s.publish("ref.local"), ["publish", "ref.local"]),
    "publish force": (
        lambda s: s.publish("ref.local", message="retry", force=True),
        ["publish", "-f", "-m", "retry", "ref.local"],
    ),
    "abort": (lambda s: s.abort("ref.local"), ["abort", "-f", "ref.local"]),
    "resign": (lambda s: s.resign("ref.local", days=30), ["resign", "-f", "-d", "30", "ref.local"]),
    "resign manifest": (lambda s: s.resign_manifest("ref.local"), ["resign", "-p", "ref.local"]),
    "gc": (lambda s: s.gc("refgc.local"), ["gc", "-f", "refgc.local"]),
    "gc keep revisions": (
        lambda s: s.gc("refgc.local", keep_revisions=0),
        ["gc", "-f", "-r", "0", "refgc.local"],
    ),
    "gc dry run keep revisions": (
        lambda s: s.gc("refgc.local", keep_revisions=3, dry_run=True),
        ["gc", "-f", "-d", "-r", "3", "refgc.local"],
    ),
    "gc keep since": (
        lambda s: s.gc(
            "refgc.local",
            keep_since=datetime(2026, 11, 26, 22, 29, 43, tzinfo=timezone(timedelta(hours=1))),
        ),
        ["gc", "-f", "-t", "@1795728583", "refgc.local"],
    ),
    "check": (lambda s: s.check("ref.local"), ["check", "ref.local"]),
    "check integrity": (
        lambda s: s.check("ref.local", integrity=True),
        ["check", "-i", "ref.local"],
    ),
    "tag remove": (
        lambda s: s.tag_remove("refgc.local", ["generic-2026-11-29T02:14:14Z", "mytag"]),
        ["tag", "-r", "generic-2026-11-29T02:14:14Z", "-r", "mytag", "-f", "refgc.local"],
    ),
    "mount": (lambda s: s.mount("ref.local"), ["mount", "ref.local"]),
    "info": (lambda s: s.info("ref.local"), ["info", "ref.local"]),
}


@pytest.mark.parametrize("case", sorted(ARGV_CASES))
def test_method_builds_the_recorded_argv(echo_server: CvmfsServer, case: str) -> None:
    """Each typed method runs the cvmfs_server argv the recordings use."""
    call, expected = ARGV_CASES[case]
    assert echoed_args(call(echo_server)) == expected


def test_tag_list_parses_the_listing(tmp_path: Path, safe_cwd: Path) -> None:
    """tag_list runs `tag -lx R` and returns the parsed tags."""
    prefix = write_stub(
        tmp_path,
        """\
        assert args == ["tag", "-lx", "refgc.local"], args
        print("trunk d93dc34bc8606198e5a318ebee1ea41b5787c7f9 57344 4 1795918454 (default) "
              "current HEAD")
        print("generic-2026-11-29T02:11:05Z 508b0e0f81b656f0397d992c4cbaa697e6006f0a "
              "57344 1 1795918265 (default) ")
        """,
    )
    listing = CvmfsServer(prefix, cwd=str(safe_cwd)).tag_list("refgc.local")
    assert listing.ok
    assert [t.name for t in listing] == ["trunk", "generic-2026-11-29T02:11:05Z"]
    assert len(listing) == 2
    assert listing.tags[0] == Tag(
        name="trunk",
        root_hash="d93dc34bc8606198e5a318ebee1ea41b5787c7f9",
        size_bytes=57344,
        revision=4,
        timestamp=datetime(2026, 11, 29, 2, 14, 14, tzinfo=UTC),
        branch="",
        description="current HEAD",
    )


def test_tag_list_failure_has_no_tags(tmp_path: Path, safe_cwd: Path) -> None:
    """A failed listing carries its outcome and no tags, rather than raising."""
    prefix = write_stub(
        tmp_path,
        """\
        print("failed to fetch repository manifest (8 - bad whitelist)", file=sys.stderr)
        sys.exit(1)
        """,
    )
    listing = CvmfsServer(prefix, cwd=str(safe_cwd)).tag_list("ref.local")
    assert not listing.ok
    assert listing.result.outcome is Outcome.WHITELIST_EXPIRED
    assert list(listing) == []


def test_tag_list_garbage_raises(tmp_path: Path, safe_cwd: Path) -> None:
    """A successful listing in an unknown format is an error, never a silently short list."""
    prefix = write_stub(tmp_path, 'print("Name │ Revision │ Timestamp")\n')
    with pytest.raises(CvmfsCommandError, match="tag listing"):
        CvmfsServer(prefix, cwd=str(safe_cwd)).tag_list("ref.local")


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["", "-f", "ref local", "ref.local/sub", "../x", "r;x", "$(x)"])
def test_invalid_repository_names_are_refused(echo_server: CvmfsServer, repo: str) -> None:
    """A repository name that could be read as an option or path is a programming error."""
    with pytest.raises(CvmfsCommandError, match="repository name"):
        echo_server.abort(repo)


@pytest.mark.parametrize("path", ["../etc", "sub/../..", "a b", "x;y", "$(x)", "sub/'q'"])
def test_invalid_transaction_paths_are_refused(echo_server: CvmfsServer, path: str) -> None:
    """A scope path with traversal or shell-significant characters is a programming error."""
    with pytest.raises(CvmfsCommandError, match="transaction path"):
        echo_server.transaction("ref.local", path=path)


@pytest.mark.parametrize(
    "message", ["$(reboot)", "a; b", "`id`", "it's", 'say "hi"', "fix -d", "x" * 201, "a\nb|c"]
)
def test_unsafe_publish_messages_are_refused(echo_server: CvmfsServer, message: str) -> None:
    """cvmfs_server re-parses messages with sh: shell syntax and option-like words are refused."""
    with pytest.raises(CvmfsCommandError, match="publish message"):
        echo_server.publish("ref.local", message=message)


@pytest.mark.parametrize("days", [0, 366, -1, True, 7.0, "7", "abc"])
def test_resign_days_are_validated(echo_server: CvmfsServer, days: object) -> None:
    """Whitelist validity must be an int from 1 to 365 (the tool itself accepts `-d abc`)."""
    with pytest.raises(CvmfsCommandError, match=r"1\.\.365"):
        echo_server.resign("ref.local", days=days)  # type: ignore[arg-type]


def test_gc_keep_options_are_mutually_exclusive(echo_server: CvmfsServer) -> None:
    """gc refuses both keep_revisions and keep_since, as the tool does."""
    with pytest.raises(CvmfsCommandError, match="mutually exclusive"):
        echo_server.gc("refgc.local", keep_revisions=1, keep_since=datetime.now(UTC))


def test_gc_keep_since_must_be_timezone_aware(echo_server: CvmfsServer) -> None:
    """A naive datetime is ambiguous on the command line and refused."""
    with pytest.raises(CvmfsCommandError, match="timezone-aware"):
        echo_server.gc("refgc.local", keep_since=datetime(2026, 1, 1))


@pytest.mark.parametrize("keep", [-1, True, 1.5])
def test_gc_keep_revisions_must_be_a_natural_number(echo_server: CvmfsServer, keep: object) -> None:
    """keep_revisions must be an int of at least 0."""
    with pytest.raises(CvmfsCommandError, match="keep_revisions"):
        echo_server.gc("refgc.local", keep_revisions=keep)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([], "at least one"),
        (["trunk"], "undo tag"),
        (["mytag", "trunk-previous"], "undo tag"),
        (["a b"], "invalid tag name"),
        (["it's"], "invalid tag name"),
        (["-f"], "invalid tag name"),
    ],
)
def test_tag_remove_validates_names(echo_server: CvmfsServer, names: list[str], match: str) -> None:
    """Tag removal refuses no names, undo tags and names the tool's shell would mangle."""
    with pytest.raises(CvmfsCommandError, match=match):
        echo_server.tag_remove("refgc.local", names)


@pytest.mark.parametrize("prefix", [(), ("",), ["cvmfs_server"], "cvmfs_server"])
def test_command_prefix_must_be_a_tuple_of_strings(prefix: object) -> None:
    """server_command is an argv prefix tuple, never a string for a shell."""
    with pytest.raises(CvmfsCommandError, match="server_command"):
        CvmfsServer(prefix)  # type: ignore[arg-type]


def test_missing_executable_raises(safe_cwd: Path) -> None:
    """A command that cannot be started is a configuration error, not an outcome."""
    server = CvmfsServer((str(safe_cwd / "no-such-cvmfs_server"),), cwd=str(safe_cwd))
    with pytest.raises(CvmfsCommandError, match="cannot start"):
        server.info("ref.local")


def test_nul_byte_in_argv_raises(echo_server: CvmfsServer) -> None:
    """An argument with a NUL byte cannot be passed and is refused before starting."""
    with pytest.raises(CvmfsCommandError, match="NUL"):
        echo_server.swissknife("graft", "a\0b")


def test_swissknife_needs_a_subcommand(echo_server: CvmfsServer) -> None:
    """Running swissknife without arguments is a programming error."""
    with pytest.raises(CvmfsCommandError, match="subcommand"):
        echo_server.swissknife()


# --- classification edge cases and logging ------------------------------------------------


def test_classify_edge_cases() -> None:
    """No exit status is TIMEOUT, exit 0 is OK whatever it printed, unknown text is FAILED."""
    assert classify("transaction", None, "", "") is Outcome.TIMEOUT
    assert classify("publish", 0, "WARNING: Open file descriptors on /cvmfs/r", "") is Outcome.OK
    assert classify("publish", 1, "", "something new") is Outcome.FAILED
    assert classify("transaction", 2, "", "") is Outcome.FAILED
    assert classify("check", 1, "", "unexpected") is Outcome.FAILED
    assert explain(Outcome.FAILED, "", "") == ""


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("29.812980102s", 29.812980102),
        ("0s", 0.0),
        ("1m30.5s", 90.5),
        ("2h0m0s", 7200.0),
        ("1h2m3s", 3723.0),
        ("850ms", 0.85),
        ("1.5\u00b5s", 1.5e-6),
        ("1.5us", 1.5e-6),
        ("12ns", 12e-9),
    ],
)
def test_lease_time_remaining_reads_go_durations(duration: str, seconds: float) -> None:
    """The gateway prints Go durations; each unit is converted to seconds."""
    stdout = f"Path busy. Time remaining = {duration}\n"
    assert parse_lease_time_remaining(stdout) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "Gateway reply: ok\n",
        "Path busy. Time remaining = soon\n",
        "Path busy. Time remaining = -1.5s\n",
        "Path busy. Time remaining = 5\n",
        "Path busy. Time remaining = 5x\n",
        "note: Path busy. Time remaining = 5s\n",
    ],
)
def test_lease_time_remaining_absent_or_unreadable(stdout: str) -> None:
    """No busy note, or one whose duration is not a Go duration, gives None."""
    assert parse_lease_time_remaining(stdout) is None


_PANIC = (
    "terminate called after throwing an instance of 'ECvmfsException'\n"
    "  what():  PANIC: <src>/cvmfs/session_context.cc : 405\n"
)


@pytest.mark.parametrize(
    ("subcommand", "exit_code", "stdout", "stderr", "expected"),
    [
        # a busy lease, by its final error line or by exit 16 alone, on any host or path
        ("transaction", 16, "Path busy. Time remaining = 2m0s\n", "", Outcome.LEASE_BUSY),
        (
            "transaction",
            1,
            "",
            "CernVM-FS transaction error: lease path busy\n",
            Outcome.LEASE_BUSY,
        ),
        # `transaction -t` got the lease after retrying, but the path was missing
        (
            "transaction",
            2,
            "Path busy. Time remaining = 1s\nrepository busy, retrying\nGateway reply: ok\n",
            "CernVM-FS transaction error: cannot open transaction on non-existing path /x\n",
            Outcome.PATH_SCOPE_MISSING,
        ),
        # the gateway unreachable with another curl error (28: timed out)
        (
            "transaction",
            1,
            "",
            "Make lease acquire request failed: 28. Reply: \n(unexpected termination) cannot\n",
            Outcome.GATEWAY_UNREACHABLE,
        ),
        (
            "publish",
            1,
            "",
            "SessionContext::Commit - curl_easy_perform failed: 6\nKilled\n",
            Outcome.GATEWAY_UNREACHABLE,
        ),
        (
            "abort",
            5,
            "",
            "Make lease drop request failed: 7. Reply: ''\ncannot drop lease\n",
            Outcome.GATEWAY_UNREACHABLE,
        ),
        # invalid lease, with other JSON spacing
        (
            "publish",
            1,
            "",
            "SessionContext::DoUpload - error reply: "
            '{"status": "error", "reason": "invalid lease"}\n' + _PANIC,
            Outcome.LEASE_INVALID,
        ),
        # a missing session token refuses maintenance, not a publish (whose token vanished)
        (
            "tag",
            1,
            "",
            "[ERROR] Session token file has to be provided when upstream type is gw.\n",
            Outcome.GATEWAY_UNSUPPORTED,
        ),
        (
            "publish",
            1,
            "",
            "[ERROR] Session token file has to be provided when upstream type is gw.\n",
            Outcome.FAILED,
        ),
        # archive messages count for ingest only; the old build's defect stays a failure
        ("ingest", 1, "", "x\n Truncated tar archive\nAborted\n", Outcome.ARCHIVE_UNREADABLE),
        ("publish", 1, "", "Unrecognized archive format\n", Outcome.FAILED),
        (
            "ingest",
            1,
            "",
            "Impossible to open the archive: No formats registered\n",
            Outcome.FAILED,
        ),
        (
            "ingest",
            1,
            "",
            "catalog for file 'base/usr/bin/tool' cannot be found, aborting\nAborted\n",
            Outcome.ARCHIVE_HARDLINK_OUTSIDE,
        ),
    ],
)
def test_gateway_and_ingest_rules_beyond_the_recordings(
    subcommand: str, exit_code: int, stdout: str, stderr: str, expected: Outcome
) -> None:
    """The new rules hold for other hosts, paths, curl codes and spacing, and stay in scope."""
    assert classify(subcommand, exit_code, stdout, stderr) is expected


def test_every_outcome_has_a_row_in_the_failure_table() -> None:
    """docs/failures.md says what each outcome means and what the daemon does about it."""
    table = (Path(__file__).parents[2] / "docs" / "failures.md").read_text(encoding="utf-8")
    missing = [o.name for o in Outcome if f"| `{o.name}` |" not in table]
    assert missing == []


def test_each_call_is_logged_with_clipped_output(tmp_path: Path, safe_cwd: Path) -> None:
    """A call logs argv, outcome, exit code, duration and reason, with long output clipped."""
    prefix = write_stub(
        tmp_path,
        """\
        print("x" * 10000)
        print("Garbage Collection is not enabled for ref.local", file=sys.stderr)
        sys.exit(1)
        """,
    )
    server = CvmfsServer(prefix, cwd=str(safe_cwd))
    with structlog.testing.capture_logs() as logs:
        server.gc("ref.local")
    (entry,) = [e for e in logs if e["event"] == "cvmfs command failed"]
    assert entry["argv"] == [*prefix, "gc", "-f", "ref.local"]
    assert entry["outcome"] == "gc_not_enabled"
    assert entry["exit_code"] == 1
    assert entry["reason"] == "Garbage Collection is not enabled for ref.local"
    assert isinstance(entry["duration_s"], float)
    assert 1000 < len(entry["stdout"]) < 2000
    assert "chars omitted" in entry["stdout"]
    assert entry["log_level"] == "warning"


def test_successful_call_logs_at_info(echo_server: CvmfsServer) -> None:
    """A successful call is logged once at info level."""
    with structlog.testing.capture_logs() as logs:
        echo_server.mount("ref.local")
    assert [(e["event"], e["log_level"], e["outcome"]) for e in logs] == [
        ("cvmfs command", "info", "ok")
    ]
