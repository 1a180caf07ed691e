"""meSimp for the MNIST MLP: its flags, their checks, and the exported model after a run.

``--mesimp`` trains the MLP with meProp and shrinks its hidden layers as
:mod:`experiments.common.mesimp` describes (cycle schedule, activity record, real
shrinking). After a complete run the final model's surviving units are exported to a stock
``flax.linen`` MLP (:class:`experiments.common.mesimp.StockMLP`); ``results.json`` gains a
``"mesimp"`` entry with the final sizes, the sizes after every prune and the exported model's
test accuracy, and ``--export DIR`` writes ``DIR/params.msgpack`` and ``DIR/config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from experiments import loop
from experiments.common import mesimp as mesimp_loop
from experiments.loop.results import write_json
from experiments.mnist.task import NUM_CLASSES, MnistSettings, MnistTask
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "add_mesimp_arguments",
    "check_mesimp",
    "chunk_steps",
    "finish_run",
    "load_export",
]

_SCHEDULE_HELP = (
    "meSimp (Sun et al. 2017): train with meProp and permanently remove the hidden units that "
    "top-k seldom selects; the layers shrink for real (forward included), padded to multiples "
    "of 16 with masked units. Training runs in cycles of --mesimp-cycle epochs: even cycles "
    "(epochs 1-5, 11-15, ... with the default 5) prune --mesimp-prunes-per-epoch times per "
    "epoch, odd cycles train the shrunk net with plain meProp. A prune keeps a unit selected "
    "by at least --mesimp-threshold of the examples counted since the last prune (the count "
    "goes on through odd cycles). With --mode per-example each example selects its own k "
    "units; with unified every example of a batch counts as selecting the batch's k. The "
    "optimizer's moments are zeroed at every cycle start (the step count is kept)."
)


def add_mesimp_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``meSimp`` flag group."""
    g = parser.add_argument_group("meSimp", _SCHEDULE_HELP)
    g.add_argument("--mesimp", action="store_true", help="train with meSimp (needs --k >= 1)")
    g.add_argument(
        "--mesimp-threshold",
        type=float,
        default=None,
        help=f"prune threshold in (0, 1) (default {mesimp_lib.DEFAULT_THRESHOLD:g})",
    )
    g.add_argument(
        "--mesimp-cycle",
        type=int,
        default=None,
        help=f"epochs per cycle (default {mesimp_loop.DEFAULT_CYCLE})",
    )
    g.add_argument(
        "--mesimp-prunes-per-epoch",
        type=int,
        default=None,
        help=f"prunes per epoch of an even cycle, at chunk boundaries (default "
        f"{mesimp_loop.DEFAULT_PRUNES_PER_EPOCH}; sets the chunks, so not with --chunk-steps)",
    )
    g.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the run, write the shrunk model as a stock Flax MLP: DIR/params.msgpack "
        "and DIR/config.json",
    )


