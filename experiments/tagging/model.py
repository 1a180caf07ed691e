"""The LSTM tagger (Flax linen), its initial parameters and its loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.linen.recurrent import flip_sequences
from jax import lax
from jax.sharding import PartitionSpec as P

import meprop_jax
from experiments.common import inverted_dropout
from experiments.tagging.batching import MIN_BUCKET

__all__ = [
    "Tagger",
    "embed_tokens",
    "init_params",
    "lstm_cell",
    "lstm_layer",
    "run_to_longest",
    "token_loss",
    "zero_carry",
]


def _batch_axis(x: jax.Array) -> Any:
    """The mesh axis ``x``'s leading (batch) axis is split over, or None."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec[0] if spec else None


def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``, keeping ``ids``'s batch sharding (explicit mesh axes need it said)."""
    axis = _batch_axis(ids)
    if axis is None:
        return jnp.take(table, ids, axis=0)
    spec = P(axis, *([None] * ids.ndim))
    return table.at[ids].get(out_sharding=spec)


def zero_carry(x: jax.Array, hidden: int) -> tuple[jax.Array, jax.Array]:
    """A zero LSTM carry ``(c, h)`` for ``x [batch, time, in]``, sharded like ``x``.

    ``nn.RNN`` would build an unsharded carry itself, which a scan over a batch-sharded input
    rejects under explicit mesh axes.
    """
    axis = _batch_axis(x)
    shape = (x.shape[0], hidden)
    if axis is None:
        zeros = jnp.zeros(shape, x.dtype)
    else:
        zeros = jnp.zeros(shape, x.dtype, out_sharding=P(axis, None))
    return zeros, zeros


def lstm_cell(
    hidden: int,
    k: int,
    mode: str,
    name: str,
    record: bool = False,
    *,
    feedback: float = 0.0,
    adaptive: meprop_jax.AdaptiveK | None = None,
    steps: int = 1,
    kernel_layout: str = "in_out",
) -> meprop_jax.LSTMCell:
    """One direction's meProp cell (see :func:`lstm_layer` for the arguments)."""
    return meprop_jax.LSTMCell(
        hidden,
        k=k,
        mode=mode,
        record=record,
        feedback=feedback,
        feedback_steps=steps,
        adaptive=adaptive,
        kernel_layout=kernel_layout,
        name=name,
    )


def lstm_layer(
    hidden: int,
    k: int,
    mode: str,
    reverse: bool,
    name: str,
    record: bool = False,
    *,
    feedback: float = 0.0,
    adaptive: meprop_jax.AdaptiveK | None = None,
    steps: int = 1,
    kernel_layout: str = "in_out",
) -> nn.RNN:
    """One direction of the tagger's LSTM: a meProp cell scanned over time.

    Called inside a compact module, the cell belongs to that module: its parameters sit under
    ``name``. With ``reverse`` the scan reads each sentence from its last real word back
    (``seq_lengths``) and the outputs come back in the input order. With ``record`` the cell
    keeps meSimp's activity record (``"mesimp"`` at ``name``), shared by every time step.
    ``feedback`` (error-feedback decay) and ``adaptive`` (adaptive k) are those of the cell;
    its memory and chosen-k tap are shared by the ``steps`` time steps of the scan.
    ``kernel_layout`` stores the cell's kernels ``[in, out]`` (Flax's) or ``[out, in]``.

    Returns:
      An ``nn.RNN`` mapping ``x [batch, time, in]`` to ``[batch, time, hidden]``.
    """
    shared = {"feedback": feedback, "adaptive": adaptive, "steps": steps}
    cell = lstm_cell(hidden, k, mode, name, record, kernel_layout=kernel_layout, **shared)
    split = {"params": False, "meprop": True}  # a fresh random-k key at every step
    shared = [meprop_jax.feedback.MEMORY_COLLECTION] if feedback else []
    shared += [] if adaptive is None else [meprop_jax.linen.ADAPTIVE_TAP_COLLECTION]
    if not record and not shared:
        return nn.RNN(cell, reverse=reverse, keep_order=True, split_rngs=split)
    broadcast = ["params", *shared]
    if record:
        broadcast += [meprop_jax.mesimp.COLLECTION, meprop_jax.mesimp.TAP_COLLECTION]
    return nn.RNN(
        cell, reverse=reverse, keep_order=True, split_rngs=split, variable_broadcast=broadcast
    )


