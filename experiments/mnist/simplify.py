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

_EXPORT_HELP = (
    "after the run, write the shrunk model as a stock Flax MLP: DIR/params.msgpack and "
    "DIR/config.json"
)


def add_mesimp_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``meSimp`` flag group shared by the experiments."""
    mesimp_loop.add_mesimp_arguments(parser, _EXPORT_HELP)


def check_mesimp(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """Validates the meSimp flags; returns the :class:`MnistSettings` fields they set.

    Raises:
      ConfigError: naming the offending flag.
    """
    if args.mesimp:
        loop.require(not args.kdim, "--mesimp needs meProp hidden layers: drop --kdim")
    options = mesimp_loop.mesimp_options(args, k)
    if options:
        check = loop.require
        check(not args.sparse_update, "--mesimp does not combine with --sparse-update")
        check(not args.error_feedback, "--mesimp does not combine with --error-feedback")
    return options


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
    prunes = mesimp_loop.prune_events(results)
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
