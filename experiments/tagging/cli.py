"""The ``python -m experiments.tagging`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import loop
from experiments.common import ENV_VAR, feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.cli import (
    TaskParser,
    add_kernel_layout_argument,
    add_predict_arguments,
    flag_group,
    resolve_kernel_layout,
    resumed_layout,
    run_name_tail,
    set_helps,
    user_errors,
)
from experiments.corpora.conll import FORMATS, TAG_COLUMNS
from experiments.tagging import simplify
from experiments.tagging.features import DEFAULT_FEATURES, FEATURES
from experiments.tagging.predict import predict_file
from experiments.tagging.task import (
    ARCHITECTURES,
    DEFAULT_BATCH,
    DEFAULT_EVAL_BATCH,
    DEFAULT_K,
    DEFAULT_TRANSFORMER_K,
    DataFiles,
    TaggerSettings,
    TaggingTask,
    load_data,
)

__all__ = ["CORPORA", "DEFAULT_EPOCHS", "build_parser", "main"]

DEFAULT_EPOCHS = 15
DEFAULT_HIDDEN = 500
#: The Transformer's shape flags and defaults: 2 blocks of width 256 with 4 heads.
TRANSFORMER_DEFAULTS: Mapping[str, int] = {"layers": 2, "d_model": 256, "heads": 4}
#: Flags of the LSTM alone (``dest`` -> what they are off at).
LSTM_ONLY: Mapping[str, Any] = {
    "hidden": None,
    "bidirectional": False,
    "mesimp": False,
    "error_feedback": None,
    "adaptive_k": False,
}
DEFAULT_TIMING_BATCHES = 0  # probes compile three programs per bucket: opt-in
ADAGRAD_LR = 0.01  # the paper's AdaGrad learning rate for POS tagging
#: Why unified (README: Where meProp saves time): a minibatch's tokens (8 sentences of about
#: 24) each choosing k = 10 columns would cover the 500 units, and save nothing.
MODE_REASON = (
    "the fast variant (with per-example selection the ~200 tokens of a minibatch each pick "
    "k columns, together the whole layer, so its backward runs full-width products)"
)

#: ``--corpus`` name -> (folder, train, dev or None, test).
CORPORA: Mapping[str, tuple[str, str, str | None, str]] = {
    "conll2000": ("conll2000", "train.txt.gz", None, "test.txt.gz"),
    "ptb-dep-sample": ("ptb-dep-sample", "train.conllx.gz", "dev.conllx.gz", "test.conllx.gz"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments.tagging`` flags."""
    parser = TaskParser(
        prog="python -m experiments.tagging",
        description="Train the paper's LSTM POS tagger (or a Transformer encoder tagger, "
        "--model transformer) with meProp, or tag a file with a trained one (--predict).",
    )
    m = flag_group(parser, "model")
    m.add_argument(
        "--model",
        choices=ARCHITECTURES,
        default=ARCHITECTURES[0],
        help="the paper's LSTM (default) or a pre-LayerNorm Transformer encoder (stock Flax "
        "layers, meProp through meprop_jax.sparsify)",
    )
    m.add_argument(
        "--hidden",
        type=int,
        default=None,
        help=f"LSTM units per direction (default {DEFAULT_HIDDEN}; LSTM only)",
    )
    for flag, what in (("layers", "encoder blocks"), ("d_model", "model width"),
                       ("heads", "attention heads")):  # fmt: skip
        default = TRANSFORMER_DEFAULTS[flag]
        m.add_argument(
            "--" + flag.replace("_", "-"),
            type=int,
            default=None,
            help=f"Transformer {what} (default {default}; the MLP is 4 x --d-model wide)",
        )
    m.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout rate on the LSTM input and output, or on the Transformer's embeddings "
        "and block branches (default 0, as the paper's Table 1)",
    )
    m.add_argument(
        "--bidirectional", action="store_true", help="add a right-to-left LSTM (default: off)"
    )
    add_kernel_layout_argument(
        m, "the LSTM cells' kernels are", "--mode per-example/random with --k >= 1 (LSTM only)"
    )
    m.add_argument("--word-dim", type=int, default=50, help="word embedding size (default 50)")
    m.add_argument(
        "--feature-dim", type=int, default=20, help="size of each feature embedding (default 20)"
    )
    m.add_argument(
        "--features",
        default=",".join(DEFAULT_FEATURES),
        help=f"comma-separated token features, from {', '.join(FEATURES)} "
        f"(default {','.join(DEFAULT_FEATURES)})",
    )
    m.add_argument(
        "--min-count",
        type=int,
        default=2,
        help="words and feature values seen fewer times in training map to <unk> (default 2)",
    )
    p = flag_group(parser, "meProp")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"meProp k per LSTM gate (default {DEFAULT_K}, 2%% of the 500 units; the paper "
        "used 5 with per-example selection), or the Transformer's k per attention and MLP "
        f"projection (default {DEFAULT_TRANSFORMER_K}, d/8); 0 = ordinary backprop",
    )
    for flag, what in (("attn", "attention projection (query, key, value, output)"),
                       ("mlp", "MLP layer")):  # fmt: skip
        p.add_argument(
            f"--k-{flag}",
            type=int,
            default=None,
            help=f"Transformer: k per {what} (default --k; 0 = dense)",
        )
    loop.add_mode_argument(p, "unified", MODE_REASON)
    feedback_flags.add_feedback_argument(p)
    feedback_flags.add_adaptive_arguments(p)
    d = flag_group(parser, "data")
    d.add_argument(
        "--corpus",
        choices=tuple(CORPORA),
        default=None,
        help="read the corpus's files under --data-dir (default conll2000, Wall Street Journal "
        "text with Penn POS tags as in the paper's data, unless --train-file is given)",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help=f"folder holding conll2000/ and ptb-dep-sample/ (default: ${ENV_VAR})",
    )
    d.add_argument("--train-file", type=Path, default=None, help="training file")
    d.add_argument(
        "--dev-file",
        type=Path,
        default=None,
        help="dev file (default: the corpus's, else the last 10%% of the training sentences)",
    )
    d.add_argument("--test-file", type=Path, default=None, help="test file")
    d.add_argument(
        "--format",
        choices=("auto", *FORMATS),
        default="auto",
        help="file format (default auto: detected)",
    )
    d.add_argument(
        "--tag-column",
        choices=TAG_COLUMNS,
        default="xpos",
        help="CoNLL-X/U tag column: xpos = POSTAG/XPOS (default), upos = CPOSTAG/UPOS",
    )
    d.add_argument(
        "--limit-train", type=int, default=None, help="use the first N training sentences"
    )
    t = flag_group(parser, "training")
    t.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"sentences per training minibatch, all devices (default {DEFAULT_BATCH}; the "
        "paper used 1; 8 beat 32 after one epoch, most of all for meProp's sparse updates)",
    )
    t.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"sentences per evaluation minibatch (default {DEFAULT_EVAL_BATCH}, rounded up "
        "to a multiple of the device count)",
    )
    add_predict_arguments(parser, "tag FILE")
    simplify.add_mesimp_arguments(parser)
    loop.add_train_arguments(parser)
    parser.set_defaults(epochs=DEFAULT_EPOCHS, timing_batches=DEFAULT_TIMING_BATCHES)
    # The loop's help texts name its own defaults; say where the tagger's differ.
    helps = {
        "epochs": f"epochs in all (default {DEFAULT_EPOCHS}; the best dev epoch is reported)",
        "timing_batches": "minibatches per forward/backward/update timing probe after each "
        f"epoch; 0 disables (default {DEFAULT_TIMING_BATCHES}: off, as the probes compile "
        "three more programs per length bucket; 20 gives steady estimates)",
        "lr": f"learning rate (default: adam 1e-3, adagrad {ADAGRAD_LR} as in the paper's POS "
        "runs, sgd 0.1)",
    }
    # The LSTM scan reuses one cell for every time step, so its kernels have no compact
    # gradient to update column by column: the loop's --sparse-update cannot apply here.
    helps["sparse_update"] = argparse.SUPPRESS
    set_helps(parser, helps)
    return parser