def run_to_longest(
    cell: nn.Module,
    x: jax.Array,
    lengths: jax.Array,
    carry: tuple[jax.Array, jax.Array],
    reverse: bool = False,
) -> jax.Array:
    """``cell`` over ``x [batch, time, in]`` up to the batch's longest sentence only, in a
    ``while`` loop whose trip count is data: one compiled program serves every padded length
    (evaluation and prediction need no gradient, which a dynamic loop could not give).

    Equals the ``nn.RNN`` of :func:`lstm_layer` at every position before a sentence's end
    (``reverse``: each sentence read from its last real word back); positions past a
    sentence's end hold no meaningful value.

    Returns:
      ``[batch, time, hidden]``.
    """
    if reverse:
        x = flip_sequences(x, lengths, num_batch_dims=1, time_major=False)
    hidden = carry[1].shape[-1]
    axis = _batch_axis(x)
    shape = (x.shape[0], x.shape[1], hidden)
    if axis is None:
        out = jnp.zeros(shape, carry[1].dtype)
    else:
        out = jnp.zeros(shape, carry[1].dtype, out_sharding=P(axis, None, None))
    steps = jnp.minimum(jnp.max(lengths), x.shape[1]).astype(jnp.int32)

    def cond(_, state):
        return state[0] < steps

    def body(cell, state):
        t, carry, out = state
        carry, y = cell(carry, lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False))
        return t + 1, carry, lax.dynamic_update_index_in_dim(out, y, t, axis=1)

    # Random mode draws a key per step, unused by the forward: the same one will do.
    rngs = {cell.rng_collection: False}
    init = (jnp.zeros((), jnp.int32), carry, out)
    _, _, out = nn.while_loop(cond, body, cell, init, split_rngs=rngs)
    if reverse:
        out = flip_sequences(out, lengths, num_batch_dims=1, time_major=False)
    return out


def embed_tokens(module: nn.Module, words: jax.Array, features: jax.Array) -> jax.Array:
    """The word embedding and the feature embeddings of every token, concatenated.

    Called inside ``module``'s compact ``__call__``: the tables are its parameters
    (``word_embedding``, ``feature_embedding_<j>``), sized by its ``vocab_size``,
    ``feature_sizes``, ``word_dim`` and ``feature_dim``.

    Args:
      module: the tagger (LSTM or Transformer).
      words: word ids ``[batch, time]``.
      features: feature value ids ``[batch, time, F]``.

    Returns:
      ``[batch, time, word_dim + F * feature_dim]``.
    """
    embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    table = module.param("word_embedding", embed_init, (module.vocab_size, module.word_dim))
    parts = [_lookup(table, words)]
    tables = [
        module.param(f"feature_embedding_{j}", embed_init, (size, module.feature_dim))
        for j, size in enumerate(module.feature_sizes)
    ]
    if tables:
        # One lookup in the tables stacked end to end, not one per feature: a single
        # gather and scatter-add to compile (the parameter tree stays one table a feature).
        offsets = np.cumsum([0, *module.feature_sizes[:-1]]).astype(features.dtype)
        looked = _lookup(jnp.concatenate(tables, axis=0), features + offsets)
        parts.append(looked.reshape(*features.shape[:-1], -1))  # [batch, time, F * dim]
    return jnp.concatenate(parts, axis=-1)


