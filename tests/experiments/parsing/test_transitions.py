"""Tests for the oracle, the two featurizers and the batched decoder of experiments.parsing."""

import functools
import os
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.corpora.treebank import is_projective, read_treebank
from experiments.parsing import decoder
from experiments.parsing.transitions import (
    SHIFT,
    Config,
    feature_ids,
    feature_tokens,
    legal_mask,
    num_transitions,
    oracle,
    parse_reference,
)

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")


def replay(transitions, n, num_labels):
    config = Config(n)
    for t in transitions:
        assert legal_mask(config, num_labels)[t]
        config.apply(t, num_labels)
    assert config.done
    return config


def random_tree(rng: random.Random, n: int) -> list[int]:
    """Heads of a random single-rooted tree (projective or not)."""
    order = list(range(1, n + 1))
    rng.shuffle(order)
    heads = [0] * n
    for i, token in enumerate(order[1:], start=1):
        heads[token - 1] = rng.choice(order[:i])
    return heads


def random_projective_tree(rng: random.Random, n: int) -> list[int]:
    """Heads of a random single-rooted projective tree: every subtree spans an interval, cut
    at random into its head and the intervals of its children's subtrees. (Drawing random
    trees until one is projective took 757,550 draws for 12 trees of 1-14 words: 24 s.)"""
    heads = [0] * n

    def subtree(lo: int, hi: int, parent: int) -> None:
        head = rng.randint(lo, hi)
        heads[head - 1] = parent
        for start, stop in ((lo, head - 1), (head + 1, hi)):
            while start <= stop:
                end = rng.randint(start, stop)
                subtree(start, end, head)
                start = end + 1

    subtree(1, n, 0)
    return heads


# ---------------------------------------------------------------------------------------------
# Oracle


@pytest.mark.parametrize(
    "heads", [(2, 3, 0, 3), (0,), (0, 1, 1), (2, 0, 4, 2, 2), (2, 8, 2, 5, 6, 2, 2, 0, 8, 11, 9)]
)
def test_oracle_rebuilds_projective_trees(heads):
    labels = [i % 3 for i in range(len(heads))]
    transitions = oracle(heads, labels, 3)
    assert transitions is not None and len(transitions) == 2 * len(heads)
    config = replay(transitions, len(heads), 3)
    assert config.head[1:] == list(heads) and config.label[1:] == labels


@pytest.mark.parametrize("heads", [(3, 4, 0, 3), (0, 4, 1, 1), (0, 0), (2, 0, 0)])
def test_oracle_rejects_nonprojective_and_multiroot_trees(heads):
    assert oracle(heads, [0] * len(heads), 1) is None


def test_oracle_succeeds_exactly_on_projective_trees():
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(300):
        heads = random_tree(rng, rng.randint(1, 9))
        transitions = oracle(heads, [0] * len(heads), 1)
        assert (transitions is not None) == is_projective(heads)
        seen[transitions is not None] += 1
        if transitions is not None:
            assert replay(transitions, len(heads), 1).head[1:] == heads
    assert min(seen.values()) > 30  # both kinds were tried


@pytest.mark.data
@pytest.mark.skipif(REAL_DATA_DIR is None, reason="MEPROP_DATA_DIR is not set")
def test_oracle_on_the_real_sample():
    trees = read_treebank(Path(REAL_DATA_DIR) / "ptb-dep-sample" / "train.conllx.gz")
    built = 0
    for tree in trees:
        transitions = oracle(tree.heads, [0] * len(tree), 1)
        assert (transitions is not None) == (is_projective(tree.heads) and tree.heads.count(0) == 1)
        if transitions is not None:
            assert replay(transitions, len(tree), 1).head[1:] == list(tree.heads)
            built += 1
    assert built == len(trees) == 3396  # the sample is projective


# ---------------------------------------------------------------------------------------------
# Featurizers

# Labelled, L = 3: LEFT-ARC(l) = 1 + l, RIGHT-ARC(l) = 4 + l.
_HAND_TRANSITIONS = [SHIFT, SHIFT, SHIFT, 1, 3, SHIFT, SHIFT, 5, 4, SHIFT]


