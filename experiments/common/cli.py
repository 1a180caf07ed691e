"""Command-line pieces every experiment shares."""

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from experiments.common.errors import ConfigError, DataError

__all__ = [
    "CLI_MODES",
    "GROUPS",
    "OneLineErrorParser",
    "TaskParser",
    "add_mode_argument",
    "add_predict_arguments",
    "flag_group",
    "run_name_tail",
    "user_errors",
]

#: meProp modes as the command lines spell them (``per_example`` is accepted too).
CLI_MODES: tuple[str, ...] = ("unified", "per-example", "random")

#: The flag groups of every task's ``--help``, in this order (a task shows those it has).
GROUPS: tuple[str, ...] = (
    "model",
    "data",
    "meProp",
    "meSimp",
    "training",
    "checkpoints",
    "prediction",
    "several processes",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line plus a pointer to ``--help`` (the
    full usage block of many flags would bury the line that matters)."""

    def error(self, message: str) -> NoReturn:
        """Prints ``<prog>: error: <message>`` and ``see '<prog> --help'``; exits with 2."""
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


class TaskParser(OneLineErrorParser):
    """A :class:`OneLineErrorParser` whose ``--help`` lists the flags under :data:`GROUPS`, in
    that order whichever module adds them first."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("usage", "%(prog)s [flags]  (grouped below)")
        super().__init__(**kwargs)
        for title in GROUPS:
            self.add_argument_group(title)


def flag_group(
    parser: argparse.ArgumentParser, title: str, description: str | None = None
) -> argparse._ArgumentGroup:
    """The group ``title`` of ``parser`` (made if it has none yet, e.g. in a plain
    :class:`argparse.ArgumentParser`); ``description``, when given, becomes its text."""
    for group in parser._action_groups:
        if group.title == title:
            break
    else:
        group = parser.add_argument_group(title)
    if description is not None:
        group.description = description
    return group


def set_helps(parser: argparse.ArgumentParser, helps: dict[str, str]) -> None:
    """Replaces the help text of the flags whose ``dest`` is in ``helps`` (a task's own
    defaults, where they differ from the shared loop's)."""
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)


def add_mode_argument(
    group: argparse._ActionsContainer, default: str = "unified", why: str = ""
) -> None:
    """Adds the ``--mode`` option every experiment shares; ``default`` is the task's choice
    and ``why`` the reason for it, said in the help."""
    reason = f": {why}" if why else ""
    group.add_argument(
        "--mode",
        type=lambda text: text.replace("_", "-"),
        choices=CLI_MODES,
        default=default,
        help=f"unified (one top-k set per minibatch), per-example (each example its own top-k, "
        f"the paper's CPU variant) or random (the control); default {default}{reason}",
    )


def add_kernel_layout_argument(group: Any, stored: str, auto_when: str) -> None:
    """``--kernel-layout {auto,in_out,out_in}``; ``stored`` names the kernels it stores,
    ``auto_when`` the settings for which ``auto`` picks ``out_in``. See
    :func:`resolve_kernel_layout`."""
    group.add_argument(
        "--kernel-layout",
        choices=("auto", "in_out", "out_in"),
        default="auto",
        help=f"how {stored} stored: in_out ([in, out], flax's) or out_in ([out, in], the fast "
        "layout of per-row top-k; same values and math); auto (default) is out_in for "
        f"{auto_when}, without --mesimp, else in_out",
    )


def resolve_kernel_layout(requested: str, fast: bool, mesimp: bool) -> str:
    """``--kernel-layout`` resolved: ``auto`` is ``out_in`` where the per-row path is
    ``fast`` and meSimp is off (it shrinks ``[in, out]`` kernels only).

    Raises:
      ConfigError: ``out_in`` with ``--mesimp``.
    """
    if requested == "auto":
        return "out_in" if fast and not mesimp else "in_out"
    layout = requested
    if layout == "out_in" and mesimp:
        raise ConfigError("--mesimp needs [in, out] kernels: drop --kernel-layout out_in")
    return layout


def resumed_layout(requested: str, resolved: str, saved: Mapping[str, Any] | None) -> str:
    """``--kernel-layout`` on ``--resume``: ``auto`` keeps the layout in the run's ``saved``
    settings (``in_out`` when they predate the flag), so that a run begun before ``auto``
    picked ``out_in`` goes on as it began; an explicit layout, or no saved run, is kept."""
    if requested != "auto" or saved is None:
        return resolved
    return str(saved.get("kernel_layout", "in_out"))


def add_predict_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """The ``prediction`` group: ``--predict FILE`` (``action``: what is done to FILE, e.g.
    "tag FILE") and ``--predict-output PATH``."""
    group = flag_group(parser, "prediction")
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
    """Ends the program with a one-line message and exit code 2, not a traceback, on a bad
    flag (:class:`ConfigError`, as a usage error) or bad data (:class:`DataError` and
    ``also``)."""
    try:
        yield
    except ConfigError as exc:
        parser.error(str(exc))
    except (DataError, *also) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
