"""``python -m cvmfs_syncd`` runs the command-line interface."""

import sys

from cvmfs_syncd.cli import main

sys.exit(main())
