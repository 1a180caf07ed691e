"""``python -m experiments.mnist``: see :mod:`experiments.mnist.cli` for the flags."""

import sys

from experiments.mnist.cli import main

if __name__ == "__main__":
    sys.exit(main())
