"""``python -m sipwake`` runs the ``sipwake`` command."""

import sys

from sipwake.cli import main

sys.exit(main())
