"""Chen & Manning's transition parser trained with meProp (``python -m experiments.parsing``).

The parser (Chen & Manning 2014, as the meProp paper uses it): arc-standard transitions with
a static oracle and greedy decoding; 18 word, 18 POS-tag and (labelled data only) 12
arc-label features, each a 50-dimensional embedding; one hidden layer of 500 units with the
cube activation (``--activation relu`` as an option); a softmax over the transitions. meProp
acts on the hidden layer (``meprop_jax.Dense(500, k=--k, mode=--mode)``; the paper's k is
20); the output layer is dense unless ``--k-output`` is set. ``--k 0`` is ordinary backprop,
``--kdim`` the dense "k-dimensional" control (hidden size k), ``--mode random`` the random-k
control. Modules: :mod:`~experiments.parsing.transitions` (oracle, host featurizer),
:mod:`~experiments.parsing.decoder` (batched on-device decoding),
:mod:`~experiments.parsing.model` (vocabularies, the MLP),
:mod:`~experiments.parsing.task` (examples, batches, the loop task),
:mod:`~experiments.parsing.flags` (the command line's flags and defaults).

Data: ``--corpus ptb-dep-sample`` (the default without ``--train-file``; unlabelled: SHIFT,
LEFT-ARC, RIGHT-ARC; gold Penn tags from POSTAG) or ``--corpus ud-english-lines`` (labelled:
LEFT-ARC(l)/RIGHT-ARC(l) per UD relation, UPOS tags), files under ``--data-dir`` or
``$MEPROP_DATA_DIR``; ``--train-file``/``--dev-file``/``--test-file`` name CoNLL-X/CoNLL-U
files directly. Training trees that arc-standard cannot build (non-projective or several
roots) are skipped and counted (``skipped_nonprojective``/``skipped_multiroot`` in the log
and ``results.json``); dev and test use every sentence. Words are lowercased with digits
mapped to 0; words seen fewer than ``--min-count`` (2) times in training are UNKNOWN.

Scores: the loop's accuracy is the unlabelled attachment score (UAS) over the
non-punctuation tokens (``dev_uas``/``test_uas`` where the loop supports task metrics); LAS
comes as ``correct_las``. Punctuation: tokens with a Penn punctuation tag (`````, ``''``,
``,``, ``.``, ``:``) or UPOS ``PUNCT``.

Defaults, chosen on the sample's dev UAS (never test): Adam (lr 1e-3; AdaGrad takes the
paper's 0.01), minibatches of 250 transition examples, per-example top-k (the paper's CPU
parser), dropout 0.5 on the hidden layer (Chen & Manning's), 6 epochs (best dev epoch
reported). Why 250: with ordinary backprop (seed 0) minibatches of 250 reach 84.44% dev UAS
after one epoch and 86.94% after two, minibatches of 1,000 only 79.93% and 84.77%, for about
the same time per epoch. The paper's 10,000 was for Chen & Manning's 1.9M examples; the sample
has about 164k, so 250 gives about 650 updates an epoch, which meProp's sparse updates need
most. Why per-example and dropout: with one top-20 set per minibatch (``--mode unified``)
k = 20 stays below ordinary backprop (seed 0, 3 epochs: 1.4 points of dev UAS without
dropout, 4.4 with dropout 0.5); each example's own top-20 without dropout swings by up to 8
points from epoch to epoch (seed 0: 76.8, 83.8, 76.3); with dropout 0.5 it climbs steadily.
Why 6 epochs: with dropout the dev UAS of k = 20 peaks at epochs 5-6 (seeds 0-2) and that of
ordinary backprop at epochs 4-6.
The price of per-example selection: 250 examples x 20 columns cover the whole 500-unit layer,
so the weight gradient is full-width, and with the stock ``[in, out]`` kernel an epoch took as
long as ordinary backprop's. ``--kernel-layout auto`` therefore stores the hidden kernel
``[out, in]`` for the per-row modes, where the native CPU kernels compute each row's input
gradient from its own k kernel rows (README: Dependency parsing, for the measured epochs);
``--mode unified`` is the fast variant. Evaluation decodes 64
sentences per batch (``--eval-batch-size``): larger batches were slower on the CPU.

After training, the test set is parsed again with the best epoch's parameters to measure the
parse speed (sentences per second, the median of five passes; compilation and the precomputed
hidden tables excluded): ``parse`` in ``results.json`` and the last log line.

Examples:
  MEPROP_DATA_DIR=../shared/data python -m experiments.parsing --corpus ptb-dep-sample --k 20
  python -m experiments.parsing --corpus ptb-dep-sample --k 0        # ordinary backprop
  python -m experiments.parsing --predict in.conllu --out runs/parse-... --predict-output out.conllu
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments import loop
from experiments.common import ENV_VAR, feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.cli import (
    resolve_kernel_layout,
    resumed_layout,
    run_name_tail,
    user_errors,
)
from experiments.corpora.treebank import Tree, read_treebank, write_treebank
from experiments.parsing import simplify
from experiments.parsing.flags import (
    ADAGRAD_LR,
    CORPORA,
    DEFAULT_BATCH,
    DEFAULT_CORPUS,
    DEFAULT_DROPOUT,
    DEFAULT_EPOCHS,
    DEFAULT_EVAL_BATCH,
    DEFAULT_MODE,
    build_parser,
)
from experiments.parsing.model import ParserMLP, Vocabularies
from experiments.parsing.task import (
    ParserSettings,
    ParsingData,
    ParsingTask,
    make_examples,
    parse,
)

__all__ = [
    "CORPORA",
    "DEFAULT_BATCH",
    "DEFAULT_CORPUS",
    "DEFAULT_DROPOUT",
    "DEFAULT_EPOCHS",
    "DEFAULT_MODE",
    "VOCAB_FILE",
    "build_parser",
    "load_run",
    "main",
]

VOCAB_FILE = "vocab.json"
#: Sentences per decoding batch of --predict and the parse-speed pass, whose hidden tables are
#: computed once: 32 parsed the sample's test set fastest (quiet 2-core CPU, medians of five
#: passes: 2,307 sentences/s, against 2,266 for 48, 2,007 for 64 and 1,589 for 128).
PARSE_BATCH = 32
#: Timed passes over the test set for the parse speed (their median is reported).
SPEED_PASSES = 5


def settings_from_args(args: argparse.Namespace, devices: int) -> ParserSettings:
    """Validates the parser's flags.

    Raises:
      ConfigError: naming the offending flag.
    """
    check = loop.require
    check(args.k >= 0, f"--k must be >= 0 (0 = ordinary backprop), got {args.k}")
    check(args.k_output >= 0, f"--k-output must be >= 0, got {args.k_output}")
    check(args.embed_dim >= 1, f"--embed-dim must be >= 1, got {args.embed_dim}")
    check(0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}")
    check(args.min_count >= 1, f"--min-count must be >= 1, got {args.min_count}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(
        args.limit_train is None or args.limit_train >= 1,
        f"--limit-train must be >= 1, got {args.limit_train}",
    )
    if args.kdim:
        check(args.k >= 1, "--kdim needs --k >= 1: the hidden size of the dense control")
        hidden, k = args.k, 0
    else:
        check(args.hidden >= 1, f"--hidden must be >= 1, got {args.hidden}")
        check(
            args.k < args.hidden,
            f"--k {args.k} must be smaller than --hidden {args.hidden} (--k 0: dense)",
        )
        hidden, k = args.hidden, args.k
    mesimp = simplify.check_mesimp(args)
    per_row = args.mode.replace("-", "_") in ("per_example", "random")
    layout = resolve_kernel_layout(
        args.kernel_layout, per_row and k >= 1, bool(mesimp.get("mesimp"))
    )
    decay = feedback_flags.check_feedback(args, k)
    adaptive = feedback_flags.check_adaptive(args, k)
    loop.check_divisible(args.batch_size, devices, "--batch-size")
    eval_batch = loop.resolve_eval_batch(args.eval_batch_size, DEFAULT_EVAL_BATCH, devices)
    return ParserSettings(
        embed_dim=args.embed_dim,
        hidden=hidden,
        k=k,
        mode=args.mode,
        k_output=args.k_output,
        kdim=args.kdim,
        activation=args.activation,
        dropout=args.dropout,
        min_count=args.min_count,
        batch_size=args.batch_size,
        eval_batch_size=eval_batch,
        limit_train=args.limit_train,
        feedback=decay,
        adaptive=adaptive,
        kernel_layout=layout,
        **mesimp,
    )


def resolve_files(args: argparse.Namespace) -> dict[str, Any]:
    """The train/dev/test files the flags name (checked to exist), format and tag column:
    ``--corpus`` (:data:`DEFAULT_CORPUS` without ``--train-file``), whose files the
    ``--*-file`` flags override.

    Raises:
      ConfigError: a missing file (named with its flag), or no data named.
    """
    given = {split: getattr(args, f"{split}_file") for split in ("train", "dev", "test")}
    paths: dict[str, Path] = {}
    flags: dict[str, str] = {}
    corpus = args.corpus or (None if given["train"] else DEFAULT_CORPUS)
    if corpus is not None:
        root = args.data_dir or os.environ.get(ENV_VAR)
        folder, *names = CORPORA[corpus]
        loop.require(
            root is not None or all(given.values()),
            f"--corpus {corpus} needs the data folder: pass --data-dir or set {ENV_VAR}",
        )
        for split, name in zip(("train", "dev", "test"), names, strict=True):
            if root is not None:
                paths[split], flags[split] = Path(root) / folder / name, f"--corpus {corpus}"
    for split, path in given.items():
        if path is not None:
            paths[split], flags[split] = path, f"--{split}-file"
    for split in ("train", "dev", "test"):
        loop.require(split in paths, f"--{split}-file is required with --train-file")
    for split, path in paths.items():
        loop.require(path.is_file(), f"{flags[split]}: no such file: {path}")
    return {
        "corpus": corpus,
        **{f"{split}_file": str(paths[split]) for split in ("train", "dev", "test")},
        "format": args.format,
        "tag_column": args.tag_column,
    }


def load_data(files: dict[str, Any], settings: ParserSettings) -> ParsingData:
    """Reads the three splits, builds the vocabularies and the oracle examples."""
    read = functools.partial(read_treebank, format=files["format"], tag_column=files["tag_column"])
    train = read(files["train_file"])
    if settings.limit_train is not None:
        train = train[: settings.limit_train]
    dev, test = read(files["dev_file"]), read(files["test_file"])
    vocab = Vocabularies.build(train, settings.min_count)
    return ParsingData(train, dev, test, vocab, make_examples(train, vocab), files)


def default_out(s: ParserSettings, files: dict[str, Any], args: argparse.Namespace) -> Path:
    """``runs/parse-<corpus>-<config>``: the same flags give the same folder."""
    data = files["corpus"] or Path(files["train_file"]).name.split(".")[0]
    if s.kdim:
        parts = [f"kdim{s.hidden}"]
    else:
        parts = ["dense"] if s.k == 0 else [f"k{s.k}", s.mode]
        parts += feedback_flags.out_parts(s.feedback, s.adaptive)
        if s.mesimp:
            parts.append(mesimp_loop.out_part(s))
        parts.append(f"h{s.hidden}")
    parts += [s.activation, args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    parts += run_name_tail(
        args,
        k_output=s.k_output,
        dropout=s.dropout,
        default_dropout=DEFAULT_DROPOUT,
        limit_train=s.limit_train,
    )
    return Path("runs") / "-".join(["parse", data, *parts])


def save_vocab(out: Path, vocab: Vocabularies, settings: ParserSettings) -> None:
    """``out/vocab.json``: the vocabularies and the model settings."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**vocab.to_json(), "model": settings.model_json()}
    (out / VOCAB_FILE).write_text(json.dumps(payload) + "\n")


