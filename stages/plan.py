"""`python -m stages.plan`: compile the train step, sampler and Inception for a Cloud TPU topology on this
machine, with HBM fit, flops and a roofline bound (stages/tools/plan.py).

A tool a person runs before renting a slice, not a DVC stage: its code lives in stages/tools/, and this module
keeps the command's name."""

import sys

from stages.tools.plan import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
