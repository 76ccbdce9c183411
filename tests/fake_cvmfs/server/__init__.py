"""The fake ``cvmfs_server``: a stateful stand-in for the CernVM-FS 2.12 command.

Run as ``cvmfs_server.py --root ROOT <subcommand> [options] <repository>`` (the executable
beside this package, which calls ``cli.main``). Everything the fake touches lives below
ROOT: the configuration (``ROOT/etc/cvmfs``), the union directory (``ROOT/cvmfs/<repo>``,
a plain directory), the spool (``ROOT/var/spool/cvmfs/<repo>``), the storage
(``ROOT/srv/cvmfs/<repo>``) and the fake's own bookkeeping (``ROOT/fake``). Exit codes,
the stdout/stderr split and the messages follow the recordings in
``cvmfs-reference/transcripts``; ``docs/fake-cvmfs.md`` lists what is modelled, what is
not, and which recording each behaviour comes from. The package is stdlib-only so that
the fake starts quickly.

Modules, each importing only the ones listed before it (``catalog`` and ``faults`` name
later ones in annotations only):

- ``recorded``: texts and values copied from the recordings
- ``files``, ``clock``: atomic writes, JSON files and flocks; the fake clock, date formats
- ``storage``: object names, hashes and contents; the signed manifest and whitelist
- ``catalog``: the published tree (entries, revisions, tag rows) and the client view
- ``repository``: ``Repo``, one repository's paths, configuration, objects, bookkeeping
- ``union``: scans and snapshots of the union directory, and restoring it
- ``faults``: injected faults and calibrated costs (and where F1 to F10 are modelled)
- ``context``: one invocation (options, output, exit, locks, fault points)
- ``checks``: what several commands check before acting
- ``garbage``: mark and sweep, for ``gc`` and publish's automatic gc
- ``sync``: publish's sync (the new catalog, uploads, grafts, the union afterwards)
- ``tarball``: reading a tar where libarchive (ingest's reader) fails and ends
- ``nested``: nested catalogs from ``.cvmfscatalog`` markers, the catalogs' row ids
- ``ingestion``: what swissknife ingest makes of deletions and a tar's members
- ``commands``: one module per subcommand, ``COMMANDS`` by name
- ``cli``: the command line

Where additions go:

- a subcommand (``snapshot``, say): ``commands/<name>.py`` with ``cmd_<name>(ctx, args)``,
  added to ``COMMANDS`` in ``commands/__init__.py``; its fault points are
  ``ctx.fault("<point>", ...)`` calls, listed in docs/fake-cvmfs.md's fault table;
- texts copied from new recordings (a gateway's, say): ``recorded.py``, under a heading
  naming the transcripts they come from (a message printed in one place only may stay
  inline there);
- state that several commands share (a gateway's leases, say): a module of its own next
  to ``repository.py``, used by the commands through ``Repo`` paths;
- a new fault action or cost key: ``faults.py``.

The names below are what the test handle (``stratum0.py``) and the fake's tests use.
"""

from tests.fake_cvmfs.server.catalog import Catalog, read_file_content, store_history
from tests.fake_cvmfs.server.clock import fake_now
from tests.fake_cvmfs.server.commands.mkfs import current_user
from tests.fake_cvmfs.server.commands.tag import MAX_ARG_STRLEN, tag_remove_shell_argument
from tests.fake_cvmfs.server.files import read_json, write_atomic
from tests.fake_cvmfs.server.garbage import parse_last_gc
from tests.fake_cvmfs.server.repository import Repo, record_refs
from tests.fake_cvmfs.server.storage import hash_hex, text_part
from tests.fake_cvmfs.server.union import load_snapshot, scan_tree

__all__ = [
    "MAX_ARG_STRLEN",
    "Catalog",
    "Repo",
    "current_user",
    "fake_now",
    "hash_hex",
    "load_snapshot",
    "parse_last_gc",
    "read_file_content",
    "read_json",
    "record_refs",
    "scan_tree",
    "store_history",
    "tag_remove_shell_argument",
    "text_part",
    "write_atomic",
]
