"""Vocabularies, the Chen & Manning MLP with a meProp hidden layer, and its fast scorer.

The model: 48 (36 unlabelled) feature ids -> embeddings of ``embed_dim`` (word, tag and label
tables of their own) -> concatenated ``[batch, F * embed_dim]`` -> ``meprop_jax.Dense(hidden,
k, mode)`` -> cube (``x ** 3``, Chen & Manning) or ReLU -> optional inverted dropout ->
``meprop_jax.Dense(T, k_output)`` -> logits over the transitions.

Decoding uses Chen & Manning's precomputation: the hidden layer's pre-activation is a sum over
feature positions ``p`` of ``E[id_p] @ W_p`` (``W_p`` the rows of the kernel that position
reads), so :func:`hidden_tables` computes ``E @ W_p`` for every position and vocabulary entry
once per set of parameters, and :func:`fast_logits` adds up 48 table rows per configuration
instead of multiplying a ``[F * embed_dim, hidden]`` matrix.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import meprop_jax
from experiments.common import inverted_dropout
from experiments.corpora.treebank import Tree
from experiments.parsing.transitions import NUM_FEATURE_TOKENS, NUM_LABEL_FEATURES

__all__ = [
    "ACTIVATIONS",
    "ParserMLP",
    "Vocab",
    "Vocabularies",
    "fast_logits",
    "hidden_kernel",
    "hidden_tables",
    "normalize_word",
]

NULL, UNKNOWN, ROOT = "<null>", "<unk>", "<root>"
NULL_ID, UNKNOWN_ID, ROOT_ID = 0, 1, 2
ACTIVATIONS: tuple[str, ...] = ("cube", "relu")
VOCAB_FORMAT_VERSION = 1


def normalize_word(word: str) -> str:
    """Lowercase with every decimal digit replaced by ``0``."""
    return "".join("0" if ch.isdigit() else ch for ch in word.lower())


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Strings <-> ids: ``<null>`` 0, ``<unk>`` 1, ``<root>`` 2, then ``items``."""

    items: tuple[str, ...]

    def __post_init__(self) -> None:
        index = {s: i + 3 for i, s in enumerate(self.items)}
        object.__setattr__(self, "_index", index)

    @classmethod
    def build(cls, counts: Counter[str], min_count: int) -> Vocab:
        """The strings seen ``min_count`` times or more, most frequent first."""
        kept = sorted(
            (s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s)
        )
        return cls(tuple(kept))

    def __len__(self) -> int:
        return len(self.items) + 3

    def id(self, item: str) -> int:
        """The id of ``item``, ``<unk>``'s when unknown."""
        return self._index.get(item, UNKNOWN_ID)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class Vocabularies:
    """Word, tag and arc-label vocabularies of the training trees.

    Attributes:
      words: normalised words seen ``min_count`` times or more.
      tags: every training tag.
      labels: the arc labels (DEPREL), sorted; empty for an unlabelled parser.
      min_count: the word threshold.
    """

    words: Vocab
    tags: Vocab
    labels: tuple[str, ...]
    min_count: int

    @property
    def labelled(self) -> bool:
        """Whether the parser predicts arc labels (and uses the 12 label features)."""
        return bool(self.labels)

    @property
    def num_labels(self) -> int:
        """``L`` of the transition system (1 when unlabelled)."""
        return max(1, len(self.labels))

    @classmethod
    def build(cls, trees: Sequence[Tree], min_count: int) -> Vocabularies:
        """Vocabularies of ``trees``; labelled when every tree has DEPRELs."""
        words: Counter[str] = Counter()
        tags: Counter[str] = Counter()
        labels: set[str] = set()
        labelled = all(t.labels is not None for t in trees)
        for tree in trees:
            words.update(normalize_word(w) for w in tree.words)
            tags.update(tree.tags)
            if labelled:
                labels.update(tree.labels or ())
        return cls(
            Vocab.build(words, min_count), Vocab.build(tags, 1), tuple(sorted(labels)), min_count
        )

    def label_index(self, label: str) -> int:
        """Index of an arc label in ``labels``, -1 when unknown."""
        try:
            return self.labels.index(label)
        except ValueError:
            return -1

    def encode(self, tree: Tree) -> tuple[list[int], list[int]]:
        """Word and tag ids of tokens ``0..n`` (0 = ROOT)."""
        words = [ROOT_ID] + [self.words.id(normalize_word(w)) for w in tree.words]
        tags = [ROOT_ID] + [self.tags.id(t) for t in tree.tags]
        return words, tags

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable copy (see :meth:`from_json`)."""
        return {
            "format_version": VOCAB_FORMAT_VERSION,
            "min_count": self.min_count,
            "words": list(self.words.items),
            "tags": list(self.tags.items),
            "labels": list(self.labels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocabularies:
        """The inverse of :meth:`to_json`."""
        if data.get("format_version") != VOCAB_FORMAT_VERSION:
            raise ValueError(f"unsupported vocabulary format {data.get('format_version')!r}")
        return cls(
            Vocab(tuple(data["words"])),
            Vocab(tuple(data["tags"])),
            tuple(data["labels"]),
            int(data["min_count"]),
        )


def _rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``, keeping ``ids``'s batch sharding (explicit mesh axes need it said)."""
    spec = getattr(getattr(jax.typeof(ids), "sharding", None), "spec", None)
    axis = spec[0] if spec else None
    if axis is None:
        return jnp.take(table, ids, axis=0)
    return table.at[ids].get(out_sharding=P(axis, *([None] * ids.ndim)))


