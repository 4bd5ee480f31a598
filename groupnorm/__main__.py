"""``python -m groupnorm ...`` runs the same as the ``groupnorm`` command."""

import sys

from groupnorm.cli import run

sys.exit(run())
