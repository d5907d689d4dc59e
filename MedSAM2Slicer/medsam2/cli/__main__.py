"""``python -m medsam2.cli ...``: the same as the ``medsam2`` command."""

import sys

from medsam2.cli.main import main

sys.exit(main())
