"""The ``python -m experiments.parsing`` flags, their defaults and the reasons for them (the
measurements behind them are in :mod:`experiments.parsing.main`'s docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import loop
from experiments.common import ENV_VAR, feedback_flags
from experiments.common.cli import (
    TaskParser,
    add_kernel_layout_argument,
    add_predict_arguments,
    flag_group,
    set_helps,
)
from experiments.corpora.treebank import TAG_COLUMNS
from experiments.parsing import simplify
from experiments.parsing.model import ACTIVATIONS

__all__ = [
    "ADAGRAD_LR",
    "CORPORA",
    "DEFAULT_BATCH",
    "DEFAULT_CORPUS",
    "DEFAULT_DROPOUT",
    "DEFAULT_EPOCHS",
    "DEFAULT_EVAL_BATCH",
    "DEFAULT_MODE",
    "DEFAULT_TIMING_BATCHES",
    "build_parser",
]

#: Training minibatch (transition examples), measured on ptb-dep-sample: see
#: :mod:`experiments.parsing.main`.
DEFAULT_BATCH = 250
DEFAULT_EPOCHS = 6
DEFAULT_MODE = "per-example"  # the paper's parser; see experiments.parsing.main
MODE_REASON = (
    "the paper's CPU parser; with one top-20 set per minibatch (unified, 1.7-1.9x faster "
    "an epoch) k = 20 stays 1.4-4.4 points of dev UAS below ordinary backprop"
)
DEFAULT_CORPUS = "ptb-dep-sample"
DEFAULT_DROPOUT = 0.5  # Chen & Manning's
DEFAULT_EVAL_BATCH = 64
DEFAULT_TIMING_BATCHES = 20
ADAGRAD_LR = 0.01  # the paper's AdaGrad learning rate for parsing
#: ``--corpus`` name -> (folder, train, dev, test).
CORPORA = {
    "ptb-dep-sample": ("ptb-dep-sample", "train.conllx.gz", "dev.conllx.gz", "test.conllx.gz"),
    "ud-english-lines": (
        "ud-english-lines",
        "en_lines-ud-train.conllu.gz",
        "en_lines-ud-dev.conllu.gz",
        "en_lines-ud-test.conllu.gz",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments.parsing`` flags."""
    parser = TaskParser(
        prog="python -m experiments.parsing",
        description="Train Chen & Manning's transition parser with meProp, or parse a file "
        "with a trained one (--predict).",
    )
    m = flag_group(parser, "model")
    m.add_argument("--hidden", type=int, default=500, help="hidden units (default 500)")
    m.add_argument("--embed-dim", type=int, default=50, help="embedding size (default 50)")
    m.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="cube",
        help="hidden activation (default cube, Chen & Manning's)",
    )
    m.add_argument(
        "--dropout",
        type=float,
        default=DEFAULT_DROPOUT,
        help=f"hidden dropout rate (default {DEFAULT_DROPOUT:g}, Chen & Manning's; with it "
        "per-example k = 20 climbs steadily instead of swinging from epoch to epoch)",
    )
    add_kernel_layout_argument(
        m, "the hidden layer's kernel is", "--mode per-example/random with --k >= 1"
    )
    m.add_argument(
        "--min-count", type=int, default=2, help="rarer training words are UNKNOWN (default 2)"
    )
    p = flag_group(parser, "meProp")
    p.add_argument(
        "--k",
        type=int,
        default=20,
        help="meProp k of the hidden layer (default 20, the paper's); 0 = dense",
    )
    loop.add_mode_argument(p, DEFAULT_MODE, MODE_REASON)
    p.add_argument(
        "--k-output", type=int, default=0, help="meProp k of the output layer (default 0 = dense)"
    )
    p.add_argument(
        "--kdim", action="store_true", help="the dense control with hidden size k (--hidden = k)"
    )
    feedback_flags.add_feedback_argument(p)
    feedback_flags.add_adaptive_arguments(p)
    d = flag_group(parser, "data")
    d.add_argument(
        "--corpus",
        choices=tuple(CORPORA),
        default=None,
        help=f"read the corpus's files under --data-dir (default {DEFAULT_CORPUS}, the Penn "
        "Treebank sample, as the paper parses the Penn Treebank; none when --train-file is "
        "given)",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help=f"folder holding {'/ and '.join(CORPORA)}/ (default ${ENV_VAR})",
    )
    d.add_argument("--train-file", type=Path, default=None, help="training file (CoNLL-X/U)")
    d.add_argument("--dev-file", type=Path, default=None, help="dev file")
    d.add_argument("--test-file", type=Path, default=None, help="test file")
    d.add_argument(
        "--format",
        choices=("auto", "conllx", "conllu"),
        default="auto",
        help="file format (default auto: detected)",
    )
    d.add_argument(
        "--tag-column",
        choices=TAG_COLUMNS,
        default="auto",
        help="POS tag column: auto (default: UPOS for CoNLL-U, POSTAG for CoNLL-X), upos or xpos",
    )
    d.add_argument("--limit-train", type=int, default=None, help="first N training sentences")
    t = flag_group(parser, "training")
    t.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"transition examples per minibatch, all devices (default {DEFAULT_BATCH}: more "
        "updates an epoch than 1,000, and 2-5 points more dev UAS after one or two epochs)",
    )
    t.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"sentences per decoding batch (default {DEFAULT_EVAL_BATCH}: larger ones were "
        "slower on the CPU)",
    )
    add_predict_arguments(parser, "parse FILE")
    simplify.add_mesimp_arguments(parser)
    loop.add_train_arguments(parser)
    parser.set_defaults(epochs=DEFAULT_EPOCHS, timing_batches=DEFAULT_TIMING_BATCHES)
    helps = {
        "epochs": f"epochs in all (default {DEFAULT_EPOCHS}: the dev UAS peaks at epochs 4-6; "
        "the best dev epoch is reported)",
        "timing_batches": f"minibatches per timing probe; 0 disables (default "
        f"{DEFAULT_TIMING_BATCHES})",
        "lr": f"learning rate (default: adam 1e-3, adagrad {ADAGRAD_LR} as the paper's parser)",
    }
    set_helps(parser, helps)
    return parser
