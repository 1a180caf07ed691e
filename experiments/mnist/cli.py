"""The ``python -m experiments.mnist`` command line: flags, their checks, the run folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import loop
from experiments.common import feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.cli import (
    TaskParser,
    add_kernel_layout_argument,
    flag_group,
    resolve_kernel_layout,
    resumed_layout,
    run_name_tail,
    user_errors,
)
from experiments.mnist import cnn, simplify
from experiments.mnist.task import (
    DEFAULT_EVAL_BATCH,
    NUM_CLASSES,
    MnistSettings,
    MnistTask,
    load_data,
)

__all__ = ["MAX_LAYERS", "build_parser", "default_out", "main", "settings_from_args"]

MAX_LAYERS = 5
DEFAULT_HIDDEN = 500
DEFAULT_MODE = "unified"
DEFAULT_FEEDBACK = feedback_flags.DEFAULT_DECAY  # --error-feedback without a value
#: Why unified: per-example selection saves nothing at the default sizes (README: Where meProp
#: saves time), since 50 examples x k = 30 columns cover the 500 hidden units.
MODE_REASON = (
    "the fast variant (at batch 50 the per-example columns, 50 x k = 1,500, cover the "
    "500 hidden units, so its backward runs full-width products)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments.mnist`` flags.

    ``--hidden`` and ``--mode`` parse to None when absent, so that :func:`settings_from_args`
    can tell them apart from their defaults (``--kdim`` refuses them).
    """
    parser = TaskParser(
        prog="python -m experiments.mnist",
        description="Train the paper's MNIST MLP (or, with --model cnn, a small CNN) with meProp.",
    )
    m = flag_group(parser, "model")
    p = flag_group(parser, "meProp")
    cnn.add_cnn_arguments(m, p)
    m.add_argument(
        "--hidden", type=int, default=None, help=f"hidden layer size (default {DEFAULT_HIDDEN})"
    )
    m.add_argument(
        "--layers", type=int, default=2, help=f"hidden layers, 1-{MAX_LAYERS} (default 2)"
    )
    m.add_argument(
        "--dropout", type=float, default=0.0, help="dropout rate after each ReLU (default 0)"
    )
    add_kernel_layout_argument(
        m, "the Dense kernels are", "the MLP with --mode per-example/random and --k >= 1"
    )
    m.add_argument(
        "--kernel-grad",
        choices=("auto", "masked", "compact", "factored"),
        default="auto",
        help="the form of the meProp kernels' gradient under the authors' update (without "
        "--sparse-update): masked (dense, zero outside the selected columns) or compact (the "
        "selected columns only, which the optimizer's dense step reads in place of zeros: "
        "the same updates without a dense kernel gradient). factored: compact, kept as each "
        "row's kept values, their columns and the input rows (per-example/random; also with "
        "--sparse-update), which the native Adam pass sums row by row. auto (default): "
        "factored where the kernels are stored [out, in] (per-example/random MLPs, see "
        "--kernel-layout) and nothing else rules it out, the fastest form there under "
        "either rule; otherwise masked (the block under --sparse-update)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=30,
        help="meProp k of the hidden layers (default 30, the paper's Table 6: unified top-k, "
        "2 hidden layers of 500, batch 50); 0 = ordinary backprop",
    )
    loop.add_mode_argument(p, DEFAULT_MODE, MODE_REASON)
    parser.set_defaults(mode=None)
    p.add_argument(
        "--k-output", type=int, default=0, help="meProp k of the output layer (default 0 = dense)"
    )
    p.add_argument(
        "--kdim",
        action="store_true",
        help="the k-dimensional baseline: a dense MLP with hidden size k (takes neither "
        "--hidden nor --mode)",
    )
    feedback_flags.add_feedback_argument(p)
    feedback_flags.add_adaptive_arguments(p)
    d = flag_group(parser, "data")
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four MNIST IDX files (.gz or not), or with an mnist/ subfolder "
        "holding them (default: $MEPROP_DATA_DIR, the same way, then ~/.cache/meprop_jax/mnist, "
        "downloaded there when missing)",
    )
    d.add_argument(
        "--source",
        choices=("local", "tfds"),
        default="local",
        help="local IDX files (default) or tensorflow-datasets",
    )
    d.add_argument(
        "--limit-train", type=int, default=None, help="use the first N training examples"
    )
    t = flag_group(parser, "training")
    t.add_argument(
        "--batch-size", type=int, default=50, help="training minibatch, all devices (default 50)"
    )
    t.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"evaluation minibatch (default {DEFAULT_EVAL_BATCH}, rounded up to a multiple "
        "of the device count)",
    )
    simplify.add_mesimp_arguments(parser)
    loop.add_train_arguments(parser)
    return parser


