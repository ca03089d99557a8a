"""`python -m stages.scaling`: the scaling report, DVC experiments gathered into the paper's figures
(stages/tools/scaling.py).

A tool a person runs across runs, not a DVC stage: its code lives in stages/tools/, and this module keeps the
command's name."""

import sys

from stages.tools.scaling import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
