"""``python -m experiments.report``: see :mod:`experiments.report.cli` for the flags."""

import sys

from experiments.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
