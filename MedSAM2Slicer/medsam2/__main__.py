"""``python -m medsam2 ...``: the same command line as the ``medsam2`` script, so that launchers which
run modules (``torchrun --nproc-per-node N -m medsam2 evaluate ...``) can start it."""

import sys

from medsam2.cli import main

if __name__ == "__main__":
    sys.exit(main())