def _parse_features(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FEATURES]
    loop.require(
        not unknown, f"--features: unknown {', '.join(unknown)}; valid: {', '.join(FEATURES)}"
    )
    loop.require(bool(names), "--features: give at least one feature")
    loop.require(len(set(names)) == len(names), f"--features: repeated names in {text!r}")
    return names


def _transformer_shape(args: argparse.Namespace) -> dict[str, int]:
    """The Transformer's checked shape and k flags (:class:`TaggerSettings` fields).

    Raises:
      ConfigError: an LSTM-only flag, or a bad value, naming the flag.
    """
    check = loop.require
    for dest, off in LSTM_ONLY.items():
        flag = "--" + dest.replace("_", "-")
        check(
            getattr(args, dest) == off, f"{flag} is an LSTM flag: drop it with --model transformer"
        )
    check(
        not args.sparse_update,
        "--sparse-update: the Transformer tagger trains through sparsify's masked dense "
        "gradients; drop the flag",
    )
    shape = {
        dest: default if getattr(args, dest) is None else getattr(args, dest)
        for dest, default in TRANSFORMER_DEFAULTS.items()
    }
    for dest, value in shape.items():
        check(value >= 1, f"--{dest.replace('_', '-')} must be >= 1, got {value}")
    d, heads = shape["d_model"], shape["heads"]
    check(d % heads == 0, f"--d-model {d} must be divisible by --heads {heads}")
    for dest in ("k_attn", "k_mlp"):
        flag, value = "--" + dest.replace("_", "-"), getattr(args, dest)
        flag, value = ("--k", args.k) if value is None else (flag, value)
        check(value >= 0, f"{flag} must be >= 0 (0 = dense), got {value}")
        # The attention projections and the MLP's second layer are d_model wide.
        check(value < d, f"{flag} {value} must be smaller than --d-model {d} (0 = dense)")
        shape[dest] = value
    return shape


