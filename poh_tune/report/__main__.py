"""`python -m poh_tune.report EXP_DIR [--out DIR]`."""

import sys

from poh_tune.report import main

sys.exit(main())