def hand_config() -> Config:
    """Tokens 1..6: 3 -> 2 (label 0), 3 -> 1 (2), 4 -> 5 (1), 3 -> 4 (0); stack [0, 3, 6]."""
    config = Config(6)
    for t in _HAND_TRANSITIONS:
        config.apply(t, 3)
    return config


def test_hand_worked_configuration():
    config = hand_config()
    assert config.stack == [0, 3, 6] and config.next == 7
    assert feature_tokens(config) == [
        6, 3, 0, -1, -1, -1,  # s1 s2 s3 b1 b2 b3
        -1, -1, -1, -1,  # lc1 rc1 lc2 rc2 of s1
        1, 4, 2, -1,  # lc1 rc1 lc2 rc2 of s2
        -1, -1, -1, 5,  # lc1(lc1(s1)) rc1(rc1(s1)) lc1(lc1(s2)) rc1(rc1(s2))
    ]  # fmt: skip
    words = [2, 10, 11, 12, 13, 14, 15]  # token 0 is ROOT (id 2)
    tags = [2, 20, 21, 22, 23, 24, 25]
    ids = feature_ids(config, words, tags, labelled=True)
    assert ids[:6].tolist() == [15, 12, 2, 0, 0, 0]
    assert ids[18:24].tolist() == [25, 22, 2, 0, 0, 0]
    assert ids[28:36].tolist() == [20, 23, 21, 0, 0, 0, 0, 23 + 1]
    # Label ids (index + 1): 1 has label 2, 4 label 0, 2 label 0, 5 label 1.
    assert ids[36:].tolist() == [0, 0, 0, 0, 3, 1, 1, 0, 0, 0, 0, 2]
    assert len(feature_ids(config, words, tags, labelled=False)) == 36


def test_hand_worked_buffer_features():
    config = Config(5)
    for t in (SHIFT, SHIFT, 1):  # 2 -> 1
        config.apply(t, 1)
    assert feature_tokens(config)[:6] == [2, 0, -1, 3, 4, 5]
    assert feature_tokens(config)[6:10] == [1, -1, -1, -1]
    assert legal_mask(config, 1).tolist() == [True, False, False]  # ROOT below s1, buffer full


def states_of(configs: list[Config], max_length: int) -> decoder.State:
    """The configurations as one batch of device states."""

    def pad(values: list[int], fill: int = -1) -> list[int]:
        return values + [fill] * (max_length + 1 - len(values))

    def field(name: str) -> jax.Array:
        return jnp.asarray([pad(getattr(c, name)) for c in configs], jnp.int32)

    return decoder.State(
        stack=jnp.asarray([pad(c.stack, 0) for c in configs], jnp.int32),
        size=jnp.asarray([len(c.stack) for c in configs], jnp.int32),
        next=jnp.asarray([c.next for c in configs], jnp.int32),
        length=jnp.asarray([c.n for c in configs], jnp.int32),
        head=field("head"),
        label=field("label"),
        lc1=field("lc1"),
        lc2=field("lc2"),
        rc1=field("rc1"),
        rc2=field("rc2"),
    )


def test_device_featurizer_matches_the_hand_worked_configuration():
    state = states_of([hand_config()], 8)
    words = jnp.asarray([[2, 10, 11, 12, 13, 14, 15, 0, 0]], jnp.int32)
    tags = jnp.asarray([[2, 20, 21, 22, 23, 24, 25, 0, 0]], jnp.int32)
    expected = feature_ids(hand_config(), words[0].tolist(), tags[0].tolist(), True)
    np.testing.assert_array_equal(decoder.feature_ids(state, words, tags, True)[0], expected)


def test_featurizers_agree_on_every_oracle_configuration():
    rng = random.Random(1)
    configs, words, tags, num_labels = [], [], [], 4
    for _ in range(12):
        n = rng.randint(1, 14)
        heads = random_projective_tree(rng, n)
        assert is_projective(heads) and heads.count(0) == 1
        labels = [rng.randrange(num_labels) for _ in heads]
        config = Config(n)
        w = [2] + [rng.randrange(3, 50) for _ in range(n)]
        t = [2] + [rng.randrange(3, 20) for _ in range(n)]
        for transition in oracle(heads, labels, num_labels):
            configs.append(Config(n, list(config.stack), config.next, *_copy_arrays(config)))
            words.append(w + [0] * (15 - n))
            tags.append(t + [0] * (15 - n))
            config.apply(transition, num_labels)
    state = states_of(configs, 14)
    device = decoder.feature_ids(state, jnp.asarray(words), jnp.asarray(tags), True)
    host = np.stack(
        [feature_ids(c, w, t, True) for c, w, t in zip(configs, words, tags, strict=True)]
    )
    np.testing.assert_array_equal(device, host)
    np.testing.assert_array_equal(
        decoder.feature_tokens(state), np.asarray([feature_tokens(c) for c in configs])
    )
    legal = np.stack([legal_mask(c, num_labels) for c in configs])
    np.testing.assert_array_equal(decoder.legal_mask(state, num_labels), legal)
    assert len(configs) > 100


