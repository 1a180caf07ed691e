"""Parsing data (oracle examples, sentence batches), the loop task and batched parsing.

Training examples are made once: the static oracle runs over every projective training tree
and each configuration becomes one row of ``features [M, F]`` int32 and ``gold [M]`` (the
oracle's transition). Trees arc-standard cannot build (non-projective, or several roots) are
skipped and counted. Evaluation and prediction parse whole sentences: sorted by length into
``[steps, batch, N + 1]`` arrays (:func:`sentence_batches`) and decoded on the device
(:func:`experiments.parsing.decoder.decode`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.files import recorded_path
from experiments.common.state_hooks import StateHooks
from experiments.corpora.treebank import Tree
from experiments.parsing import decoder
from experiments.parsing.model import ParserMLP, Vocabularies, fast_logits, hidden_tables
from experiments.parsing.transitions import Config, feature_ids, num_transitions, oracle
from meprop_jax import AdaptiveK
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "Examples",
    "ParserSettings",
    "ParsingData",
    "ParsingTask",
    "bucket_length",
    "make_examples",
    "parse",
    "sentence_batches",
]

BUCKET_STEP = 16
BUCKET_LINEAR_MAX = 64


@dataclasses.dataclass(frozen=True)
class ParserSettings:
    """The parser's own settings (validated by the command line)."""

    embed_dim: int = 50
    hidden: int = 500
    k: int = 20
    mode: str = "unified"
    k_output: int = 0
    kdim: bool = False
    activation: str = "cube"
    dropout: float = 0.0
    min_count: int = 2
    batch_size: int = 1000
    eval_batch_size: int = 64
    limit_train: int | None = None
    mesimp: bool = False
    mesimp_threshold: float = mesimp_lib.DEFAULT_THRESHOLD
    mesimp_cycle: int = mesimp_loop.DEFAULT_CYCLE
    mesimp_prunes_per_epoch: int = mesimp_loop.DEFAULT_PRUNES_PER_EPOCH
    feedback: float = 0.0
    adaptive: AdaptiveK | None = None
    kernel_layout: str = "in_out"

    def model(self, vocab: Vocabularies, hidden: int | None = None) -> ParserMLP:
        """The MLP these settings describe, sized for ``vocab``; ``hidden`` overrides the
        hidden width (meSimp's shrunk layer)."""
        return ParserMLP(
            num_words=len(vocab.words),
            num_tags=len(vocab.tags),
            num_label_ids=len(vocab.labels) + 1 if vocab.labelled else 0,
            num_transitions=num_transitions(vocab.num_labels),
            embed_dim=self.embed_dim,
            hidden=self.hidden if hidden is None else hidden,
            k=self.k,
            mode=self.mode.replace("-", "_"),
            k_output=self.k_output,
            activation=self.activation,
            dropout=self.dropout,
            record=self.mesimp,
            feedback=self.feedback,
            adaptive=self.adaptive,
            kernel_layout=self.kernel_layout,
        )

    def model_json(self) -> dict[str, Any]:
        """The fields that shape the model (stored with the vocabularies)."""
        keys = ("embed_dim", "hidden", "k", "mode", "k_output", "kdim", "activation", "dropout")
        keys += ("kernel_layout",)  # the saved parameters' names and shapes
        if self.mesimp:  # the record's collection is part of the saved variables
            keys += ("mesimp",)
        return {key: getattr(self, key) for key in keys}


# ---------------------------------------------------------------------------------------------
# Oracle examples


@dataclasses.dataclass(frozen=True)
class Examples:
    """Training examples: ``features [M, F]`` int32 and ``gold [M]`` int32 transitions, and
    the numbers of trees skipped because arc-standard cannot build them."""

    features: np.ndarray
    gold: np.ndarray
    skipped_nonprojective: int
    skipped_multiroot: int


def label_indices(tree: Tree, vocab: Vocabularies) -> list[int]:
    """Label index of every token (-1 unknown); all 0 for an unlabelled parser."""
    if not vocab.labelled:
        return [0] * len(tree)
    return [vocab.label_index(label) for label in tree.labels or ()]


