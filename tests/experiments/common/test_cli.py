"""Tests of the three tasks' command lines as a newcomer meets them: grouped ``--help``,
defaults with their reasons, one-line usage errors."""

import argparse
import os
from pathlib import Path

import pytest

from experiments.common.cli import GROUPS, TaskParser, flag_group
from experiments.mnist import cli as mnist_cli
from experiments.parsing import main as parsing_main
from experiments.tagging import cli as tagging_cli

PARSERS = {
    "mnist": mnist_cli.build_parser,
    "tagging": tagging_cli.build_parser,
    "parsing": parsing_main.build_parser,
}
MAINS = {"mnist": mnist_cli.main, "tagging": tagging_cli.main, "parsing": parsing_main.main}

#: Where some flags of every task belong.
PLACES = {
    "meProp": ("--k", "--mode", "--error-feedback", "--adaptive-k"),
    "data": ("--data-dir", "--limit-train"),
    "meSimp": ("--mesimp", "--export"),
    "training": ("--epochs", "--optimizer", "--lr", "--batch-size", "--seed", "--devices"),
    "checkpoints": ("--out", "--resume", "--overwrite", "--keep-checkpoints"),
    "several processes": ("--coordinator", "--num-processes", "--process-id"),
}


def groups(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``{group title: its long flags}`` of the groups ``--help`` shows, in its order."""
    shown = {}
    for group in parser._action_groups:
        flags = [
            s
            for a in group._group_actions
            if a.help is not argparse.SUPPRESS
            for s in a.option_strings
            if s.startswith("--") and s != "--help"
        ]
        if flags:
            shown[group.title] = flags
    return shown


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help text of ``flag``, as ``--help`` shows it before wrapping."""
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action.help % {"default": action.default, "prog": parser.prog}


@pytest.mark.parametrize("task", PARSERS)
def test_help_groups_the_flags_in_the_same_order(task: str) -> None:
    shown = groups(PARSERS[task]())
    titles = list(shown)
    assert titles == [t for t in GROUPS if t in titles]
    want = ["model", "data", "meProp", "meSimp", "training", "checkpoints", "several processes"]
    assert [t for t in titles if t != "prediction"] == want
    assert ("prediction" in titles) == (task != "mnist")
    for title, flags in PLACES.items():
        assert set(flags) <= set(shown[title]), (title, shown[title])
    # Every flag sits in a named group: none left in argparse's catch-all "options".
    assert "options" not in shown


@pytest.mark.parametrize(
    ("task", "default", "reason"),
    [
        ("mnist", "unified", "50 x k = 1,500, cover the 500 hidden units"),
        ("tagging", "unified", "the whole layer"),
        ("parsing", "per-example", "the paper's CPU parser"),
    ],
)
def test_mode_help_gives_the_default_and_why(task: str, default: str, reason: str) -> None:
    parser = PARSERS[task]()
    text = help_of(parser, "--mode")
    assert f"default {default}: " in text and reason in text
    args = parser.parse_args([])
    # MNIST parses an absent --mode to None (--kdim refuses an explicit one); the default
    # applies in its settings.
    mode = default if args.mode is None else args.mode
    assert mode == default


@pytest.mark.parametrize("task", PARSERS)
def test_every_value_flag_says_its_default(task: str) -> None:
    """Each flag that takes a value and has a default names it ("default ..." or
    "(default ..."); flags without one say what happens instead."""
    parser = PARSERS[task]()
    unsaid = []
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or not action.option_strings:
            continue
        if action.nargs == 0 or action.option_strings[0] in ("-h", "--help"):
            continue  # a switch: off unless given
        if "default" not in (action.help or ""):
            unsaid.append(action.option_strings[0])
    allowed = {"--train-file", "--dev-file", "--test-file", "--num-processes", "--process-id"}
    allowed |= {"--limit-train", "--predict", "--export"}
    assert set(unsaid) <= allowed, unsaid


def test_parsing_corpus_says_and_uses_its_default(tmp_path: Path) -> None:
    parser = parsing_main.build_parser()
    assert "default ptb-dep-sample" in help_of(parser, "--corpus")
    folder = tmp_path / "ptb-dep-sample"
    folder.mkdir()
    for name in parsing_main.CORPORA["ptb-dep-sample"][1:]:
        (folder / name).write_bytes(b"")
    files = parsing_main.resolve_files(parser.parse_args(["--data-dir", str(tmp_path)]))
    assert files["corpus"] == "ptb-dep-sample"
    assert files["train_file"] == str(folder / "train.conllx.gz")
    # --train-file alone names no corpus: the other two files are then needed.
    train = folder / "train.conllx.gz"
    args = parser.parse_args(["--data-dir", str(tmp_path), "--train-file", str(train)])
    with pytest.raises(parsing_main.loop.ConfigError, match="--dev-file is required"):
        parsing_main.resolve_files(args)


def test_mnist_data_dir_help_names_the_subfolder() -> None:
    text = help_of(mnist_cli.build_parser(), "--data-dir")
    assert "mnist/ subfolder" in text and "$MEPROP_DATA_DIR" in text


@pytest.mark.parametrize("task", MAINS)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--k", "three"], "argument --k: invalid int value: 'three'"),
        (["--k", "-1"], "--k must be >= 0 (0 = ordinary backprop), got -1"),
    ],
)
def test_a_usage_error_is_one_line_and_a_pointer_to_help(
    task: str,
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEPROP_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        MAINS[task]([*argv, "--out", str(tmp_path / "run"), "--devices", "1"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    prog = f"python -m experiments.{task}"
    assert captured.err.splitlines() == [f"{prog}: error: {message}", f"see '{prog} --help'"]
    assert captured.out == ""
    assert not (tmp_path / "run").exists()


def test_flag_group_finds_or_makes_a_group() -> None:
    parser = TaskParser(prog="x")
    assert flag_group(parser, "training") is flag_group(parser, "training")
    extra = flag_group(argparse.ArgumentParser(), "meProp", "about k")
    assert extra.title == "meProp" and extra.description == "about k"


def test_the_help_fits_a_newcomer() -> None:
    """The usage line is one line: the flags are listed once, under their groups."""
    for build in PARSERS.values():
        text = build().format_help()
        assert len(text.split("\n\n", 1)[0].splitlines()) == 1
        assert os.linesep not in text.splitlines()[0]
