"""meSimp for the LSTM tagger: its flags, the chunking, and the exported model after a run.

``--mesimp`` trains the tagger with meProp and shrinks its LSTM as
:mod:`experiments.common.mesimp` describes (cycle schedule, activity record, real
shrinking). A hidden unit of the LSTM ties its four gates: it is one column of each gate's
input and recurrent kernels, one row of every recurrent kernel and one input row of the output
layer, and it goes as a whole (:func:`meprop_jax.mesimp.shrink_lstm`). Every time step of
every sentence is one example of the record. After a complete run ``results.json`` gains a
``"mesimp"`` entry (final size and padded width, the sizes after every prune, the test
accuracy of the exported model beside the trained one's), and ``--export DIR`` writes
``DIR/params.msgpack`` and ``DIR/config.json`` for :class:`StockTagger`, a stock
``flax.linen`` tagger (``nn.LSTMCell``, ``nn.Dense``) of the surviving size.
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
from experiments.loop.results import write_json
from experiments.tagging.predict import predict_tags
from experiments.tagging.task import TaggingTask
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "LAYERS",
    "StockTagger",
    "add_mesimp_arguments",
    "check_mesimp",
    "chunk_steps",
    "describe",
    "export_stock",
    "finish_run",
    "load_export",
]

#: The shrunk layers: the LSTM cell, then the output layer that reads its hidden state.
LAYERS = ("lstm", "output")

_EXPORT_HELP = (
    "after the run, write the shrunk tagger as a stock Flax model (flax.linen.LSTMCell and "
    "Dense of the surviving size): DIR/params.msgpack and DIR/config.json"
)


def add_mesimp_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the shared ``meSimp`` flag group."""
    mesimp_loop.add_mesimp_arguments(parser, _EXPORT_HELP)


def check_mesimp(args: argparse.Namespace) -> dict[str, Any]:
    """Validates the meSimp flags; returns the :class:`TaggerSettings` fields they set.

    Raises:
      ConfigError: naming the offending flag.
    """
    options = mesimp_loop.mesimp_options(args, args.k)
    if options:
        loop.require(
            not args.bidirectional,
            "--mesimp shrinks the one-way LSTM: drop --bidirectional",
        )
    return options


def chunk_steps(task: TaggingTask) -> int:
    """Minibatches per chunk, so that an epoch has about ``mesimp_prunes_per_epoch`` chunks
    (each length bucket's last chunk may be shorter)."""
    batch = task.settings.batch_size
    steps = sum(max(1, -(-len(b.index) // batch)) for b in task.buckets["train"])
    return mesimp_loop.chunk_steps(steps, task.settings.mesimp_prunes_per_epoch)


class StockTagger(nn.Module):
    """The exported tagger: embeddings -> ``flax.linen.LSTMCell`` -> ``flax.linen.Dense``.

    The parameters are named as :class:`~experiments.tagging.model.Tagger`'s
    (``word_embedding``, ``feature_embedding_<j>``, ``lstm``, ``output``).
    """

    vocab_size: int
    feature_sizes: tuple[int, ...]
    num_tags: int
    hidden: int
    word_dim: int = 50
    feature_dim: int = 20

    @nn.compact
    def __call__(
        self, words: jax.Array, features: jax.Array, lengths: jax.Array, train: bool = False
    ) -> jax.Array:
        """Logits ``[batch, time, num_tags]`` of ``words [batch, time]``, ``features
        [batch, time, F]`` and ``lengths [batch]``; ``train`` is unused (no dropout)."""
        del train
        init = nn.initializers.zeros
        table = self.param("word_embedding", init, (self.vocab_size, self.word_dim))
        parts = [jnp.take(table, words, 0)]
        for j, size in enumerate(self.feature_sizes):
            table = self.param(f"feature_embedding_{j}", init, (size, self.feature_dim))
            parts.append(jnp.take(table, features[..., j], 0))
        x = jnp.concatenate(parts, axis=-1)
        h = nn.RNN(nn.LSTMCell(self.hidden, name="lstm"))(x, seq_lengths=lengths)
        return nn.Dense(self.num_tags, name="output")(h)


def _abstract(model: nn.Module) -> Any:
    """``model``'s variables as shapes with a device (for restoring), without the taps."""
    words = jnp.zeros((1, 8), jnp.int32)
    features = jnp.zeros((1, 8, len(model.feature_sizes)), jnp.int32)
    lengths = jnp.ones((1,), jnp.int32)
    rngs = {"params": jax.random.key(0), "meprop": jax.random.key(1)}
    shapes = jax.eval_shape(lambda: model.init(rngs, words, features, lengths, False))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = {k: v for k, v in shapes.items() if k != mesimp_lib.TAP_COLLECTION}
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)


def export_stock(variables: Any, task: TaggingTask) -> tuple[StockTagger, Any, int]:
    """The :class:`StockTagger` of the surviving units and its variables (on the host).

    Args:
      variables: the trained tagger's variables (``"params"`` and ``"mesimp"``), at any
        (padded) LSTM width.
      task: the task (vocabularies and settings).

    Returns:
      ``(model, {"params": ...}, surviving units)``.
    """
    keep = mesimp_lib.keep_sets(variables[mesimp_lib.COLLECTION])["lstm"]
    shrunk = mesimp_lib.shrink_lstm(variables["params"], None, keep, "lstm", ["output"], pad_to=1)
    (units,) = shrunk.units
    s, vocab = task.settings, task.data.vocab
    model = StockTagger(
        vocab_size=len(vocab.words),
        feature_sizes=tuple(len(v) for v in vocab.features),
        num_tags=len(vocab.tags),
        hidden=units,
        word_dim=s.word_dim,
        feature_dim=s.feature_dim,
    )
    return model, {"params": jax.device_get(shrunk.params)}, units


def _config_json(model: StockTagger) -> dict[str, Any]:
    return {
        "model": "flax.linen tagger: word and feature embeddings (concatenated), nn.RNN of "
        "nn.LSTMCell, nn.Dense output",
        "vocab_size": model.vocab_size,
        "feature_sizes": list(model.feature_sizes),
        "num_tags": model.num_tags,
        "hidden": model.hidden,
        "word_dim": model.word_dim,
        "feature_dim": model.feature_dim,
        "layers": list(LAYERS),
    }


def load_export(directory: Path) -> tuple[StockTagger, Any]:
    """The stock tagger and its variables from ``directory`` (what ``--export`` wrote)."""
    config = json.loads((directory / "config.json").read_text())
    model = StockTagger(
        vocab_size=config["vocab_size"],
        feature_sizes=tuple(config["feature_sizes"]),
        num_tags=config["num_tags"],
        hidden=config["hidden"],
        word_dim=config["word_dim"],
        feature_dim=config["feature_dim"],
    )
    template = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, 8), jnp.int32),
            jnp.zeros((1, 8, len(model.feature_sizes)), jnp.int32),
            jnp.ones((1,), jnp.int32),
        )
    )
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
    variables = serialization.from_bytes(template, (directory / "params.msgpack").read_bytes())
    return model, variables


