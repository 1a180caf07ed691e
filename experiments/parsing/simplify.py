"""meSimp for the parser: its flags, the chunking, the width of a saved run, and the export.

``--mesimp`` trains the parser with meProp and shrinks its hidden layer as
:mod:`experiments.common.mesimp` describes (cycle schedule, activity record, real shrinking
of the ``hidden`` -> ``output`` chain; the cube activation maps 0 to 0, so a removed unit
changed nothing). Every oracle configuration is one example of the record. After a complete
run ``results.json`` gains a ``"mesimp"`` entry (final size and padded width, the sizes after
every prune, the exported model's test UAS beside the trained model's), and ``--export DIR``
writes ``DIR/params.msgpack`` and ``DIR/config.json`` for :class:`StockParser`, a stock
``flax.linen`` MLP of the surviving size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization

from experiments import loop
from experiments.common import mesimp as mesimp_loop
from experiments.loop.checkpoints import CHECKPOINT_DIR
from experiments.loop.results import write_json
from experiments.parsing import decoder
from experiments.parsing.model import ParserMLP
from experiments.parsing.task import ParsingTask
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "LAYERS",
    "StockParser",
    "add_mesimp_arguments",
    "check_mesimp",
    "chunk_steps",
    "describe",
    "export_stock",
    "finish_run",
    "load_export",
    "saved_width",
]

#: The shrunk chain: the hidden layer, then the output layer.
LAYERS = ("hidden", "output")

_EXPORT_HELP = (
    "after the run, write the shrunk parser as a stock Flax MLP (embeddings, nn.Dense of the "
    "surviving size, cube or ReLU, nn.Dense): DIR/params.msgpack and DIR/config.json"
)


def add_mesimp_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the shared ``meSimp`` flag group."""
    mesimp_loop.add_mesimp_arguments(parser, _EXPORT_HELP)


def check_mesimp(args: argparse.Namespace) -> dict[str, Any]:
    """Validates the meSimp flags; returns the :class:`ParserSettings` fields they set.

    Raises:
      ConfigError: naming the offending flag.
    """
    if args.mesimp:
        loop.require(not args.kdim, "--mesimp needs a meProp hidden layer: drop --kdim")
    return mesimp_loop.mesimp_options(args, args.k)