def settings_from_args(args: argparse.Namespace, devices: int) -> TaggerSettings:
    """Validates the tagger's flags; ``devices`` is the resolved device count.

    Raises:
      ConfigError: naming the offending flag(s).
    """
    check = loop.require
    transformer = args.model == "transformer"
    if args.k is None:
        args.k = DEFAULT_TRANSFORMER_K if transformer else DEFAULT_K
    check(args.k >= 0, f"--k must be >= 0 (0 = ordinary backprop), got {args.k}")
    shape = _transformer_shape(args) if transformer else {}
    if not transformer:
        for dest in (*TRANSFORMER_DEFAULTS, "k_attn", "k_mlp"):
            flag = "--" + dest.replace("_", "-")
            check(
                getattr(args, dest) is None,
                f"{flag} is a Transformer flag: add --model transformer",
            )
        check(
            not args.sparse_update,
            "--sparse-update: the LSTM tagger has no column-sparse update (its LSTM scan "
            "reuses one cell for every time step); drop the flag",
        )
        args.hidden = DEFAULT_HIDDEN if args.hidden is None else args.hidden
        check(args.hidden >= 1, f"--hidden must be >= 1, got {args.hidden}")
        check(
            args.k < args.hidden,
            f"--k {args.k} must be smaller than --hidden {args.hidden} "
            "(use --k 0 for ordinary backprop)",
        )
    check(0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}")
    check(args.word_dim >= 1, f"--word-dim must be >= 1, got {args.word_dim}")
    check(args.feature_dim >= 1, f"--feature-dim must be >= 1, got {args.feature_dim}")
    check(args.min_count >= 1, f"--min-count must be >= 1, got {args.min_count}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(
        args.limit_train is None or args.limit_train >= 1,
        f"--limit-train must be >= 1, got {args.limit_train}",
    )
    mesimp = simplify.check_mesimp(args)
    check(
        not transformer or args.kernel_layout != "out_in",
        "--kernel-layout out_in stores the LSTM's kernels: drop it with --model transformer",
    )
    per_row = args.mode.replace("-", "_") in ("per_example", "random")
    layout = resolve_kernel_layout(
        args.kernel_layout, per_row and args.k >= 1 and not transformer, bool(mesimp.get("mesimp"))
    )
    decay = feedback_flags.check_feedback(args, args.k)
    adaptive = feedback_flags.check_adaptive(args, args.k)
    loop.check_divisible(args.batch_size, devices, "--batch-size")
    eval_batch = loop.resolve_eval_batch(args.eval_batch_size, DEFAULT_EVAL_BATCH, devices)
    return TaggerSettings(
        architecture=args.model,
        **shape,
        hidden=DEFAULT_HIDDEN if transformer else args.hidden,
        k=args.k,
        mode=args.mode,
        dropout=args.dropout,
        bidirectional=args.bidirectional,
        word_dim=args.word_dim,
        feature_dim=args.feature_dim,
        features=_parse_features(args.features),
        min_count=args.min_count,
        batch_size=args.batch_size,
        eval_batch_size=eval_batch,
        limit_train=args.limit_train,
        feedback=decay,
        adaptive=adaptive,
        kernel_layout=layout,
        **mesimp,
    )


