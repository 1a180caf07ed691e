"""``python -m experiments.tagging``."""

import sys

from experiments.tagging.cli import main

if __name__ == "__main__":
    sys.exit(main())
