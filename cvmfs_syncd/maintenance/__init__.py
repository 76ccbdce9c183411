"""Repository maintenance: re-signing the whitelist, garbage collection, checks, repair.

Three quiet ways to lose a repository are prevented here: the whitelist expires (30 days
after signing; then clients refuse the repository and even ``abort`` fails), garbage is
never collected, or a gc collides with a publish. ``scheduler.py`` decides when; this
package decides whether (``policy``, pure) and does it (``resign``, ``gc``, ``check``,
``repair``), records every run (``runs``) and puts one repository's tasks together
(``repository``).
"""

from cvmfs_syncd.maintenance.repository import RepositoryMaintenance, run_once
from cvmfs_syncd.maintenance.runs import TaskResult, Verdict

__all__ = ["RepositoryMaintenance", "TaskResult", "Verdict", "run_once"]
