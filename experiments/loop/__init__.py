"""The one training loop every experiment shares."""

from experiments.loop.core import *  # noqa: F403
from experiments.loop.core import __all__  # noqa: F401
