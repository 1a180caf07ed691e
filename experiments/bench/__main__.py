"""``python -m experiments.bench``."""

from experiments.bench.main import main

if __name__ == "__main__":
    main()
