"""POS tagging with a meProp LSTM, trained by the shared loop (``python -m experiments.tagging``).

The model is the paper's POS tagger: every token is a 50-dimensional word embedding plus seven
20-dimensional feature embeddings (190 inputs), fed to a one-layer LSTM of ``--hidden`` 500
units (``meprop_jax.LSTMCell``: the gate pre-activation gradient keeps ``--k`` entries per gate
at every time step) and a dense softmax output layer over the tags (never sparsified, as in the
paper). ``--bidirectional`` adds a second LSTM reading the sentence right to left; the two
outputs are concatenated. Optional inverted dropout (``--dropout``) acts on the 190 inputs and
on the LSTM outputs.

Vocabularies (all built from the training sentences, saved in ``<out>/vocab.json``):

* words: lowercased, every digit replaced by ``0``; forms seen fewer than ``--min-count``
  (default 2) times map to ``<unk>``, in training too, so the ``<unk>`` embedding is learned;
* the seven features (:data:`FEATURES`), each value with its own ``<unk>`` under the same
  ``--min-count`` rule. The default set, :data:`DEFAULT_FEATURES`:

  - ``caps``: capitalisation pattern of the raw word: ``lower``, ``init`` (first letter
    upper case, no other), ``upper`` (two or more letters, all upper case), ``mixed``, or
    ``none`` (no letters);
  - ``digit``: ``none`` (no digit), ``number`` (only digits and ``, . - / :``), or ``some``;
  - ``hyphen``: whether the word contains ``-``;
  - ``prefix2``, ``suffix2``, ``suffix3``: first two, last two and last three characters of
    the normalised word;
  - ``next``: the normalised *next* word (``</s>`` at the end), thresholded like the words.

  The paper does not list its seven features. The last one is our choice: the one-way LSTM
  sees only the words to the left, and English tags often hinge on the next word ("that
  the" vs "that is", "fined by" vs "was fined"). ``--features caps,digit,hyphen,prefix2,
  suffix2,suffix3,length`` gives a purely word-internal set (``length``: the word length,
  1-7, ``8-9``, ``10+``).
* tags: the training tags. A dev or test token whose tag never occurs in training can never
  be predicted: it counts as an error (and adds nothing to the loss).

Batching: sentences are grouped by length into buckets (bucket length = the length rounded up
to a multiple of 8 up to 64, then to a power of two: 8, 16, ..., 64, 128, 256, ...), padded to
the bucket length and cut into minibatches of ``--batch-size`` sentences; the last minibatch
of a bucket is filled up with empty sentences. Each bucket is one batch group of the shared
loop (``experiments.train``), which interleaves their chunks in a random order; sentences are
shuffled within their bucket every epoch, deterministically from (``--seed``, epoch). Padded
positions carry mask 0: they are left out of the loss and the accuracy, and the LSTMs get the
true lengths (``seq_lengths``), so the backward LSTM starts at each sentence's last word and
padding changes no prediction.

Defaults: Adam, lr 1e-3 (AdaGrad: 0.01, the paper's POS value); minibatches of 8 sentences
(the paper used 1); meProp unified top-k with k = 10 per gate (2% of the 500 units; the paper
used k = 5 with per-example selection); no dropout (the paper's Table 1); 15 epochs, the
best-dev epoch reported; timing probes over 20 minibatches per epoch. ``--k 0`` is ordinary
backprop. Why 8 sentences: after one epoch of CoNLL-2000 (two CPU cores, default features),
minibatches of 32 reach 95.0% dev with ordinary backprop and 89.9% with k = 10 in 14-18 s of
training; minibatches of 8 reach 96.5% and 96.1% in about 50 s. meProp, whose updates are
sparse, needs the extra updates most. A default run of 15 epochs takes about 15 minutes on
CoNLL-2000 (about 55 s an epoch with evaluation and probes, plus about 80 s of compilation).

Corpora (``--corpus``, files under ``--data-dir`` or ``$MEPROP_DATA_DIR``):

* ``conll2000`` (the default when no ``--train-file`` is given): ``conll2000/train.txt.gz``
  and ``conll2000/test.txt.gz``; it has no dev file, so the last 10% of the training
  sentences are held out as dev (:func:`experiments.conll.split_dev`);
* ``ptb-dep-sample``: ``ptb-dep-sample/{train,dev,test}.conllx.gz`` (gold POSTAG column).

``--train-file``/``--dev-file``/``--test-file`` name files directly (any format of
:mod:`experiments.conll`) and override the corpus's. ``--predict FILE --out RUN`` tags
``FILE`` with the parameters saved in the run folder ``RUN`` (the best-dev epoch if its
checkpoint is still kept, otherwise the latest) and writes it in its own format.

Examples:
  MEPROP_DATA_DIR=../shared/data python -m experiments.tagging --epochs 1 --limit-train 500
  python -m experiments.tagging --corpus ptb-dep-sample --k 0        # ordinary backprop
  python -m experiments.tagging --predict test.txt --out runs/tag-conll2000-k10-unified-...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import meprop_jax
from experiments import loop
from experiments.common import ENV_VAR, inverted_dropout
from experiments.corpora.conll import (
    FORMATS,
    TAG_COLUMNS,
    DataError,
    Sentence,
    detect_format,
    read_tagged,
    split_dev,
    write_tagged,
)

__all__ = [
    "CORPORA",
    "DEFAULT_EPOCHS",
    "DEFAULT_FEATURES",
    "FEATURES",
    "VOCAB_FILE",
    "Bucket",
    "Encoded",
    "Tagger",
    "TaggerSettings",
    "TaggingData",
    "TaggingTask",
    "Vocab",
    "Vocabularies",
    "batch_arrays",
    "bucket_length",
    "bucketize",
    "caps_pattern",
    "digit_class",
    "extract_features",
    "main",
    "normalize_word",
    "predict_tags",
]

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
END = "</s>"
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT_VERSION = 1
DEFAULT_EPOCHS = 15
DEFAULT_TIMING_BATCHES = 20
DEFAULT_BATCH = 8
DEFAULT_EVAL_BATCH = 64
DEFAULT_K = 10
BUCKET_STEP = 8  # bucket lengths: multiples of 8 up to 64, then powers of two
BUCKET_LINEAR_MAX = 64
ADAGRAD_LR = 0.01  # the paper's AdaGrad learning rate for POS tagging
_NUMBER_CHARS = frozenset("0123456789,.-/:")


# ---------------------------------------------------------------------------------------------
# Word normalisation and features


def normalize_word(word: str) -> str:
    """Lowercase with every decimal digit replaced by ``0`` (``"1,234"`` -> ``"0,000"``)."""
    return "".join("0" if ch.isdigit() else ch for ch in word.lower())


def caps_pattern(word: str) -> str:
    """``lower``, ``init``, ``upper``, ``mixed`` or ``none`` (see the module docstring)."""
    letters = [ch for ch in word if ch.isalpha()]
    if not any(ch.isupper() or ch.islower() for ch in letters):
        return "none"  # no letters at all, or only uncased ones
    uppers = [ch.isupper() for ch in letters]
    if not any(uppers):
        return "lower"
    if all(uppers) and len(letters) >= 2:
        return "upper"
    if uppers[0] and not any(uppers[1:]):
        return "init"
    return "mixed"


def digit_class(word: str) -> str:
    """``none`` (no digit), ``number`` (digits and ``, . - / :`` only) or ``some``."""
    if not any(ch.isdigit() for ch in word):
        return "none"
    return "number" if all(ch.isdigit() or ch in _NUMBER_CHARS for ch in word) else "some"


def _length_bucket(word: str) -> str:
    n = len(word)
    return str(n) if n <= 7 else ("8-9" if n <= 9 else "10+")


def _next_word(words: Sequence[str], i: int) -> str:
    return normalize_word(words[i + 1]) if i + 1 < len(words) else END


#: Feature extractors: name -> f(words, i) giving the feature value of token i.
FEATURES: Mapping[str, Callable[[Sequence[str], int], str]] = {
    "caps": lambda words, i: caps_pattern(words[i]),
    "digit": lambda words, i: digit_class(words[i]),
    "hyphen": lambda words, i: "yes" if "-" in words[i] else "no",
    "prefix2": lambda words, i: normalize_word(words[i])[:2],
    "suffix2": lambda words, i: normalize_word(words[i])[-2:],
    "suffix3": lambda words, i: normalize_word(words[i])[-3:],
    "length": lambda words, i: _length_bucket(words[i]),
    "next": _next_word,
}
DEFAULT_FEATURES: tuple[str, ...] = (
    "caps",
    "digit",
    "hyphen",
    "prefix2",
    "suffix2",
    "suffix3",
    "next",
)


def extract_features(words: Sequence[str], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The feature values of every token: one tuple (in the order of ``names``) per word."""
    extractors = [FEATURES[name] for name in names]
    return [tuple(f(words, i) for f in extractors) for i in range(len(words))]


