"""One invocation of the fake: options, output streams, exit, clock, locks and fault points."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tests.fake_cvmfs.server.clock import fake_now
from tests.fake_cvmfs.server.faults import fire, hang, take_fault
from tests.fake_cvmfs.server.repository import Repo


class OptionError(Exception):
    """A command line that does not match a subcommand's options."""


def parse_options(args: list[str], spec: str) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU-style short options: ``spec`` as for getopt (``"m:f"``); options may follow operands."""
    takes_value = {c for i, c in enumerate(spec) if c != ":" and spec[i + 1 : i + 2] == ":"}
    known = {c for c in spec if c != ":"}
    opts: list[tuple[str, str]] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            rest.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            rest.append(arg)
            continue
        position = 1
        while position < len(arg):
            letter = arg[position]
            position += 1
            if letter not in known:
                raise OptionError(f"invalid option -- '{letter}'")
            if letter not in takes_value:
                opts.append((f"-{letter}", ""))
                continue
            if position < len(arg):
                opts.append((f"-{letter}", arg[position:]))
            elif index < len(args):
                opts.append((f"-{letter}", args[index]))
                index += 1
            else:
                raise OptionError(f"option requires an argument -- '{letter}'")
            break
    return opts, rest


class CommandExit(Exception):
    """Raised to end a subcommand with an exit code (after its output was written)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Context:
    """Output streams, clock, locks and fault points of one fake invocation."""

    def __init__(self, root: Path, command: str) -> None:
        self.root = root
        self.command = command
        self.repo_name: str | None = None
        self._locks: list[Any] = []
        self._storage: dict[str | None, str | None] = {}
        self.started = time.monotonic()
        # the process that started the fake (the ``orphaned`` fault action waits for its end)
        self.parent = os.getppid()
        # publish stops at its first write to a closed stdout/stderr (faults.md F8)
        self.fail_on_broken_pipe = False

    # -- output -----------------------------------------------------------------------
    def out(self, text: str) -> None:
        """Write to stdout (flushed, so prompts and crashes keep the order)."""
        self._write(sys.stdout, text)

    def err(self, text: str) -> None:
        """Write to stderr."""
        self._write(sys.stderr, text)

    def _write(self, stream: Any, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            # whatever is written later (and the interpreter's last flush) goes nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)
            if self.fail_on_broken_pipe:
                raise CommandExit(1) from None

    def ask(self) -> str | None:
        """Read one answer line from stdin (None at EOF)."""
        line = sys.stdin.readline()
        return line.strip() if line else None

    def now(self) -> float:
        """The fake clock."""
        return fake_now(self.root)

    def pad_until(self, seconds: float) -> None:
        """Sleep until ``seconds`` have passed since this invocation started (calibrated costs)."""
        remaining = self.started + seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    # -- locking ----------------------------------------------------------------------
    def lock_repo(self, repo: Repo, *, wait: bool = True) -> bool:
        """Take the repository's internal flock for the rest of the command.

        With ``wait=False`` give up at once (returning False) when another process holds it.
        """
        path = repo.state_dir / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._locks.append(handle)
        return True

    def release_locks(self) -> None:
        """Drop every internal flock this process holds."""
        for handle in self._locks:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
        self._locks.clear()

    # -- faults -----------------------------------------------------------------------
    def fault(self, at: str, fail: Callable[[dict[str, Any]], NoReturn] | None = None) -> None:
        """A fault-injection point: fire the first matching rule of ``fake-faults.json``."""
        rule = take_fault(self.root, self.command, at, self.repo_name)
        if rule is not None:
            fire(self, rule, at, fail)

    def fail_with(self, rule: dict[str, Any], stdout: str, stderr: str, code: int) -> NoReturn:
        """Print a failure (the rule's texts override the defaults) and exit."""
        self.out(str(rule["stdout"]) if rule.get("stdout") is not None else stdout)
        self.err(str(rule["stderr"]) if rule.get("stderr") is not None else stderr)
        raise CommandExit(int(rule["exit_code"]) if rule.get("exit_code") is not None else code)

    def storage_fault(self) -> str | None:
        """The storage condition for the current repository: None, "unreachable" or hang.

        Looked up once per repository and invocation, so ``times`` counts commands.
        """
        if self.repo_name not in self._storage:
            rule = take_fault(self.root, "storage", "access", self.repo_name)
            self._storage[self.repo_name] = None if rule is None else str(rule.get("action"))
        action = self._storage[self.repo_name]
        if action == "hang":
            hang(self)
        return action
