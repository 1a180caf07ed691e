"""``python -m experiments.parsing``."""

import sys

from experiments.parsing.main import main

if __name__ == "__main__":
    sys.exit(main())