def _predictions(model: nn.Module, variables: Any, task: TaggingTask) -> np.ndarray:
    """Every test token's predicted tag id, in file order, concatenated."""
    encoded = [task.data.vocab.encode(s) for s in task.data.test]
    preds = predict_tags(model, variables, encoded, task.settings.eval_batch_size)
    return np.concatenate(preds) if preds else np.zeros(0, np.int32)


def finish_run(task: TaggingTask, out: Path, export: Path | None) -> dict[str, Any] | None:
    """After a complete meSimp run: adds ``"mesimp"`` to ``results.json`` (final size and
    width, every prune's sizes, the exported model's test accuracy beside the trained
    model's, how many test tokens they tag alike) and, with ``export``, writes the stock
    model there.

    Returns the ``"mesimp"`` entry, or None when the run did not complete.
    """
    path = out / loop.RESULTS_FILE
    results = json.loads(path.read_text())
    if results["status"] != "complete":
        return None
    last = results["epochs"][-1]["epoch"]
    (width,) = mesimp_loop.widths_at(results, last, (task.settings.hidden,))
    model = task.model.clone(hidden=width)
    variables, _ = loop.restore_params(out, _abstract(model))
    (size,) = mesimp_loop.surviving_units(variables[mesimp_lib.COLLECTION], ("lstm",))
    stock_model, stock, _ = export_stock(variables, task)
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        (export / "params.msgpack").write_bytes(serialization.to_bytes(stock))
        (export / "config.json").write_text(json.dumps(_config_json(stock_model), indent=2) + "\n")
    gold = np.concatenate([task.data.vocab.encode(s).tags for s in task.data.test])
    trained = _predictions(model, variables, task)
    exported = _predictions(stock_model, stock, task)
    entry = {
        "final_sizes": [size],
        "final_widths": [width],
        "prunes": mesimp_loop.prune_events(results),
        "export_dir": None if export is None else str(export),
        "export_test_acc": 100.0 * float(np.mean(exported == gold)),
        "trained_test_acc": 100.0 * float(np.mean(trained == gold)),
        "same_test_predictions": int(np.sum(exported == trained)),
        "test_tokens": len(gold),
    }
    results["mesimp"] = entry
    write_json(path, results)
    return entry


def describe(entry: dict[str, Any], export: Path | None) -> str:
    """The last log line of a meSimp run."""
    return (
        f"meSimp: LSTM size {entry['final_sizes'][0]} (padded {entry['final_widths'][0]}); "
        f"exported stock tagger test {entry['export_test_acc']:.2f}%"
        + (f", written to {export}" if export is not None else "")
    )
