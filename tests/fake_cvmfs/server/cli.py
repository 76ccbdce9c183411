"""The command line: ``[--root ROOT] <subcommand> ...`` (ROOT also from ``$FAKE_CVMFS_ROOT``)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from tests.fake_cvmfs.server.commands import COMMANDS
from tests.fake_cvmfs.server.context import CommandExit, Context, OptionError


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[--root ROOT] <subcommand> ...`` (ROOT also from ``$FAKE_CVMFS_ROOT``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    root_text = os.environ.get("FAKE_CVMFS_ROOT")
    if len(args) >= 2 and args[0] == "--root":
        root_text = args[1]
        args = args[2:]
    elif args and args[0].startswith("--root="):
        root_text = args[0].partition("=")[2]
        args = args[1:]
    if not root_text:
        sys.stderr.write("fake cvmfs_server: --root ROOT (or $FAKE_CVMFS_ROOT) is required\n")
        return 2
    if not args or args[0] not in COMMANDS:
        sys.stderr.write(
            "Usage: cvmfs_server COMMAND [options] <parameters>\n"
            f"Supported by the fake: {', '.join(sorted(COMMANDS))}\n"
        )
        return 2
    root = Path(root_text).absolute()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="surrogateescape")
    ctx = Context(root, args[0])
    try:
        COMMANDS[args[0]](ctx, args[1:])
    except CommandExit as done:
        return done.code
    except OptionError as exc:
        ctx.err(f"cvmfs_server {args[0]}: {exc}\n")
        return 1
    finally:
        ctx.release_locks()
    return 0