def check_mesimp(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """Validates the meSimp flags; returns the :class:`MnistSettings` fields they set.

    Raises:
      ConfigError: naming the offending flag.
    """
    check = loop.require
    given = [
        flag
        for flag, value in (
            ("--mesimp-threshold", args.mesimp_threshold),
            ("--mesimp-cycle", args.mesimp_cycle),
            ("--mesimp-prunes-per-epoch", args.mesimp_prunes_per_epoch),
            ("--export", args.export),
        )
        if value is not None
    ]
    if not args.mesimp:
        check(not given, f"{given[0] if given else ''} needs --mesimp")
        return {}
    threshold = (
        mesimp_lib.DEFAULT_THRESHOLD if args.mesimp_threshold is None else args.mesimp_threshold
    )
    cycle = mesimp_loop.DEFAULT_CYCLE if args.mesimp_cycle is None else args.mesimp_cycle
    prunes = (
        mesimp_loop.DEFAULT_PRUNES_PER_EPOCH
        if args.mesimp_prunes_per_epoch is None
        else args.mesimp_prunes_per_epoch
    )
    check(0.0 < threshold < 1.0, f"--mesimp-threshold must be in (0, 1), got {threshold:g}")
    check(cycle >= 1, f"--mesimp-cycle must be >= 1, got {cycle}")
    check(prunes >= 1, f"--mesimp-prunes-per-epoch must be >= 1, got {prunes}")
    check(not args.kdim, "--mesimp needs meProp hidden layers: drop --kdim")
    check(k >= 1, "--mesimp needs meProp hidden layers: --k >= 1 (its top-k drives the pruning)")
    check(not args.sparse_update, "--mesimp does not combine with --sparse-update")
    check(not args.error_feedback, "--mesimp does not combine with --error-feedback")
    check(
        not args.chunk_steps,
        "--mesimp sets the chunks from --mesimp-prunes-per-epoch: drop --chunk-steps",
    )
    return {
        "mesimp": True,
        "mesimp_threshold": float(threshold),
        "mesimp_cycle": int(cycle),
        "mesimp_prunes_per_epoch": int(prunes),
    }


def chunk_steps(train_size: int, s: MnistSettings) -> int:
    """Minibatches per chunk, so that an epoch has ``mesimp_prunes_per_epoch`` chunks (fewer
    when it has fewer minibatches)."""
    steps = math.ceil(train_size / s.batch_size)
    return max(1, math.ceil(steps / s.mesimp_prunes_per_epoch))


def _final_variables(task: MnistTask, out: Path, widths: tuple[int, ...]) -> Any:
    """The last checkpoint's variables (parameters and record) at the hidden ``widths``."""
    x = jnp.zeros((1, task.data.train_x.shape[1]), jnp.float32)
    template = task.settings.model(widths).init(jax.random.key(0), x, False)
    template = {k: v for k, v in template.items() if k != mesimp_lib.TAP_COLLECTION}
    variables, _ = loop.restore_params(out, template)
    return variables


def _predict(apply, x: np.ndarray, batch: int) -> np.ndarray:
    fn = jax.jit(apply)
    return np.concatenate(
        [np.asarray(jnp.argmax(fn(x[i : i + batch]), -1)) for i in range(0, len(x), batch)]
    )


def load_export(directory: Path) -> tuple[mesimp_loop.StockMLP, Any]:
    """The stock model and its variables from ``directory`` (what ``--export`` wrote)."""
    config = json.loads((directory / "config.json").read_text())
    model = mesimp_loop.StockMLP(tuple(config["hidden_sizes"]), config["num_classes"])
    template = model.init(jax.random.key(0), jnp.zeros((1, config["input_dim"]), jnp.float32))
    variables = serialization.from_bytes(template, (directory / "params.msgpack").read_bytes())
    return model, variables


def finish_run(task: MnistTask, out: Path, export: Path | None) -> dict[str, Any] | None:
    """After a complete meSimp run: exports the final model and adds ``"mesimp"`` to
    ``results.json`` (final sizes and widths, every prune's sizes, the exported model's test
    accuracy beside the trained model's, and whether their test predictions agree).

    Returns the ``"mesimp"`` entry, or None when the run did not complete.
    """
    path = out / loop.RESULTS_FILE
    results = json.loads(path.read_text())
    if results["status"] != "complete":
        return None
    prunes = [e for r in results["epochs"] for e in r.get("events", []) if "sizes" in e]
    layers = task.settings.layer_names
    widths = tuple(prunes[-1]["widths"]) if prunes else (task.settings.hidden,) * (len(layers) - 1)
    variables = _final_variables(task, out, widths)
    sizes = mesimp_loop.surviving_units(variables[mesimp_lib.COLLECTION], layers[:-1])
    model = task.settings.model(widths)
    test_x, test_y = task.data.test_x, task.data.test_y
    batch = task.settings.eval_batch_size
    trained = _predict(lambda x: model.apply(variables, x, False), test_x, batch)
    stock, stock_sizes = mesimp_loop.export_stock(variables, layers)
    if export is not None:
        mesimp_loop.write_export(export, stock, stock_sizes, layers, test_x.shape[1], NUM_CLASSES)
    stock_model = mesimp_loop.StockMLP(stock_sizes, NUM_CLASSES)
    exported = _predict(lambda x: stock_model.apply(stock, x), test_x, batch)
    entry = {
        "final_sizes": list(sizes),
        "final_widths": list(widths),
        "prunes": prunes,
        "export_dir": None if export is None else str(export),
        "export_test_acc": 100.0 * float(np.mean(exported == test_y)),
        "trained_test_acc": 100.0 * float(np.mean(trained == test_y)),
        "same_test_predictions": int(np.sum(exported == trained)),
        "test_size": len(test_y),
    }
    results["mesimp"] = entry
    write_json(path, results)
    return entry