def _existing(path: Path, what: str) -> Path:
    loop.require(path.is_file(), f"{what}: no such file: {path}")
    return path


def resolve_files(args: argparse.Namespace) -> DataFiles:
    """The data files the flags name, checked to exist.

    ``--train-file``/``--dev-file``/``--test-file`` override the corpus's files; the corpus
    (default conll2000 without ``--train-file``) needs ``--data-dir`` or ``$MEPROP_DATA_DIR``
    unless both ``--train-file`` and ``--test-file`` are given.

    Raises:
      ConfigError: a missing file (named, with the flag it came from), or no data named.
    """
    given = {split: getattr(args, f"{split}_file") for split in ("train", "dev", "test")}
    corpus = args.corpus or (None if given["train"] else "conll2000")
    paths: dict[str, Path] = {}
    flags: dict[str, str] = {}
    if corpus is not None and not (given["train"] and given["test"]):
        root = args.data_dir or os.environ.get(ENV_VAR)
        folder, *names = CORPORA[corpus]
        loop.require(
            root is not None,
            f"--corpus {corpus} needs the data folder: pass --data-dir or set {ENV_VAR} "
            f"(the folder holding {folder}/), or give --train-file and --test-file",
        )
        for split, name in zip(("train", "dev", "test"), names, strict=True):
            if name is not None:
                paths[split] = Path(root) / folder / name  # type: ignore[arg-type]
                flags[split] = f"--corpus {corpus}"
    for split, path in given.items():
        if path is not None:
            paths[split], flags[split] = path, f"--{split}-file"
    loop.require("train" in paths, "--train-file is required without --corpus")
    loop.require("test" in paths, "--test-file is required with --train-file")
    for split, path in paths.items():
        _existing(path, flags[split])
    return DataFiles(
        train=paths["train"],
        dev=paths.get("dev"),
        test=paths["test"],
        format=args.format,
        tag_column=args.tag_column,
        corpus=corpus if given["train"] is None else None,
    )


