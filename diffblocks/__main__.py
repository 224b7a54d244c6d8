"""``python -m diffblocks`` runs the command line."""

import sys

from diffblocks.cli import main

sys.exit(main())