def chunk_steps(task: ParsingTask) -> int:
    """Minibatches per chunk, so that an epoch has ``mesimp_prunes_per_epoch`` chunks."""
    s = task.settings
    steps = max(1, -(-len(task.data.examples.gold) // s.batch_size))
    return mesimp_loop.chunk_steps(steps, s.mesimp_prunes_per_epoch)


def saved_width(run: Path, hidden: int, epoch: int | None) -> tuple[int, int | None]:
    """The hidden width of the checkpoint that ``loop.restore_params(run, ..., epoch)``
    reads (``epoch`` if still kept, else the latest), from the resizes in ``results.json``.

    Returns:
      ``(width, epoch)``; ``hidden`` and ``epoch`` as given when there are no results.
    """
    (width,), epoch = mesimp_loop.saved_widths(
        run, epoch, (hidden,), loop.RESULTS_FILE, CHECKPOINT_DIR
    )
    return width, epoch


class StockParser(nn.Module):
    """The exported parser: embeddings -> ``nn.Dense`` -> cube or ReLU -> ``nn.Dense``.

    Parameters are named as :class:`~experiments.parsing.model.ParserMLP`'s (the embedding
    tables, ``hidden``, ``output``), so its feature ids ``[batch, F]`` give the same logits.
    """

    tables: tuple[tuple[str, int, int], ...]
    embed_dim: int
    hidden: int
    num_transitions: int
    activation: str = "cube"

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Logits ``[batch, num_transitions]`` of feature ids ``[batch, F]``."""
        parts, start = [], 0
        for name, rows, positions in self.tables:
            table = self.param(name, nn.initializers.zeros, (rows, self.embed_dim))
            ids = features[:, start : start + positions]
            parts.append(jnp.take(table, ids, 0).reshape(features.shape[0], -1))
            start += positions
        h = nn.Dense(self.hidden, name="hidden")(jnp.concatenate(parts, axis=1))
        h = h * h * h if self.activation == "cube" else nn.relu(h)
        return nn.Dense(self.num_transitions, name="output")(h)


def export_stock(variables: Any, model: ParserMLP) -> tuple[StockParser, Any, int]:
    """The :class:`StockParser` of the surviving units and its variables (on the host).

    Args:
      variables: the trained parser's variables (``"params"`` and ``"mesimp"``).
      model: the trained parser (for its tables and sizes).

    Returns:
      ``(model, {"params": ...}, surviving units)``.
    """
    keep = mesimp_lib.keep_sets(variables[mesimp_lib.COLLECTION])
    params, (units,) = mesimp_lib.export(variables["params"], keep, LAYERS)
    stock = StockParser(
        tables=tuple(model.tables()),
        embed_dim=model.embed_dim,
        hidden=units,
        num_transitions=model.num_transitions,
        activation=model.activation,
    )
    return stock, {"params": jax.device_get(params)}, units


def _config_json(model: StockParser) -> dict[str, Any]:
    return {
        "model": "flax.linen MLP: embedding tables (concatenated in order), nn.Dense hidden, "
        "activation, nn.Dense output",
        "tables": [list(t) for t in model.tables],
        "embed_dim": model.embed_dim,
        "hidden": model.hidden,
        "num_transitions": model.num_transitions,
        "activation": model.activation,
        "layers": list(LAYERS),
    }


def load_export(directory: Path) -> tuple[StockParser, Any]:
    """The stock parser and its variables from ``directory`` (what ``--export`` wrote)."""
    config = json.loads((directory / "config.json").read_text())
    model = StockParser(
        tables=tuple((name, rows, positions) for name, rows, positions in config["tables"]),
        embed_dim=config["embed_dim"],
        hidden=config["hidden"],
        num_transitions=config["num_transitions"],
        activation=config["activation"],
    )
    width = sum(positions for _, _, positions in model.tables)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, width), jnp.int32))
    )
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
    variables = serialization.from_bytes(template, (directory / "params.msgpack").read_bytes())
    return model, variables


def _abstract(model: ParserMLP) -> Any:
    """``model``'s variables as shapes with a device (for restoring), without the taps."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    features = jnp.zeros((1, model.num_features), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, features))
    shapes = {k: v for k, v in shapes.items() if k != mesimp_lib.TAP_COLLECTION}
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)


def _test_heads(task: ParsingTask, score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Greedy test heads ``[S, B, N + 1]`` under ``score`` (features -> logits), and the
    scored-token mask."""
    vocab, group = task.data.vocab, task.eval_batches["test"]

    @jax.jit
    def heads(batch: Any) -> jax.Array:
        labelled = task.model.num_label_ids > 0
        state = decoder.decode(
            score, batch["words"], batch["tags"], batch["lengths"], vocab.num_labels, labelled
        )
        return state.head

    steps = group["lengths"].shape[0]
    out = np.stack([np.asarray(heads({k: v[s] for k, v in group.items()})) for s in range(steps)])
    return out, group["scored"]


def finish_run(task: ParsingTask, out: Path, export: Path | None) -> dict[str, Any] | None:
    """After a complete meSimp run: adds ``"mesimp"`` to ``results.json`` (final size and
    width, every prune's sizes, the exported model's test UAS beside the trained model's
    and how many test heads they agree on) and, with ``export``, writes the stock model.

    Returns the ``"mesimp"`` entry, or None when the run did not complete.
    """
    path = out / loop.RESULTS_FILE
    results = json.loads(path.read_text())
    if results["status"] != "complete":
        return None
    last = results["epochs"][-1]["epoch"]
    (width,) = mesimp_loop.widths_at(results, last, (task.settings.hidden,))
    model = task.model.clone(hidden=width)
    variables, _ = loop.restore_params(out, _abstract(model), epoch=last)
    (size,) = mesimp_loop.surviving_units(variables[mesimp_lib.COLLECTION], ("hidden",))
    stock_model, stock, _ = export_stock(variables, model)
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        (export / "params.msgpack").write_bytes(serialization.to_bytes(stock))
        (export / "config.json").write_text(json.dumps(_config_json(stock_model), indent=2) + "\n")
    group = task.eval_batches["test"]
    trained, scored = _test_heads(task, lambda f: model.apply(variables, f, False))
    exported, _ = _test_heads(task, lambda f: stock_model.apply(stock, f))
    gold = group["heads"]
    count = float(np.sum(scored))
    entry = {
        "final_sizes": [size],
        "final_widths": [width],
        "prunes": mesimp_loop.prune_events(results),
        "export_dir": None if export is None else str(export),
        "export_test_uas": 100.0 * float(np.sum((exported == gold) * scored)) / max(count, 1.0),
        "trained_test_uas": 100.0 * float(np.sum((trained == gold) * scored)) / max(count, 1.0),
        "same_test_heads": int(np.sum((exported == trained) * scored)),
        "test_tokens": int(count),
    }
    results["mesimp"] = entry
    write_json(path, results)
    return entry


def describe(entry: dict[str, Any], export: Path | None) -> str:
    """The last log line of a meSimp run."""
    return (
        f"meSimp: hidden size {entry['final_sizes'][0]} (padded {entry['final_widths'][0]}); "
        f"exported stock parser test UAS {entry['export_test_uas']:.2f}%"
        + (f", written to {export}" if export is not None else "")
    )
