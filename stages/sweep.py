"""`python -m stages.sweep`: run a named sweep as DVC experiments, then the scaling report (stages/tools/sweep.py).

A tool a person runs across runs, not a DVC stage: its code lives in stages/tools/, and this module keeps the
command's name."""

import sys

from stages.tools.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
