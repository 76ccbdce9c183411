"""Mount repair at lane start: compare the mounts with the spool (l_stale_mount) and run
``cvmfs_server mount`` when that is safe; everything else is reported."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from cvmfs_syncd.cvmfs.repo import RepositoryLayout
from cvmfs_syncd.cvmfs.server import CvmfsServer
from cvmfs_syncd.maintenance.policy import mount_health, parse_mount_table, repair_plan
from cvmfs_syncd.pipeline.transaction import describe

log = structlog.get_logger(__name__)


def read_mount_table(path: str = "/proc/self/mountinfo") -> dict[str, str] | None:
    """Return mount point → ``"rw"``/``"ro"`` from the kernel's mount table, or None.

    None means the table cannot be read (then nothing is repaired on its evidence).
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return parse_mount_table(handle.read().splitlines())
    except OSError:
        return None


def repair(
    layout: RepositoryLayout,
    server: CvmfsServer,
    table: Mapping[str, str] | None,
    *,
    timeout: float,
) -> list[str]:
    """Compare mounts and transaction with what they should be; repair what is safe.

    ``table`` is the mount table (None: unknown). Return the findings (also logged).
    """
    health = mount_health(layout, table) if table is not None else None
    do_mount, findings = repair_plan(layout.in_transaction(), layout.is_collecting(), health)
    if do_mount:
        result = server.mount(layout.name, timeout=timeout)
        findings.append("cvmfs_server mount: " + ("done" if result.ok else describe(result)))
    for finding in findings:
        log.warning("repository repair", repository=layout.name, finding=finding)
    return findings
