"""Command-line pieces every experiment shares."""

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from experiments.common.errors import ConfigError, DataError

__all__ = [
    "CLI_MODES",
    "add_mode_argument",
    "add_predict_arguments",
    "run_name_tail",
    "user_errors",
]

#: meProp modes as the command lines spell them (``per_example`` is accepted too).
CLI_MODES: tuple[str, ...] = ("unified", "per-example", "random")


def add_mode_argument(group: argparse._ActionsContainer, default: str = "unified") -> None:
    """Adds the ``--mode`` option every experiment shares; ``default`` is the task's choice."""
    group.add_argument(
        "--mode",
        type=lambda text: text.replace("_", "-"),
        choices=CLI_MODES,
        default=default,
        help=f"unified (one top-k set per minibatch), per-example (the paper's CPU variant) or "
        f"random (the control); default {default}",
    )


def add_predict_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """The ``prediction`` group: ``--predict FILE`` (``action``: what is done to FILE, e.g.
    "tag FILE") and ``--predict-output PATH``."""
    group = parser.add_argument_group("prediction")
    group.add_argument(
        "--predict",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"{action} with the model saved in the run folder --out, write it, and exit",
    )
    group.add_argument(
        "--predict-output",
        type=Path,
        default=None,
        metavar="PATH",
        help="where --predict writes (default <out>/predicted-<FILE name>)",
    )


def run_name_tail(
    args: argparse.Namespace,
    *,
    k_output: int = 0,
    dropout: float = 0.0,
    default_dropout: float = 0.0,
    extra: tuple[str, ...] = (),
    limit_train: int | None = None,
) -> list[str]:
    """The last parts of a default run folder's name: the flags that differ from their
    defaults (learning rate, clipping, output k, dropout, then ``extra``, then the data limit)."""
    parts = []
    if args.lr is not None:
        parts.append(f"lr{args.lr:g}")
    if args.clip > 0:
        parts.append(f"clip{args.clip:g}")
    if k_output:
        parts.append(f"ko{k_output}")
    if dropout != default_dropout:
        parts.append(f"drop{dropout:g}")
    parts += extra
    if limit_train is not None:
        parts.append(f"n{limit_train}")
    return parts


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser, *also: type[Exception]) -> Iterator[None]:
    """Ends the program with argparse's one-line message and exit code 2, not a traceback,
    on a bad flag (:class:`ConfigError`) or bad data (:class:`DataError` and ``also``)."""
    try:
        yield
    except ConfigError as exc:
        parser.error(str(exc))
    except (DataError, *also) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
