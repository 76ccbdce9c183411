"""The subcommands by name (``COMMANDS``), one module each.

A new subcommand is a module here with ``cmd_<name>(ctx, args)``, added to ``COMMANDS``.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.fake_cvmfs.server.commands.abort import cmd_abort
from tests.fake_cvmfs.server.commands.check import cmd_check
from tests.fake_cvmfs.server.commands.diff import cmd_diff
from tests.fake_cvmfs.server.commands.gc import cmd_gc
from tests.fake_cvmfs.server.commands.info import cmd_info
from tests.fake_cvmfs.server.commands.ingest import cmd_ingest
from tests.fake_cvmfs.server.commands.list import cmd_list
from tests.fake_cvmfs.server.commands.list_catalogs import cmd_list_catalogs
from tests.fake_cvmfs.server.commands.mkfs import cmd_mkfs
from tests.fake_cvmfs.server.commands.mount import cmd_mount
from tests.fake_cvmfs.server.commands.publish import cmd_publish
from tests.fake_cvmfs.server.commands.resign import cmd_resign
from tests.fake_cvmfs.server.commands.rmfs import cmd_rmfs
from tests.fake_cvmfs.server.commands.tag import cmd_tag
from tests.fake_cvmfs.server.commands.transaction import cmd_transaction
from tests.fake_cvmfs.server.context import Context

COMMANDS: dict[str, Callable[[Context, list[str]], None]] = {
    "mkfs": cmd_mkfs,
    "transaction": cmd_transaction,
    "publish": cmd_publish,
    "abort": cmd_abort,
    "list": cmd_list,
    "info": cmd_info,
    "mount": cmd_mount,
    "resign": cmd_resign,
    "tag": cmd_tag,
    "check": cmd_check,
    "gc": cmd_gc,
    "rmfs": cmd_rmfs,
    "diff": cmd_diff,
    "ingest": cmd_ingest,
    "list-catalogs": cmd_list_catalogs,
}