def _hidden_and_k(args: argparse.Namespace) -> tuple[int, int]:
    """The hidden size and the hidden layers' meProp k that the flags ask for."""
    check = loop.require
    if args.kdim:
        check(args.k >= 1, "--kdim needs --k >= 1: the hidden size of the dense baseline")
        # The k-dimensional network is dense and k wide: other widths and modes are mistakes.
        extra = []
        if args.hidden is not None:
            extra.append(f"--hidden {args.hidden}")
        if args.mode is not None:
            extra.append(f"--mode {args.mode}")
        check(
            not extra,
            f"--kdim trains a dense MLP whose hidden size is --k ({args.k}): "
            f"drop {' and '.join(extra)}",
        )
        return args.k, 0
    hidden = DEFAULT_HIDDEN if args.hidden is None else args.hidden
    check(hidden >= 1, f"--hidden must be >= 1, got {hidden}")
    # The library treats k >= out as dense backprop; here that is surely a mistake.
    check(
        args.k < hidden,
        f"--k {args.k} must be smaller than --hidden {hidden} (use --k 0 for ordinary backprop)",
    )
    return hidden, args.k


def settings_from_args(args: argparse.Namespace, devices: int) -> MnistSettings:
    """Validates the MNIST flags; ``devices`` is the resolved device count.

    Raises:
      ConfigError: naming the offending flag(s).
    """
    check = loop.require
    check(1 <= args.layers <= MAX_LAYERS, f"--layers must be 1..{MAX_LAYERS}, got {args.layers}")
    check(args.k >= 0, f"--k must be >= 0 (0 = ordinary backprop), got {args.k}")
    check(args.k_output >= 0, f"--k-output must be >= 0, got {args.k_output}")
    check(
        args.k_output < NUM_CLASSES,
        f"--k-output {args.k_output} must be below the {NUM_CLASSES} output units "
        "(0 = dense output layer)",
    )
    check(0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(
        args.limit_train is None or args.limit_train >= 1,
        f"--limit-train must be >= 1, got {args.limit_train}",
    )
    network = cnn.check_cnn(args)
    hidden, k = _hidden_and_k(args)
    check(
        not args.sparse_update or k >= 1,
        "--sparse-update needs meProp hidden layers: --k >= 1 without --kdim (it updates the "
        "selected columns only; with --k 0 every column is selected)",
    )
    if args.error_feedback is not None:
        check(
            0.0 < args.error_feedback <= 1.0,
            f"--error-feedback DECAY must be in (0, 1], got {args.error_feedback:g}",
        )
        check(k >= 1, "--error-feedback needs meProp hidden layers: --k >= 1 without --kdim")
        check(
            args.mode in (None, "unified"),
            f"--error-feedback needs --mode unified (a memory per column), got --mode {args.mode}",
        )
        check(not args.sparse_update, "--error-feedback does not combine with --sparse-update")
    adaptive = feedback_flags.check_adaptive(args, k)
    check(
        adaptive is None or getattr(args, "model", "mlp") == "mlp",
        "--adaptive-k needs the MLP (drop --model cnn)",
    )
    mesimp = simplify.check_mesimp(args, k)
    mode = DEFAULT_MODE if args.mode is None else args.mode
    per_row = mode.replace("-", "_") in ("per_example", "random")
    fast = per_row and k >= 1 and network.get("network", "mlp") == "mlp"
    layout = resolve_kernel_layout(args.kernel_layout, fast, bool(mesimp.get("mesimp")))
    blocker = _compact_blocker(args, k, adaptive, mesimp)
    compact_gradients = _compact_gradients(args, blocker, layout)
    check(
        args.kernel_grad != "factored" or per_row,
        f"--kernel-grad factored needs --mode per-example or random, got --mode {mode}",
    )
    loop.check_divisible(args.batch_size, devices, "--batch-size")
    eval_batch = loop.resolve_eval_batch(args.eval_batch_size, DEFAULT_EVAL_BATCH, devices)
    return MnistSettings(
        hidden=hidden,
        layers=args.layers,
        k=k,
        mode=mode,
        k_output=args.k_output,
        dropout=args.dropout,
        kdim=args.kdim,
        batch_size=args.batch_size,
        eval_batch_size=eval_batch,
        limit_train=args.limit_train,
        source=args.source,
        data_dir=args.data_dir,
        sparse_update=args.sparse_update,
        compact_gradients=compact_gradients,
        factored_gradients=args.kernel_grad == "factored"
        or (args.kernel_grad == "auto" and per_row and _compact_pays_off(blocker, layout)),
        feedback=float(args.error_feedback or 0.0),
        adaptive=adaptive,
        kernel_layout=layout,
        **mesimp,
        **network,
    )


def _compact_blocker(args, k: int, adaptive, mesimp: dict) -> str | None:
    """The flag that rules compact gradients out (layers without meProp, or with state of
    their own), or None."""
    return next(
        (
            flag
            for flag, on in (
                ("--k 0 or --kdim", k < 1),
                ("--model cnn", getattr(args, "model", "mlp") != "mlp"),
                ("--error-feedback", args.error_feedback is not None),
                ("--adaptive-k", adaptive is not None),
                ("--mesimp", bool(mesimp.get("mesimp"))),
            )
            if on
        ),
        None,
    )


def _compact_gradients(args, blocker: str | None, layout: str) -> bool:
    """``--kernel-grad`` resolved: whether the authors' update takes compact gradients."""
    if args.kernel_grad == "masked" or args.sparse_update:
        return False  # --sparse-update: compact gradients too, but the lazy rule
    if args.kernel_grad == "auto":
        return _compact_pays_off(blocker, layout)
    loop.require(
        blocker is None,
        f"--kernel-grad {args.kernel_grad} needs meProp hidden layers of the MLP without "
        f"their own state; drop {blocker}",
    )
    return True


def _compact_pays_off(blocker: str | None, layout: str) -> bool:
    """Where ``auto`` keeps compact gradients, and for the per-row modes their factors (the
    fastest MNIST steps and epochs on a CPU, under either update rule): kernels stored
    ``[out, in]``, whose rows the optimizer's native pass reads (on ``[in, out]`` kernels they
    are scattered into the masked gradient anyway), and no flag that rules them out."""
    return blocker is None and layout == "out_in"


def _as_started(s: MnistSettings, args: argparse.Namespace, saved: dict) -> MnistSettings:
    """On ``--resume``, the ``auto`` forms the run started with (from its ``saved``
    settings): a run begun before ``auto`` picked ``[out, in]`` kernels, compact gradients or
    their factors (under either rule) goes on as it began."""
    layout = resumed_layout(args.kernel_layout, s.kernel_layout, saved)
    compact, factored = s.compact_gradients, s.factored_gradients
    if args.kernel_grad == "auto":
        compact = bool(saved.get("compact_gradients", False)) and layout == "out_in"
        lazy_factors = s.sparse_update and layout == "out_in"
        factored = bool(saved.get("factored_gradients", False)) and (compact or lazy_factors)
    return dataclasses.replace(
        s, kernel_layout=layout, compact_gradients=compact, factored_gradients=factored
    )


def default_out(s: MnistSettings, args: argparse.Namespace) -> Path:
    """``runs/mnist-<config>``: the same flags give the same folder, so ``--resume`` finds it."""
    if s.kdim:
        parts = [f"kdim{s.hidden}"]
    elif s.k == 0:
        parts = ["dense"]
    else:
        parts = [f"k{s.k}", s.mode]
    if s.network == "cnn":
        parts.insert(0, cnn.out_tag(s.channels, s.k_conv))
    if s.sparse_update:
        parts.append("sparse")
    if s.feedback:
        parts.append(f"fb{s.feedback:g}")
    parts += feedback_flags.out_parts(0.0, s.adaptive)
    if s.mesimp:
        parts.append(mesimp_loop.out_part(s))
    parts += [f"h{s.hidden}x{s.layers}", args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    parts += run_name_tail(args, k_output=s.k_output, dropout=s.dropout, limit_train=s.limit_train)
    return Path("runs") / "-".join(["mnist", *parts])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment; returns the exit code (130 after Ctrl-C, with a checkpoint).

    Bad flags and missing data end the program with exit code 2 before any training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser, ImportError):
        loop.setup_processes(args)  # before anything touches a device
        devices = loop.resolve_devices(args.devices, [args.batch_size])
        settings = settings_from_args(args, devices)
        cfg = loop.train_config_from_args(args, default_out(settings, args))
        saved = loop.saved_config(cfg.out) if args.resume else None
        if saved is not None:
            settings = _as_started(settings, args, saved)
        cfg = dataclasses.replace(cfg, compact_gradients=settings.compact_gradients)
        if not settings.mesimp:
            return loop.run_cli(
                lambda: MnistTask(load_data(settings), settings), cfg, "experiments.mnist", argv
            )
        # meSimp prunes at chunk boundaries: the chunks follow from the data's size.
        task = MnistTask(load_data(settings), settings)
        cfg = dataclasses.replace(
            cfg, chunk_steps=simplify.chunk_steps(len(task.data.train_x), settings)
        )

        def finish(task: MnistTask) -> None:
            entry = simplify.finish_run(task, cfg.out, args.export)
            if entry is not None:
                print(
                    f"meSimp: hidden sizes {entry['final_sizes']} (padded "
                    f"{entry['final_widths']}); exported stock MLP test "
                    f"{entry['export_test_acc']:.2f}%"
                    + (f", written to {args.export}" if args.export is not None else "")
                )

        return loop.run_cli(lambda: task, cfg, "experiments.mnist", argv, finish=finish)
    return 2  # not reached: user_errors ends the program with exit code 2
