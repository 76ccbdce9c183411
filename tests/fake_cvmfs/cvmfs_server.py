#!/usr/bin/env python3
"""The executable fake ``cvmfs_server``: ``cvmfs_server.py --root ROOT <subcommand> ...``.

``FakeStratum0``'s ``ROOT/bin/cvmfs_server`` wrapper runs this file by path (``python -S``),
and ``FakeStratum0.orphans`` finds the fake's processes by it. The fake itself is the
``server`` package beside it (``tests.fake_cvmfs.server``).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run by path, sys.path[0] is this directory; the package is imported by its full name
    # (as the tests import it), so the checkout's top directory takes that place.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    from tests.fake_cvmfs.server.cli import main

    sys.exit(main())
