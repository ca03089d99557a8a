"""`python -m stages.audit`: the audit: trace a reported FID hash by hash to its inputs (stages/tools/audit.py).

A tool a person runs across runs, not a DVC stage: its code lives in stages/tools/, and this module keeps the
command's name."""

import sys

from stages.tools.audit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