def make_examples(trees: Sequence[Tree], vocab: Vocabularies) -> Examples:
    """Runs the oracle over ``trees`` and featurizes every configuration (see the module
    docstring)."""
    rows: list[np.ndarray] = []
    gold: list[int] = []
    nonprojective = multiroot = 0
    num_labels = vocab.num_labels
    for tree in trees:
        heads = tree.heads or ()
        labels = label_indices(tree, vocab)
        transitions = oracle(heads, labels, num_labels)
        if transitions is None:
            if heads.count(0) > 1:
                multiroot += 1
            else:
                nonprojective += 1
            continue
        words, tags = vocab.encode(tree)
        config = Config(len(tree))
        for t in transitions:
            rows.append(feature_ids(config, words, tags, vocab.labelled))
            gold.append(t)
            config.apply(t, num_labels)
    width = 48 if vocab.labelled else 36
    features = np.stack(rows) if rows else np.zeros((0, width), np.int32)
    return Examples(features, np.asarray(gold, np.int32), nonprojective, multiroot)


def example_batches(
    examples: Examples, batch_size: int, order: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """``{"features": [S, B, F], "gold": [S, B], "mask": [S, B]}``; the last minibatch is
    filled up with masked-out copies of example 0."""
    n = len(examples.gold)
    steps = max(1, math.ceil(n / batch_size))
    rows = np.zeros(steps * batch_size, np.int64)
    rows[:n] = np.arange(n) if order is None else order
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:n] = 1.0
    return {
        "features": examples.features[rows].reshape(steps, batch_size, -1),
        "gold": examples.gold[rows].reshape(steps, batch_size),
        "mask": mask.reshape(steps, batch_size),
    }


# ---------------------------------------------------------------------------------------------
# Sentence batches


def bucket_length(n: int) -> int:
    """Padded length of a sentence of ``n`` tokens: a multiple of 16 up to 64, then a power
    of two (few shapes, so few compilations)."""
    if n <= BUCKET_LINEAR_MAX:
        return max(BUCKET_STEP, BUCKET_STEP * math.ceil(n / BUCKET_STEP))
    return 1 << (n - 1).bit_length()