def _template(model: ParserMLP) -> Any:
    """Parameter shapes (with a device) for restoring, without running an initialiser."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    features = jnp.zeros((1, model.num_features), jnp.int32)
    shapes = jax.eval_shape(lambda key: model.init({"params": key}, features), jax.random.key(0))
    shapes = {k: v for k, v in shapes.items() if k != "mesimp_taps"}  # not saved
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)


def _best_epoch(run: Path) -> int | None:
    results = run / loop.RESULTS_FILE
    if not results.is_file():
        return None
    return (json.loads(results.read_text()).get("best") or {}).get("epoch")


def load_run(run: Path) -> tuple[Vocabularies, ParserMLP, Any, int]:
    """Vocabularies, model and parameters (best-dev epoch if kept, else the latest) of a run.

    Raises:
      loop.ConfigError: no vocabulary file or no checkpoint in ``run``.
    """
    path = run / VOCAB_FILE
    if not path.is_file():
        raise loop.ConfigError(f"--out {run}: no {VOCAB_FILE} there (not a parsing run folder?)")
    try:
        data = json.loads(path.read_text())
        vocab = Vocabularies.from_json(data)
        model = ParserSettings(**data["model"]).model(vocab)
    except (ValueError, KeyError, TypeError) as exc:
        raise loop.ConfigError(f"--out {run}: unreadable {VOCAB_FILE}: {exc}") from exc
    epoch = _best_epoch(run)
    if model.record:  # meSimp: the saved epoch's hidden layer is smaller
        width, epoch = simplify.saved_width(run, model.hidden, epoch)
        model = model.clone(hidden=width)
    params, epoch = loop.restore_params(run, _template(model), epoch=epoch)
    return vocab, model, params, epoch


def attachment_scores(
    trees: Sequence[Tree], heads: Sequence[Sequence[int]], labels: Sequence[Sequence[str]] | None
) -> tuple[float, float | None]:
    """UAS and LAS (%) over the non-punctuation tokens of trees with gold heads."""
    correct = labelled = count = 0
    for i, tree in enumerate(trees):
        if tree.heads is None:
            continue
        for j, (gold, punct) in enumerate(zip(tree.heads, tree.punct, strict=True)):
            if punct:
                continue
            count += 1
            if heads[i][j] == gold:
                correct += 1
                if labels is not None and tree.labels is not None:
                    labelled += labels[i][j] == tree.labels[j]
    las = 100.0 * labelled / max(count, 1) if labels is not None else None
    return 100.0 * correct / max(count, 1), las


def _label_strings(vocab: Vocabularies, indices: Sequence[Sequence[int]]) -> list[list[str]] | None:
    if not vocab.labelled:
        return None
    return [[vocab.labels[i] for i in row] for row in indices]


def measure_parse_speed(run: Path, files: dict[str, Any]) -> dict[str, Any]:
    """Parses the test file with the run's best parameters; adds ``parse`` to results.json."""
    vocab, model, params, epoch = load_run(run)
    trees = read_treebank(files["test_file"], files["format"], files["tag_column"])
    heads, indices, seconds = parse(model, params, vocab, trees, PARSE_BATCH, SPEED_PASSES)
    uas, las = attachment_scores(trees, heads, _label_strings(vocab, indices))
    speed = {
        "epoch": epoch,
        "test_sentences": len(trees),
        "test_tokens": sum(len(t) for t in trees),
        "seconds": seconds,
        "parse_sents_per_s": len(trees) / seconds,
        "test_uas": uas,
        "test_las": las,
    }
    path = run / loop.RESULTS_FILE
    results = json.loads(path.read_text())
    results["parse"] = speed
    path.write_text(json.dumps(results, indent=2) + "\n")
    return speed