def _transformer_parts(s: TaggerSettings, args: argparse.Namespace) -> list[str]:
    """``tx-L<layers>-d<width>-h<heads>``, then ``dense``, ``k<k>`` or ``ka<k>-km<k>``."""
    parts = ["tx", f"L{s.layers}", f"d{s.d_model}", f"h{s.heads}"]
    if not (s.k_attn or s.k_mlp):
        parts.append("dense")
    else:
        same = s.k_attn == s.k_mlp
        parts += [f"k{s.k_attn}"] if same else [f"ka{s.k_attn}", f"km{s.k_mlp}"]
        parts.append(s.mode)
    parts += [args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    feats = () if s.features == DEFAULT_FEATURES else ("feats-" + "+".join(s.features),)
    return parts + run_name_tail(args, dropout=s.dropout, extra=feats, limit_train=s.limit_train)


def default_out(s: TaggerSettings, files: DataFiles, args: argparse.Namespace) -> Path:
    """``runs/tag-<corpus>-<config>``: the same flags give the same folder, for ``--resume``."""
    data = files.corpus or files.train.name.split(".")[0]
    if s.transformer:
        return Path("runs") / "-".join(["tag", data, *_transformer_parts(s, args)])
    parts = ["dense"] if s.k == 0 else [f"k{s.k}", s.mode]
    parts += feedback_flags.out_parts(s.feedback, s.adaptive)
    if s.mesimp:
        parts.append(mesimp_loop.out_part(s))
    parts += [f"h{s.hidden}", args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    if s.bidirectional:
        parts.append("bi")
    feats = () if s.features == DEFAULT_FEATURES else ("feats-" + "+".join(s.features),)
    parts += run_name_tail(args, dropout=s.dropout, extra=feats, limit_train=s.limit_train)
    return Path("runs") / "-".join(["tag", data, *parts])


def _predict_main(args: argparse.Namespace) -> int:
    loop.require(args.out is not None, "--predict needs --out: the folder of a trained run")
    _existing(args.predict, "--predict")
    output = args.predict_output or args.out / f"predicted-{args.predict.name}"
    sentences, tokens, acc, epoch = predict_file(
        args.out, args.predict, output, args.format, args.tag_column
    )
    print(f"tagged {sentences} sentences ({tokens} tokens) with epoch {epoch} -> {output}")
    if acc is not None:
        print(f"agreement with the tags in {args.predict}: {acc:.2f}%")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment (or ``--predict``); returns the exit code.

    Bad flags and missing files end the program with exit code 2 before any training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.predict is not None:
            return _predict_main(args)
        loop.setup_processes(args)  # before anything touches a device
        devices = loop.resolve_devices(args.devices, [args.batch_size])
        settings = settings_from_args(args, devices)
        files = resolve_files(args)
        out = default_out(settings, files, args)
        if args.lr is None and args.optimizer == "adagrad":
            args.lr = ADAGRAD_LR
        cfg = loop.train_config_from_args(args, out)
        saved = loop.saved_config(cfg.out) if args.resume else None
        layout = resumed_layout(args.kernel_layout, settings.kernel_layout, saved)
        settings = dataclasses.replace(settings, kernel_layout=layout)

        def prepare(task: TaggingTask) -> None:
            if cfg.resume:
                task.check_resume(cfg.out)
            task.save_vocab(cfg.out)

        if not settings.mesimp:
            return loop.run_cli(
                lambda: TaggingTask(load_data(files, settings), settings),
                cfg,
                "experiments.tagging",
                argv,
                prepare,
            )
        # meSimp prunes at chunk boundaries: the chunks follow from the training buckets.
        task = TaggingTask(load_data(files, settings), settings)
        cfg = dataclasses.replace(cfg, chunk_steps=simplify.chunk_steps(task))

        def finish(task: TaggingTask) -> None:
            entry = simplify.finish_run(task, cfg.out, args.export)
            if entry is not None:
                print(simplify.describe(entry, args.export))

        return loop.run_cli(lambda: task, cfg, "experiments.tagging", argv, prepare, finish)
    return 2  # not reached: user_errors ends the program with exit code 2