class Tagger(nn.Module):
    """Embeddings -> (dropout) -> LSTM (one- or two-way) -> (dropout) -> dense output layer.

    Attributes:
      vocab_size: word vocabulary size (with ``<pad>`` and ``<unk>``).
      feature_sizes: vocabulary size of each feature.
      num_tags: output classes.
      hidden: LSTM units (per direction).
      k: meProp k per gate of the LSTM cell (0 = ordinary backprop).
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      dropout: inverted-dropout rate on the LSTM input and output (0 = none).
      bidirectional: add a right-to-left LSTM and concatenate the two outputs.
      word_dim: word embedding size.
      feature_dim: size of each feature embedding.
      record: keep meSimp's activity record in the (one-way) LSTM cell.
      feedback: error-feedback decay of the LSTM cells (0 = none; unified mode).
      adaptive: adaptive k of the LSTM cells (``k`` per gate is the upper bound).
      kernel_layout: the LSTM cells' kernels ``[in, out]`` (``"in_out"``, Flax's) or
        ``[out, in]`` (``"out_in"``, the fast layout of the per-row modes).
    """

    vocab_size: int
    feature_sizes: tuple[int, ...]
    num_tags: int
    hidden: int = 500
    k: int = 0
    mode: str = "unified"
    dropout: float = 0.0
    bidirectional: bool = False
    word_dim: int = 50
    feature_dim: int = 20
    record: bool = False
    feedback: float = 0.0
    adaptive: meprop_jax.AdaptiveK | None = None
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(
        self,
        words: jax.Array,
        features: jax.Array,
        lengths: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """Logits ``[batch, time, num_tags]`` of ``words [batch, time]``, ``features
        [batch, time, F]`` and true ``lengths [batch]`` (positions past a length are padding).
        """
        x = embed_tokens(self, words, features)
        if train and self.dropout > 0:
            x = inverted_dropout(x, self.dropout, self.make_rng("dropout"))
        carry = zero_carry(x, self.hidden)
        # Every time step of the scan shares the cells' memory and chosen-k tap.
        shared = {"feedback": self.feedback, "adaptive": self.adaptive, "steps": x.shape[1]}
        shared["kernel_layout"] = self.kernel_layout
        names = ["lstm", "lstm_backward"] if self.bidirectional else ["lstm"]
        outputs = []
        for reverse, name in enumerate(names):
            record = self.record and not reverse
            if train or self.is_initializing():
                # nn.Bidirectional gathers the final carries, which explicit mesh axes
                # reject; a reversed nn.RNN with keep_order is its backward half.
                rnn = lstm_layer(
                    self.hidden, self.k, self.mode, bool(reverse), name, record, **shared
                )
                outputs.append(rnn(x, initial_carry=carry, seq_lengths=lengths))
            else:
                cell = lstm_cell(self.hidden, self.k, self.mode, name, record, **shared)
                outputs.append(run_to_longest(cell, x, lengths, carry, bool(reverse)))
        h = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)
        if train and self.dropout > 0:
            h = inverted_dropout(h, self.dropout, self.make_rng("dropout"))
        return meprop_jax.Dense(self.num_tags, name="output")(h)


def init_params(model: nn.Module, key: jax.Array) -> Any:
    """Initial parameters of ``model`` (Flax defaults; shapes do not depend on the input)."""
    k_params, k_meprop, k_dropout = jax.random.split(key, 3)
    words = jnp.zeros((1, MIN_BUCKET), jnp.int32)
    features = jnp.zeros((1, MIN_BUCKET, len(model.feature_sizes)), jnp.int32)
    lengths = jnp.ones((1,), jnp.int32)
    rngs = {"params": k_params, "meprop": k_meprop, "dropout": k_dropout}
    return jax.jit(model.init, static_argnums=4)(rngs, words, features, lengths, False)


def token_loss(
    logits: jax.Array, tags: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over the masked-in tokens, and ``correct``/``count``.

    A tag id of -1 (unknown to the training vocabulary) is a token that is always wrong and
    adds no loss.
    """
    known = (tags >= 0).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(tags, 0))
    count = jnp.sum(mask)
    loss = jnp.sum(ce * mask * known) / jnp.maximum(count, 1.0)
    hits = (jnp.argmax(logits, axis=-1).astype(tags.dtype) == tags).astype(mask.dtype)
    return loss, {"correct": jnp.sum(hits * mask), "count": count}