def _predict_main(args: argparse.Namespace) -> int:
    loop.require(args.out is not None, "--predict needs --out: the folder of a trained run")
    loop.require(args.predict.is_file(), f"--predict: no such file: {args.predict}")
    output = args.predict_output or args.out / f"predicted-{args.predict.name}"
    vocab, model, params, epoch = load_run(args.out)
    trees = read_treebank(args.predict, args.format, args.tag_column, heads_required=False)
    heads, indices, seconds = parse(model, params, vocab, trees, PARSE_BATCH)
    labels = _label_strings(vocab, indices)
    write_treebank(output, trees, heads, labels)
    print(
        f"parsed {len(trees)} sentences with epoch {epoch} in {seconds:.3f}s "
        f"({len(trees) / seconds:.0f} sentences/s) -> {output}"
    )
    if any(t.heads is not None for t in trees):
        uas, las = attachment_scores(trees, heads, labels)
        extra = "" if las is None else f", LAS {las:.2f}%"
        print(f"against the heads in {args.predict}: UAS {uas:.2f}%{extra}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment (or ``--predict``); returns the exit code.

    Bad flags, missing files and malformed data end the program with exit code 2 and one
    message line.
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.predict is not None:
            return _predict_main(args)
        loop.setup_processes(args)  # before anything touches a device
        devices = loop.resolve_devices(args.devices, [args.batch_size])
        settings = settings_from_args(args, devices)
        files = resolve_files(args)
        if args.lr is None and args.optimizer == "adagrad":
            args.lr = ADAGRAD_LR
        cfg = loop.train_config_from_args(args, default_out(settings, files, args))
        saved = loop.saved_config(cfg.out) if args.resume else None
        layout = resumed_layout(args.kernel_layout, settings.kernel_layout, saved)
        settings = dataclasses.replace(settings, kernel_layout=layout)
        task = None
        if settings.mesimp:
            # meSimp prunes at chunk boundaries: the chunks follow from the examples.
            task = ParsingTask(load_data(files, settings), settings)
            cfg = dataclasses.replace(cfg, chunk_steps=simplify.chunk_steps(task))

        def make_task() -> ParsingTask:
            return task or ParsingTask(load_data(files, settings), settings)

        def prepare(task: ParsingTask) -> None:
            ex = task.data.examples
            print(
                f"{len(ex.gold)} training examples from {len(task.data.train)} trees; skipped "
                f"{ex.skipped_nonprojective} non-projective and {ex.skipped_multiroot} "
                "multi-root trees"
            )
            save_vocab(cfg.out, task.data.vocab, settings)

        def finish(task: ParsingTask) -> None:
            if settings.mesimp:
                entry = simplify.finish_run(task, cfg.out, args.export)
                if entry is not None:
                    print(simplify.describe(entry, args.export))
            speed = measure_parse_speed(cfg.out, files)
            print(
                f"parse speed: {speed['parse_sents_per_s']:.0f} sentences/s "
                f"({speed['test_sentences']} test sentences in {speed['seconds']:.3f}s, "
                f"epoch {speed['epoch']}, test UAS {speed['test_uas']:.2f}%)"
            )

        return loop.run_cli(make_task, cfg, "experiments.parsing", argv, prepare, finish)
    return 2  # not reached: user_errors ends the program with exit code 2