# ---------------------------------------------------------------------------------------------
# Vocabularies


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Strings <-> ids. Id 0 is padding and id 1 ``<unk>`` unless ``specials`` is False.

    Attributes:
      items: the strings, in id order.
      specials: whether ``items`` starts with ``<pad>`` and ``<unk>``.
    """

    items: tuple[str, ...]
    specials: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.items)})

    @classmethod
    def build(cls, counts: Counter[str], min_count: int) -> Vocab:
        """``<pad>``, ``<unk>``, then the strings seen ``min_count`` times or more (most
        frequent first, ties alphabetically)."""
        kept = sorted(
            (s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s)
        )
        return cls((PAD, UNK, *kept))

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: str) -> bool:
        return item in self._index  # type: ignore[attr-defined]

    def id(self, item: str) -> int:
        """The id of ``item``: ``<unk>``'s when unknown, or -1 without specials."""
        return self._index.get(item, UNK_ID if self.specials else -1)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class Vocabularies:
    """Everything needed to turn sentences into ids and ids into tags."""

    words: Vocab
    features: tuple[Vocab, ...]
    feature_names: tuple[str, ...]
    tags: Vocab
    min_count: int

    @classmethod
    def build(
        cls, sentences: Sequence[Sentence], feature_names: Sequence[str], min_count: int
    ) -> Vocabularies:
        """Vocabularies of the training ``sentences``."""
        words: Counter[str] = Counter()
        features: list[Counter[str]] = [Counter() for _ in feature_names]
        tags: Counter[str] = Counter()
        for sentence in sentences:
            words.update(normalize_word(w) for w in sentence.words)
            tags.update(sentence.tags)
            for values in extract_features(sentence.words, feature_names):
                for counter, value in zip(features, values, strict=True):
                    counter[value] += 1
        return cls(
            words=Vocab.build(words, min_count),
            features=tuple(Vocab.build(c, min_count) for c in features),
            feature_names=tuple(feature_names),
            tags=Vocab(tuple(sorted(tags)), specials=False),
            min_count=min_count,
        )

    def encode(self, sentence: Sentence) -> Encoded:
        """Ids of one sentence; a tag unknown to the vocabulary gets id -1."""
        n = len(sentence.words)
        feats = np.zeros((n, len(self.feature_names)), np.int32)
        for i, values in enumerate(extract_features(sentence.words, self.feature_names)):
            feats[i] = [v.id(x) for v, x in zip(self.features, values, strict=True)]
        return Encoded(
            words=np.array([self.words.id(normalize_word(w)) for w in sentence.words], np.int32),
            features=feats,
            tags=np.array([self.tags.id(t) for t in sentence.tags], np.int32),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable copy (see :meth:`from_json`)."""
        return {
            "format_version": VOCAB_FORMAT_VERSION,
            "min_count": self.min_count,
            "words": list(self.words.items),
            "features": {
                name: list(v.items)
                for name, v in zip(self.feature_names, self.features, strict=True)
            },
            "tags": list(self.tags.items),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocabularies:
        """The inverse of :meth:`to_json`."""
        if data.get("format_version") != VOCAB_FORMAT_VERSION:
            raise ValueError(f"unsupported vocabulary format {data.get('format_version')!r}")
        names = tuple(data["features"])
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features {unknown} in the vocabulary file")
        return cls(
            words=Vocab(tuple(data["words"])),
            features=tuple(Vocab(tuple(data["features"][n])) for n in names),
            feature_names=names,
            tags=Vocab(tuple(data["tags"]), specials=False),
            min_count=int(data["min_count"]),
        )


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sentence as ids: ``words [n]``, ``features [n, F]``, ``tags [n]`` (int32)."""

    words: np.ndarray
    features: np.ndarray
    tags: np.ndarray


# ---------------------------------------------------------------------------------------------
# Buckets and minibatches


def bucket_length(n: int) -> int:
    """The padded length of a sentence of ``n`` tokens: ``n`` rounded up to a multiple of 8
    up to 64, beyond that to a power of two."""
    if n <= BUCKET_LINEAR_MAX:
        return max(BUCKET_STEP, BUCKET_STEP * math.ceil(n / BUCKET_STEP))
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Sentences of one bucket, padded to ``length``, plus one empty sentence at the end.

    Attributes:
      length: the bucket (padded) length.
      index: positions of the sentences in the list they came from, ``[n]``.
      words, features, tags: ``[n + 1, length]`` (features ``[n + 1, length, F]``); row ``n``
        is the empty sentence used to fill up the last minibatch.
      lengths: ``[n + 1]`` true lengths (0 for the empty sentence).
    """

    length: int
    index: np.ndarray
    words: np.ndarray
    features: np.ndarray
    tags: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def bucketize(sentences: Sequence[Encoded], num_features: int) -> list[Bucket]:
    """Groups encoded sentences into buckets, shortest bucket first, file order within."""
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sentences):
        by_length.setdefault(bucket_length(len(s.words)), []).append(i)
    buckets = []
    for length in sorted(by_length):
        index = np.array(by_length[length], np.int64)
        n = len(index)
        words = np.zeros((n + 1, length), np.int32)
        features = np.zeros((n + 1, length, num_features), np.int32)
        tags = np.zeros((n + 1, length), np.int32)
        lengths = np.zeros(n + 1, np.int32)
        for row, i in enumerate(index):
            s = sentences[i]
            m = len(s.words)
            words[row, :m] = s.words
            features[row, :m] = s.features
            tags[row, :m] = s.tags
            lengths[row] = m
        buckets.append(Bucket(length, index, words, features, tags, lengths))
    return buckets


def batch_arrays(bucket: Bucket, batch_size: int, order: np.ndarray | None = None) -> dict:
    """The bucket's sentences (in ``order``, a permutation of ``range(len(bucket))``) as
    ``[steps, batch_size, ...]`` minibatches, the last one filled up with empty sentences.

    Returns:
      ``{"words", "tags": [S, B, L] int32, "features": [S, B, L, F] int32,
      "lengths": [S, B] int32, "mask": [S, B, L] float32}``.
    """
    n = len(bucket)
    steps = max(1, math.ceil(n / batch_size))
    rows = np.full(steps * batch_size, n, np.int64)  # row n: the empty sentence
    rows[:n] = np.arange(n) if order is None else order
    lengths = bucket.lengths[rows]
    mask = (np.arange(bucket.length)[None, :] < lengths[:, None]).astype(np.float32)

    def shape(a: np.ndarray) -> np.ndarray:
        return a.reshape(steps, batch_size, *a.shape[1:])

    return {
        "words": shape(bucket.words[rows]),
        "features": shape(bucket.features[rows]),
        "tags": shape(bucket.tags[rows]),
        "lengths": shape(lengths),
        "mask": shape(mask),
    }


# ---------------------------------------------------------------------------------------------
# Model


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


def _zero_carry(x: jax.Array, hidden: int) -> tuple[jax.Array, jax.Array]:
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

    def _rnn(self, reverse: bool, name: str) -> nn.RNN:
        # The cell, created here, belongs to the tagger: its parameters sit under ``name``.
        cell = meprop_jax.LSTMCell(self.hidden, k=self.k, mode=self.mode, name=name)
        split = {"params": False, "meprop": True}  # a fresh random-k key at every step
        return nn.RNN(cell, reverse=reverse, keep_order=True, split_rngs=split)

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
        embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        table = self.param("word_embedding", embed_init, (self.vocab_size, self.word_dim))
        parts = [_lookup(table, words)]
        for j, size in enumerate(self.feature_sizes):
            table = self.param(f"feature_embedding_{j}", embed_init, (size, self.feature_dim))
            parts.append(_lookup(table, features[..., j]))
        x = jnp.concatenate(parts, axis=-1)
        if train and self.dropout > 0:
            x = inverted_dropout(x, self.dropout, self.make_rng("dropout"))
        carry = _zero_carry(x, self.hidden)
        h = self._rnn(False, "lstm")(x, initial_carry=carry, seq_lengths=lengths)
        if self.bidirectional:
            # nn.Bidirectional gathers the final carries, which explicit mesh axes reject;
            # a reversed nn.RNN with keep_order is its backward half.
            back = self._rnn(True, "lstm_backward")(x, initial_carry=carry, seq_lengths=lengths)
            h = jnp.concatenate([h, back], axis=-1)
        if train and self.dropout > 0:
            h = inverted_dropout(h, self.dropout, self.make_rng("dropout"))
        return meprop_jax.Dense(self.num_tags, name="output")(h)


# ---------------------------------------------------------------------------------------------
# Settings, data and the task


@dataclasses.dataclass(frozen=True)
class TaggerSettings:
    """The tagger's own settings (validated; see :func:`settings_from_args`)."""

    hidden: int = 500
    k: int = DEFAULT_K
    mode: str = "unified"
    dropout: float = 0.0
    bidirectional: bool = False
    word_dim: int = 50
    feature_dim: int = 20
    features: tuple[str, ...] = DEFAULT_FEATURES
    min_count: int = 2
    batch_size: int = DEFAULT_BATCH
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    limit_train: int | None = None

    def model(self, vocab: Vocabularies) -> Tagger:
        """The tagger these settings describe, sized for ``vocab``."""
        return Tagger(
            vocab_size=len(vocab.words),
            feature_sizes=tuple(len(v) for v in vocab.features),
            num_tags=len(vocab.tags),
            hidden=self.hidden,
            k=self.k,
            mode=self.mode.replace("-", "_"),
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            word_dim=self.word_dim,
            feature_dim=self.feature_dim,
        )

    def model_json(self) -> dict[str, Any]:
        """The fields that shape the model (stored with the vocabularies)."""
        d = dataclasses.asdict(self)
        return {
            k: d[k]
            for k in ("hidden", "k", "mode", "dropout", "bidirectional", "word_dim", "feature_dim")
        }


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """Where the three splits come from; ``dev`` None: hold out 10% of train."""

    train: Path
    dev: Path | None
    test: Path
    format: str = "auto"
    tag_column: str = "xpos"
    corpus: str | None = None


@dataclasses.dataclass(frozen=True)
class TaggingData:
    """The three splits, read, and the training vocabularies."""

    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence]
    vocab: Vocabularies
    files: DataFiles