def sentence_batches(
    trees: Sequence[Tree], vocab: Vocabularies, batch_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All sentences as one group of ``[S, B, N + 1]`` minibatches, shortest first.

    One padded length ``N`` (:func:`bucket_length` of the longest sentence) for every
    minibatch, so decoding compiles once; the padding costs little because the decoding loop
    of a minibatch stops with its own longest sentence, and sorting by length keeps those
    close. Each minibatch also recomputes the hidden tables in evaluation, so fewer, larger
    minibatches are cheaper there.

    Returns:
      ``(index, group)``: ``index [S * B]`` gives each row's position in ``trees`` (-1 for a
      padding row); the group holds ``words``, ``tags``, ``heads`` (gold, 0 where unknown),
      ``labels`` (gold label index, -1 unknown), ``scored`` (1.0 for the real
      non-punctuation tokens that count in the scores), all ``[S, B, N + 1]`` over tokens
      ``0..N``, and ``lengths [S, B]``.
    """
    members = sorted(range(len(trees)), key=lambda i: len(trees[i]))
    length = bucket_length(max((len(t) for t in trees), default=1))
    steps = max(1, math.ceil(len(members) / batch_size))
    index = np.full(steps * batch_size, -1, np.int64)
    index[: len(members)] = members
    shape = (steps * batch_size, length + 1)
    arrays = {
        "words": np.zeros(shape, np.int32),
        "tags": np.zeros(shape, np.int32),
        "heads": np.zeros(shape, np.int32),
        "labels": np.full(shape, -1, np.int32),
        "scored": np.zeros(shape, np.float32),
        "lengths": np.zeros(steps * batch_size, np.int32),
    }
    for row, i in enumerate(members):
        tree = trees[i]
        n = len(tree)
        words, tags = vocab.encode(tree)
        arrays["words"][row, : n + 1] = words
        arrays["tags"][row, : n + 1] = tags
        arrays["lengths"][row] = n
        if tree.heads is not None:
            arrays["heads"][row, 1 : n + 1] = tree.heads
            arrays["scored"][row, 1 : n + 1] = [not p for p in tree.punct]
        if tree.labels is not None and vocab.labelled:
            arrays["labels"][row, 1 : n + 1] = label_indices(tree, vocab)
    return index, {k: v.reshape(steps, batch_size, *v.shape[1:]) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_batch(
    model: ParserMLP,
    params: Any,
    tables: Sequence[jax.Array],
    batch: Mapping[str, jax.Array],
    num_labels: int,
) -> decoder.State:
    """Greedy parses of one sentence batch (``[B, N + 1]`` leaves) with the fast scorer."""
    score = functools.partial(fast_logits, model, params, tables)
    labelled = model.num_label_ids > 0
    return decoder.decode(
        score, batch["words"], batch["tags"], batch["lengths"], num_labels, labelled
    )


def attachment_counts(
    state: decoder.State, batch: Mapping[str, jax.Array], labelled: bool
) -> dict[str, Any]:
    """``correct`` (UAS), ``count`` and, when ``labelled``, ``correct_las`` over the scored
    tokens."""
    scored = batch["scored"]
    head_ok = (state.head == batch["heads"]).astype(scored.dtype) * scored
    counts = {"correct": jnp.sum(head_ok), "count": jnp.sum(scored)}
    if labelled:
        label_ok = (state.label == batch["labels"]).astype(scored.dtype)
        counts["correct_las"] = jnp.sum(head_ok * label_ok)
    return counts


def parse(
    model: ParserMLP,
    params: Any,
    vocab: Vocabularies,
    trees: Sequence[Tree],
    batch_size: int = 64,
    passes: int = 1,
) -> tuple[list[list[int]], list[list[int]], float]:
    """Parses ``trees``; returns heads, label indices and the decoding seconds.

    The hidden-layer tables are computed once; every batch shape is compiled and run once
    before the timed passes, so the seconds exclude compilation and the tables. With
    ``passes > 1`` the seconds are the median pass's: one pass over a small test set takes
    about a tenth of a second, too short to time once on a shared machine.
    """
    tables = jax.jit(functools.partial(hidden_tables, model))(params)

    @jax.jit
    def run(tables: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        state = decode_batch(model, params, tables, batch, vocab.num_labels)
        return state.head, state.label

    index, group = sentence_batches(trees, vocab, batch_size)
    steps = group["lengths"].shape[0]
    rows = index.reshape(steps, -1)
    batches = [(rows[s], {k: jnp.asarray(v[s]) for k, v in group.items()}) for s in range(steps)]
    jax.block_until_ready(run(tables, batches[0][1]))  # compile, untimed
    times = []
    for _ in range(max(1, passes)):
        start = time.perf_counter()
        results = [run(tables, batch) for _, batch in batches]
        jax.block_until_ready(results)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    heads: list[list[int]] = [[] for _ in trees]
    labels: list[list[int]] = [[] for _ in trees]
    for (index, _), (head, label) in zip(batches, results, strict=True):
        head, label = np.asarray(head), np.asarray(label)
        for row, i in enumerate(index):
            if i >= 0:
                n = len(trees[i])
                heads[i] = head[row, 1 : n + 1].tolist()
                labels[i] = label[row, 1 : n + 1].tolist()
    return heads, labels, seconds


# ---------------------------------------------------------------------------------------------
# The task


@dataclasses.dataclass(frozen=True)
class ParsingData:
    """The three splits, the training vocabularies and the oracle examples."""

    train: list[Tree]
    dev: list[Tree]
    test: list[Tree]
    vocab: Vocabularies
    examples: Examples
    files: Mapping[str, Any]


@dataclasses.dataclass(eq=False)
class ParsingTask(StateHooks):
    """Transition-based parsing as a loop task: training on oracle examples, evaluation by
    greedy decoding (accuracy = UAS over non-punctuation tokens, plus ``correct_las``)."""

    data: ParsingData
    settings: ParserSettings
    name: str = "parsing"
    metric: str = "uas"

    def __post_init__(self) -> None:
        self.model = self.settings.model(self.data.vocab)
        self.eval_batches = {
            split: sentence_batches(
                getattr(self.data, split), self.data.vocab, self.settings.eval_batch_size
            )[1]
            for split in ("dev", "test")
        }

    # meSimp (see experiments.parsing.simplify): the hidden layer's record is model state.
    @property
    def mesimp(self) -> mesimp_loop.MesimpSchedule | None:
        """The meSimp hooks (the hidden layer, then the output layer), or None."""
        s = self.settings
        if not s.mesimp:
            return None
        return mesimp_loop.MesimpSchedule(("hidden", "output"), s.mesimp_threshold, s.mesimp_cycle)

    def model_for(self, params: Any) -> ParserMLP:
        """The MLP at the hidden width of ``params`` (it shrinks under meSimp)."""
        if not self.settings.mesimp:
            return self.model
        (width,) = mesimp_loop.record_widths(params[mesimp_lib.COLLECTION], ("hidden",))
        return self.model if width == self.model.hidden else self.model.clone(hidden=width)

    def init(self, key: jax.Array) -> Any:
        """Initial parameters (normal embeddings with std 1/sqrt(embed_dim), Flax-default
        dense layers; with meSimp, the record without its taps, which the loop makes)."""
        k_params, k_meprop, k_dropout = jax.random.split(key, 3)
        features = jnp.zeros((1, self.model.num_features), jnp.int32)
        rngs = {"params": k_params, "meprop": k_meprop, "dropout": k_dropout}
        variables = self.model.init(rngs, features, False)
        if self.settings.mesimp:
            variables = {k: v for k, v in variables.items() if k != mesimp_lib.TAP_COLLECTION}
        if self.settings.adaptive is not None:
            variables = feedback_flags.stats_from_init(variables)
        return variables

    def loss_fn(
        self, params: Any, batch: Mapping[str, jax.Array], key: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training: mean cross-entropy of the oracle transitions. Evaluation: greedy
        decoding; aux ``correct``/``correct_las``/``count`` are attachment counts and the loss
        is 0 (there is no oracle for a parse that went astray)."""
        model = self.model_for(params)
        if not train:
            tables = hidden_tables(model, params)
            state = decode_batch(model, params, tables, batch, self.data.vocab.num_labels)
            counts = attachment_counts(state, batch, self.data.vocab.labelled)
            return jnp.zeros((), jnp.float32), counts
        k_dropout, k_meprop = jax.random.split(key)
        logits = model.apply(
            params, batch["features"], True, rngs={"dropout": k_dropout, "meprop": k_meprop}
        )
        mask = batch["mask"]
        count = jnp.sum(mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["gold"])
        hits = (jnp.argmax(logits, axis=-1) == batch["gold"]).astype(mask.dtype)
        loss = jnp.sum(ce * mask) / jnp.maximum(count, 1.0)
        return loss, {"correct": jnp.sum(hits * mask), "count": count}

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        """One group: every oracle example, shuffled by ``key``."""
        del epoch  # the key already depends on it
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        order = rng.permutation(len(self.data.examples.gold))
        return [example_batches(self.data.examples, self.settings.batch_size, order)]

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        """One group: ``split``'s sentences, shortest first (see :func:`sentence_batches`)."""
        return [self.eval_batches[split]]

    def config(self) -> dict[str, Any]:
        """The settings, data files and sizes, and the skipped training trees."""
        d, ex = self.data, self.data.examples
        return {
            **dataclasses.asdict(self.settings),
            **d.files,
            # Relative to the data folder: a record names no machine's folders.
            **{
                f: recorded_path(d.files[f])
                for f in ("train_file", "dev_file", "test_file")
                if f in d.files  # data built in memory names no files
            },
            "labelled": d.vocab.labelled,
            "num_labels": len(d.vocab.labels),
            "num_transitions": self.model.num_transitions,
            "train_sentences": len(d.train),
            "train_examples": len(ex.gold),
            "skipped_nonprojective": ex.skipped_nonprojective,
            "skipped_multiroot": ex.skipped_multiroot,
            "dev_sentences": len(d.dev),
            "test_sentences": len(d.test),
            "word_vocab": len(d.vocab.words),
            "tag_vocab": len(d.vocab.tags),
        }
