"""Command-line pieces every experiment shares."""

import argparse

__all__ = ["CLI_MODES", "add_mode_argument"]

#: meProp modes as the command lines spell them (``per_example`` is accepted too).
CLI_MODES: tuple[str, ...] = ("unified", "per-example", "random")


def add_mode_argument(group: argparse._ActionsContainer) -> None:
    """Adds the ``--mode`` option every experiment shares."""
    group.add_argument(
        "--mode",
        type=lambda text: text.replace("_", "-"),
        choices=CLI_MODES,
        default="unified",
        help="unified (one top-k set per minibatch, the default), per-example (the paper's "
        "CPU variant) or random (the control)",
    )
