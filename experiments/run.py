"""Run one experiment config: train it, then print where its results are.

    python experiments/run.py experiments/configs/heartbeat.yaml [bdiff train options]

The same as ``bdiff train CONFIG ...``; kept as a script so an experiment is one command.
"""

import sys

from bdiff_pyro.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
