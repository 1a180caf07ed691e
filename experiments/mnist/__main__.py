"""``python -m experiments.mnist``."""

import sys

from experiments.mnist.main import main

if __name__ == "__main__":
    sys.exit(main())