def _copy_arrays(config: Config) -> list[list[int]]:
    return [list(getattr(config, name)) for name in ("head", "label", "lc1", "lc2", "rc1", "rc2")]


# ---------------------------------------------------------------------------------------------
# Decoding


def integer_scorer(num_features: int, num_trans: int, seed: int):
    """Scores that are sums of small integers: exact in float32, so host and device agree."""
    table = np.random.default_rng(seed).integers(-8, 9, (num_features, 64, num_trans))
    table = table.astype(np.float32)

    def host(ids: np.ndarray) -> np.ndarray:
        return table[np.arange(num_features), ids].sum(axis=0)

    def device(ids: jax.Array) -> jax.Array:
        return jnp.asarray(table)[jnp.arange(num_features), ids].sum(axis=1)

    return host, device


def random_sentences(seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Lengths, word and tag ids of 12 rows (two of them padding), padded to 16 tokens."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 15) for _ in range(10)] + [0, 0]
    max_length = 16
    words = np.zeros((len(lengths), max_length + 1), np.int32)
    tags = np.zeros_like(words)
    for row, n in enumerate(lengths):
        words[row, : n + 1] = [2] + [rng.randrange(3, 64) for _ in range(n)]
        tags[row, : n + 1] = [2] + [rng.randrange(3, 64) for _ in range(n)]
    return lengths, words, tags


@pytest.mark.parametrize(("num_labels", "labelled"), [(1, False), (3, True)])
def test_batched_decoding_equals_the_reference_decoder(num_labels, labelled):
    lengths, words, tags = random_sentences(2)
    host, device = integer_scorer(48 if labelled else 36, num_transitions(num_labels), 3)
    decode = jax.jit(
        functools.partial(decoder.decode, device, num_labels=num_labels, labelled=labelled)
    )
    state = decode(jnp.asarray(words), jnp.asarray(tags), jnp.asarray(lengths))
    assert bool(jnp.all(state.done))
    for row, n in enumerate(lengths):
        if n == 0:
            assert np.all(np.asarray(state.head[row]) == -1)
            continue
        ref = parse_reference(host, words[row, : n + 1], tags[row, : n + 1], num_labels, labelled)
        assert np.asarray(state.head[row, 1 : n + 1]).tolist() == ref.head[1:]
        assert np.asarray(state.label[row, 1 : n + 1]).tolist() == ref.label[1:]
        heads = ref.head[1:]
        assert heads.count(0) == 1 and is_projective(heads)  # a tree with one root


def test_decoding_a_batch_sharded_over_an_explicit_mesh_gives_the_same_parses():
    """As ``--devices 2`` runs it: the batch axis sharded over an explicit mesh axis."""
    lengths, words, tags = random_sentences(5)
    table = np.random.default_rng(4).integers(-8, 9, (48, 64, num_transitions(3)))
    table = jnp.asarray(table, jnp.float32)

    def score(ids: jax.Array) -> jax.Array:  # a one-hot product keeps the batch sharding
        return jnp.einsum("bfv,fvt->bt", jax.nn.one_hot(ids, 64, dtype=jnp.float32), table)

    decode = jax.jit(functools.partial(decoder.decode, score, num_labels=3, labelled=True))
    arrays = (jnp.asarray(words), jnp.asarray(tags), jnp.asarray(lengths))
    single = decode(*arrays)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        sharded = decode(*(jax.device_put(a, jax.P("data")) for a in arrays))
        assert sharded.head.sharding.spec[0] == "data"
    np.testing.assert_array_equal(sharded.head, single.head)
    np.testing.assert_array_equal(sharded.label, single.label)
