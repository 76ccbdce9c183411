"""The file-system edge: reading staging directories and writing the repository's union dir.

Everything here runs as root on input that other people control, so every path is walked
one component at a time from a directory file descriptor with ``O_NOFOLLOW``: no symbolic
link inside a staging directory or inside the union directory is ever followed. Only the
configured roots themselves (``root``, ``source_root``, ``union_root``) are opened by
path, because they come from the administrator.

Path arguments are ``str`` as produced by :func:`os.fsdecode` (surrogate escapes stand for
bytes that are not UTF-8), ``/``-separated and relative to their root; they are checked
with :func:`cvmfs_syncd.paths.split_repo_path` and ValueError is raised for unsafe ones.

This package re-exports the public names of its modules: :mod:`.walk` (one entry, or a
tree in directory order), :mod:`.scan` (a tree in byte order, for reconciliation),
:mod:`.union` (writing the union dir), :mod:`.copying` (copying a staged file into it),
:mod:`.staged` (opening and removing staged entries in place), all built on
:mod:`.descriptors` (opening, descending, lstat and temporary names by descriptor).
"""

from cvmfs_syncd.fsops.copying import COPY_CHUNK, CopyOutcome, copy_file
from cvmfs_syncd.fsops.scan import (
    ScanFound,
    file_fingerprint,
    fingerprint_of,
    scan_staging,
    scan_staging_runs,
)
from cvmfs_syncd.fsops.staged import (
    has_writers,
    open_staged,
    remove_marker_if_alone,
    remove_staged,
    still_matches,
)
from cvmfs_syncd.fsops.union import (
    DEFAULT_DIR_MODE,
    UnionWriter,
    delete,
    make_dir,
    make_symlink,
    write_file,
    write_stream,
)
from cvmfs_syncd.fsops.walk import MAX_DEPTH, Skipped, stat_entry, walk_staging

__all__ = [
    "COPY_CHUNK",
    "DEFAULT_DIR_MODE",
    "MAX_DEPTH",
    "CopyOutcome",
    "ScanFound",
    "Skipped",
    "UnionWriter",
    "copy_file",
    "delete",
    "file_fingerprint",
    "fingerprint_of",
    "has_writers",
    "make_dir",
    "make_symlink",
    "open_staged",
    "remove_marker_if_alone",
    "remove_staged",
    "scan_staging",
    "scan_staging_runs",
    "stat_entry",
    "still_matches",
    "walk_staging",
    "write_file",
    "write_stream",
]
