"""SQLite state in ``state_dir``: :class:`State`, the one object that holds it.

One database, ``state_dir/state.sqlite`` (WAL mode), shared by the daemon's lanes and the
one-shot CLI commands. Paths are stored as bytes (``os.fsencode``) so that names which are
not UTF-8 survive unchanged. The journal row that says a transaction is being opened is
committed *before* the command runs: after a crash, an open transaction is ours exactly
when the journal says so.

Schema version 3 (:data:`SCHEMA_VERSION`; older databases are migrated forward when opened,
newer ones refused). Its tables, each with the module that owns it:

- ``meta``: the schema version (``schema``);
- ``batches``, ``batch_ops``, ``created_objects``: the batch journal (``journal``);
- ``published``, with its generated ``scan_key``: the index of what is live (``published``);
- ``set_aside``, ``releases``: refused inputs and operator releases of held batches
  (``set_aside``);
- ``maintenance_runs``: the records of maintenance tasks (``maintenance_runs``);
- ``s3_objects``: the S3 listings (``s3_listing``).

``State`` is composed of one part per concern: each part is a subclass of
:class:`~cvmfs_syncd.state.database.Database`, which opens the database and owns the one
connection, its lock and the transaction helper, so all parts share them. ``schema`` holds
the tables and migrations that opening applies.
"""

from __future__ import annotations

from cvmfs_syncd.state.database import decode_path, encode_path
from cvmfs_syncd.state.journal import FINAL_STAGES, STAGES, Journal, JournalBatch
from cvmfs_syncd.state.maintenance_runs import MaintenanceRecord, MaintenanceRuns
from cvmfs_syncd.state.published import (
    PublishedEntry,
    PublishedIndex,
    dir_scan_key,
    file_scan_key,
    scan_key,
)
from cvmfs_syncd.state.s3_listing import S3Listing
from cvmfs_syncd.state.schema import SCHEMA_VERSION
from cvmfs_syncd.state.set_aside import SetAside

__all__ = [
    "FINAL_STAGES",
    "SCHEMA_VERSION",
    "STAGES",
    "JournalBatch",
    "MaintenanceRecord",
    "PublishedEntry",
    "State",
    "decode_path",
    "dir_scan_key",
    "encode_path",
    "file_scan_key",
    "scan_key",
]


class State(Journal, PublishedIndex, SetAside, MaintenanceRuns, S3Listing):
    """The state database. Thread-safe: one connection guarded by a lock.

    ``State(state_dir)`` opens it (see :class:`~cvmfs_syncd.state.database.Database`); its
    methods are those of its parts, one per concern.
    """