def load_data(files: DataFiles, settings: TaggerSettings) -> TaggingData:
    """Reads the splits (dev held out from train when there is no dev file), applies
    ``limit_train`` and builds the vocabularies from the training sentences."""
    train = read_tagged(files.train, files.format, files.tag_column)
    if files.dev is None:
        if len(train) < 2:
            raise DataError(f"{files.train}: need at least 2 sentences to hold out a dev set")
        train, dev = split_dev(train, 0.1)
    else:
        dev = read_tagged(files.dev, files.format, files.tag_column)
    test = read_tagged(files.test, files.format, files.tag_column)
    if settings.limit_train is not None:
        train = train[: settings.limit_train]
    vocab = Vocabularies.build(train, settings.features, settings.min_count)
    return TaggingData(train, dev, test, vocab, files)


@dataclasses.dataclass(eq=False)
class TaggingTask:
    """POS tagging as a :class:`experiments.train.Task`: one batch group per length bucket."""

    data: TaggingData
    settings: TaggerSettings
    name: str = "tagging"

    def __post_init__(self) -> None:
        vocab, n_feat = self.data.vocab, len(self.settings.features)
        self.model = self.settings.model(vocab)
        self.buckets = {
            split: bucketize([vocab.encode(s) for s in sentences], n_feat)
            for split, sentences in (
                ("train", self.data.train),
                ("dev", self.data.dev),
                ("test", self.data.test),
            )
        }

    def init(self, key: jax.Array) -> Any:
        """Flax-default initial parameters."""
        return init_params(self.model, key)

    def loss_fn(
        self, params: Any, batch: Mapping[str, jax.Array], key: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean token cross-entropy over the real tokens; correct and count as aux."""
        k_dropout, k_meprop = jax.random.split(key)
        logits = self.model.apply(
            params,
            batch["words"],
            batch["features"],
            batch["lengths"],
            train,
            rngs={"dropout": k_dropout, "meprop": k_meprop},
        )
        return token_loss(logits, batch["tags"], batch["mask"])

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        """One group per bucket, its sentences shuffled by ``key`` (seed and epoch)."""
        del epoch  # the key already depends on it
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        return [
            batch_arrays(b, self.settings.batch_size, rng.permutation(len(b)))
            for b in self.buckets["train"]
        ]

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        """One group per bucket of ``split``, in file order."""
        return [batch_arrays(b, self.settings.eval_batch_size) for b in self.buckets[split]]

    def config(self) -> dict[str, Any]:
        """The settings plus the data files and sizes."""
        d, f = self.data, self.data.files
        settings = dataclasses.asdict(self.settings)
        settings["features"] = list(self.settings.features)
        return {
            **settings,
            "corpus": f.corpus,
            "train_file": str(f.train),
            "dev_file": None if f.dev is None else str(f.dev),
            "test_file": str(f.test),
            "format": f.format,
            "tag_column": f.tag_column,
            "train_sentences": len(d.train),
            "train_tokens": sum(len(s.words) for s in d.train),
            "dev_sentences": len(d.dev),
            "test_sentences": len(d.test),
            "word_vocab": len(d.vocab.words),
            "num_tags": len(d.vocab.tags),
        }

    def save_vocab(self, out: Path) -> Path:
        """Writes ``out/vocab.json``: the vocabularies and the model settings."""
        out.mkdir(parents=True, exist_ok=True)
        payload = {**self.data.vocab.to_json(), "model": self.settings.model_json()}
        path = out / VOCAB_FILE
        path.write_text(json.dumps(payload) + "\n")
        return path


def init_params(model: Tagger, key: jax.Array) -> Any:
    """Initial parameters of ``model`` (Flax defaults; shapes do not depend on the input)."""
    k_params, k_meprop, k_dropout = jax.random.split(key, 3)
    words = jnp.zeros((1, BUCKET_STEP), jnp.int32)
    features = jnp.zeros((1, BUCKET_STEP, len(model.feature_sizes)), jnp.int32)
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


# ---------------------------------------------------------------------------------------------
# Prediction


def predict_tags(
    model: Tagger, params: Any, sentences: Sequence[Encoded], batch_size: int = DEFAULT_EVAL_BATCH
) -> list[np.ndarray]:
    """The predicted tag ids of every sentence, in order (bucketed and batched inside)."""
    n_feat = len(model.feature_sizes)
    apply = jax.jit(lambda p, w, f, n: jnp.argmax(model.apply(p, w, f, n, False), axis=-1))
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(sentences)
    for bucket in bucketize(sentences, n_feat):
        arrays = batch_arrays(bucket, batch_size)
        preds = np.concatenate(
            [
                np.asarray(apply(params, w, f, n))
                for w, f, n in zip(
                    arrays["words"], arrays["features"], arrays["lengths"], strict=True
                )
            ]
        )
        for row, i in enumerate(bucket.index):
            out[i] = preds[row, : len(sentences[i].words)].astype(np.int32)
    return out


def load_run(run: Path) -> tuple[Vocabularies, TaggerSettings, Any, int]:
    """The vocabularies, model settings and parameters saved in a run folder.

    Takes the best-dev epoch's parameters if that checkpoint is still kept, otherwise the
    latest checkpoint's.

    Returns:
      ``(vocab, settings, params, epoch)``.

    Raises:
      loop.ConfigError: no vocabulary file or no checkpoint in ``run``.
    """
    vocab_path = run / VOCAB_FILE
    if not vocab_path.is_file():
        raise loop.ConfigError(f"--out {run}: no {VOCAB_FILE} there (not a tagging run folder?)")
    try:
        data = json.loads(vocab_path.read_text())
        vocab = Vocabularies.from_json(data)
        settings = TaggerSettings(**data["model"], features=vocab.feature_names)
    except (ValueError, KeyError, TypeError) as exc:
        raise loop.ConfigError(f"--out {run}: unreadable {VOCAB_FILE}: {exc}") from exc
    # Shapes only: compiling the initialisers would cost more than the whole prediction.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(functools.partial(init_params, settings.model(vocab)), jax.random.key(0)),
    )
    best = None
    results = run / loop.RESULTS_FILE
    if results.is_file():
        best = (json.loads(results.read_text()).get("best") or {}).get("epoch")
    params, epoch = loop.restore_params(run, template, epoch=best)
    return vocab, settings, params, epoch


def predict_file(
    run: Path, path: Path, output: Path, fmt: str = "auto", tag_column: str = "xpos"
) -> tuple[int, int, float, int]:
    """Tags ``path`` with the run's model and writes ``output`` in the same format.

    The input must be readable by :func:`experiments.conll.read_tagged`, i.e. carry some tag
    in its tag column; those tags are replaced.

    Returns:
      ``(sentences, tokens, accuracy, epoch)``: accuracy (%) against the file's own tags, and
      the epoch whose parameters were used.
    """
    vocab, settings, params, epoch = load_run(run)
    sentences = read_tagged(path, fmt, tag_column)
    fmt = detect_format(path) if fmt == "auto" else fmt
    model = settings.model(vocab)
    encoded = [vocab.encode(s) for s in sentences]
    preds = predict_tags(model, params, encoded)
    tags = [[vocab.tags.items[int(t)] for t in p] for p in preds]
    write_tagged(output, sentences, tags, fmt, tag_column)
    tokens = sum(len(s.words) for s in sentences)
    correct = sum(
        sum(a == b for a, b in zip(s.tags, t, strict=True))
        for s, t in zip(sentences, tags, strict=True)
    )
    return len(sentences), tokens, 100.0 * correct / max(tokens, 1), epoch


# ---------------------------------------------------------------------------------------------
# Command line

#: ``--corpus`` name -> (folder, train, dev or None, test).
CORPORA: Mapping[str, tuple[str, str, str | None, str]] = {
    "conll2000": ("conll2000", "train.txt.gz", None, "test.txt.gz"),
    "ptb-dep-sample": ("ptb-dep-sample", "train.conllx.gz", "dev.conllx.gz", "test.conllx.gz"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments.tagging`` flags."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tagging",
        description="Train the paper's LSTM POS tagger with meProp, or tag a file with a "
        "trained one (--predict).",
    )
    m = parser.add_argument_group("model")
    m.add_argument("--hidden", type=int, default=500, help="LSTM units per direction (default 500)")
    m.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"meProp k per LSTM gate (default {DEFAULT_K}); 0 = ordinary backprop",
    )
    loop.add_mode_argument(m)
    m.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout rate on the LSTM input and output (default 0, as the paper's Table 1)",
    )
    m.add_argument(
        "--bidirectional", action="store_true", help="add a right-to-left LSTM (default: off)"
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
    d = parser.add_argument_group("data")
    d.add_argument(
        "--corpus",
        choices=tuple(CORPORA),
        default=None,
        help="read the corpus's files under --data-dir (default conll2000 unless --train-file "
        "is given)",
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
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"sentences per training minibatch, all devices (default {DEFAULT_BATCH}; "
        "the paper used 1)",
    )
    d.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"sentences per evaluation minibatch (default {DEFAULT_EVAL_BATCH}, rounded up "
        "to a multiple of the device count)",
    )
    d.add_argument(
        "--limit-train", type=int, default=None, help="use the first N training sentences"
    )
    p = parser.add_argument_group("prediction")
    p.add_argument(
        "--predict",
        type=Path,
        default=None,
        metavar="FILE",
        help="tag FILE with the model saved in the run folder --out, write it, and exit",
    )
    p.add_argument(
        "--predict-output",
        type=Path,
        default=None,
        metavar="PATH",
        help="where --predict writes (default <out>/predicted-<FILE name>)",
    )
    loop.add_train_arguments(parser)
    parser.set_defaults(epochs=DEFAULT_EPOCHS, timing_batches=DEFAULT_TIMING_BATCHES)
    # The loop's help texts name its own defaults; say where the tagger's differ.
    helps = {
        "timing_batches": "minibatches per forward/backward/update timing probe after each "
        f"epoch; 0 disables (default {DEFAULT_TIMING_BATCHES})",
        "lr": f"learning rate (default: adam 1e-3, adagrad {ADAGRAD_LR} as in the paper's POS "
        "runs, sgd 0.1)",
    }
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
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


def settings_from_args(args: argparse.Namespace, devices: int) -> TaggerSettings:
    """Validates the tagger's flags; ``devices`` is the resolved device count.

    Raises:
      ConfigError: naming the offending flag(s).
    """
    check = loop.require
    check(args.hidden >= 1, f"--hidden must be >= 1, got {args.hidden}")
    check(args.k >= 0, f"--k must be >= 0 (0 = ordinary backprop), got {args.k}")
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
    loop.check_divisible(args.batch_size, devices, "--batch-size")
    eval_batch = loop.resolve_eval_batch(args.eval_batch_size, DEFAULT_EVAL_BATCH, devices)
    return TaggerSettings(
        hidden=args.hidden,
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


def default_out(s: TaggerSettings, files: DataFiles, args: argparse.Namespace) -> Path:
    """``runs/tag-<corpus>-<config>``: the same flags give the same folder, for ``--resume``."""
    data = files.corpus or files.train.name.split(".")[0]
    parts = ["dense"] if s.k == 0 else [f"k{s.k}", s.mode]
    parts += [f"h{s.hidden}", args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    if s.bidirectional:
        parts.append("bi")
    if args.lr is not None:
        parts.append(f"lr{args.lr:g}")
    if args.clip > 0:
        parts.append(f"clip{args.clip:g}")
    if s.dropout:
        parts.append(f"drop{s.dropout:g}")
    if s.features != DEFAULT_FEATURES:
        parts.append("feats-" + "+".join(s.features))
    if s.limit_train is not None:
        parts.append(f"n{s.limit_train}")
    return Path("runs") / "-".join(["tag", data, *parts])


def _predict_main(args: argparse.Namespace) -> int:
    loop.require(args.out is not None, "--predict needs --out: the folder of a trained run")
    _existing(args.predict, "--predict")
    output = args.predict_output or args.out / f"predicted-{args.predict.name}"
    sentences, tokens, acc, epoch = predict_file(
        args.out, args.predict, output, args.format, args.tag_column
    )
    print(f"tagged {sentences} sentences ({tokens} tokens) with epoch {epoch} -> {output}")
    print(f"agreement with the tags in {args.predict}: {acc:.2f}%")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment (or ``--predict``); returns the exit code.

    Bad flags and missing files end the program with exit code 2 before any training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.predict is not None:
            return _predict_main(args)
        devices = loop.resolve_devices(args.devices)
        settings = settings_from_args(args, devices)
        files = resolve_files(args)
        out = default_out(settings, files, args)
        if args.lr is None and args.optimizer == "adagrad":
            args.lr = ADAGRAD_LR
        cfg = loop.train_config_from_args(args, out)

        def make_task() -> TaggingTask:
            task = TaggingTask(load_data(files, settings), settings)
            task.save_vocab(cfg.out)
            return task

        return loop.run_cli(make_task, cfg, "experiments.tagging", argv)
    except loop.ConfigError as exc:
        parser.error(str(exc))
    except DataError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 2  # not reached: parser.error and parser.exit raise SystemExit