def _activation(x: jax.Array, name: str) -> jax.Array:
    return x * x * x if name == "cube" else nn.relu(x)


class ParserMLP(nn.Module):
    """Chen & Manning's feed-forward transition classifier (see the module docstring).

    Attributes:
      num_words, num_tags: vocabulary sizes (with the three special ids).
      num_label_ids: label vocabulary size with NULL (``L + 1``), 0 for no label features.
      num_transitions: output size.
      embed_dim: embedding size of every feature.
      hidden: hidden units.
      k: meProp k of the hidden layer (0 = ordinary backprop).
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      k_output: meProp k of the output layer (0 = dense).
      activation: ``"cube"`` or ``"relu"``.
      dropout: inverted-dropout rate on the hidden activations (training only).
      record: keep meSimp's activity record in the hidden layer (``"mesimp"`` at ``hidden``).
      feedback: error-feedback decay of the hidden layer (``Dense(feedback=...)``; 0 = none).
      adaptive: adaptive k of the hidden layer (``Dense(adaptive=...)``; None = fixed k).
      kernel_layout: the hidden layer's ``Dense(kernel_layout=...)``: ``"in_out"`` (stock
        ``kernel [in, hidden]``) or ``"out_in"`` (``kernel_t [hidden, in]``, the fast layout of
        the per-row modes). The output layer keeps the stock layout: its k is 0 by default and
        its 500 x T kernel is a small share of the step.
    """

    num_words: int
    num_tags: int
    num_label_ids: int
    num_transitions: int
    embed_dim: int = 50
    hidden: int = 500
    k: int = 0
    mode: str = "unified"
    k_output: int = 0
    activation: str = "cube"
    dropout: float = 0.0
    record: bool = False
    feedback: float = 0.0
    adaptive: meprop_jax.AdaptiveK | None = None
    kernel_layout: str = "in_out"

    @property
    def num_features(self) -> int:
        """48, or 36 without label features."""
        labels = NUM_LABEL_FEATURES if self.num_label_ids else 0
        return 2 * NUM_FEATURE_TOKENS + labels

    def tables(self) -> list[tuple[str, int, int]]:
        """``(name, rows, positions)`` of each embedding table, in feature order."""
        out = [("word_embedding", self.num_words, NUM_FEATURE_TOKENS)]
        out.append(("tag_embedding", self.num_tags, NUM_FEATURE_TOKENS))
        if self.num_label_ids:
            out.append(("label_embedding", self.num_label_ids, NUM_LABEL_FEATURES))
        return out

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[batch, num_transitions]`` of feature ids ``[batch, F]``."""
        init = nn.initializers.normal(stddev=1.0 / jnp.sqrt(self.embed_dim))
        parts, start = [], 0
        for name, rows, positions in self.tables():
            table = self.param(name, init, (rows, self.embed_dim))
            ids = features[:, start : start + positions]
            parts.append(_rows(table, ids).reshape(features.shape[0], positions * self.embed_dim))
            start += positions
        x = jnp.concatenate(parts, axis=1)
        h = meprop_jax.Dense(
            self.hidden,
            k=self.k,
            mode=self.mode,
            record=self.record,
            feedback=self.feedback,
            adaptive=self.adaptive,
            kernel_layout=self.kernel_layout,
            name="hidden",
        )(x)
        h = _activation(h, self.activation)
        if train and self.dropout > 0:
            h = inverted_dropout(h, self.dropout, self.make_rng("dropout"))
        return meprop_jax.Dense(
            self.num_transitions, k=self.k_output, mode=self.mode, name="output"
        )(h)


def hidden_kernel(params: Any) -> jax.Array:
    """The hidden layer's kernel ``[F * embed_dim, hidden]`` in either layout (the transpose
    of ``kernel_t`` for ``kernel_layout="out_in"``)."""
    hidden = params["params"]["hidden"]
    if meprop_jax.linen.TRANSPOSED_KERNEL in hidden:
        return hidden[meprop_jax.linen.TRANSPOSED_KERNEL].T
    return hidden["kernel"]


def hidden_tables(model: ParserMLP, params: Any) -> list[jax.Array]:
    """Per-position hidden contributions: one ``[positions, rows, hidden]`` array per
    embedding table, ``out[p, v] = E[v] @ W_p``."""
    p = params["params"]
    kernel = hidden_kernel(params)
    out, start = [], 0
    for name, _, positions in model.tables():
        block = kernel[start * model.embed_dim : (start + positions) * model.embed_dim]
        block = block.reshape(positions, model.embed_dim, -1)
        out.append(jnp.einsum("vd,pdh->pvh", p[name], block))
        start += positions
    return out


def fast_logits(
    model: ParserMLP, params: Any, tables: Sequence[jax.Array], features: jax.Array
) -> jax.Array:
    """The logits of :class:`ParserMLP` (evaluation mode) from :func:`hidden_tables`."""
    p = params["params"]
    h = p["hidden"]["bias"]
    start = 0
    for table in tables:
        positions, rows, width = table.shape
        # One row gather from the flattened table: much faster on CPU than a 2-D gather.
        offsets = jnp.arange(positions, dtype=features.dtype) * rows
        ids = features[:, start : start + positions] + offsets
        h = h + jnp.sum(_rows(table.reshape(positions * rows, width), ids), axis=1)
        start += positions
    if model.record:  # meSimp's mask: pruned and padding units output 0, as in the model
        h = h * params["mesimp"]["hidden"]["mask"].astype(h.dtype)
    h = _activation(h, model.activation)
    return h @ p["output"]["kernel"] + p["output"]["bias"]
