"""``python -m experiments.bench``."""

from experiments.bench.cli import main

if __name__ == "__main__":
    main()
