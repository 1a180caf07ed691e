"""Tests for experiments.tagging.batching: bucket lengths and padded minibatches."""

import itertools
import math

import numpy as np

from experiments.corpora.conll import Sentence
from experiments.tagging.batching import (
    MAX_BUCKETS,
    MIN_BUCKET,
    batch_arrays,
    bucket_ladder,
    bucket_length,
    bucketize,
)
from experiments.tagging.features import DEFAULT_FEATURES, Vocabularies
from tests.experiments.tagging.toy import toy_sentences


def padded_steps(lengths, ladder, batch_size):
    counts: dict[int, int] = {}
    for n in lengths:
        b = bucket_length(n, ladder)
        counts[b] = counts.get(b, 0) + 1
    return sum(b * math.ceil(c / batch_size) for b, c in counts.items())


def test_bucket_length():
    ladder = (8, 12, 30)
    assert [bucket_length(n, ladder) for n in (0, 1, 8, 9, 12, 13, 30)] == [8, 8, 8, 12, 12, 30, 30]
    # Longer than any training sentence: the next power of two.
    assert [bucket_length(n, ladder) for n in (31, 64, 65, 249)] == [32, 64, 128, 256]


def test_bucket_ladder_is_optimal_on_small_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 30))).tolist()
        ladder = bucket_ladder(lengths, batch_size=4, max_buckets=3)
        assert len(ladder) <= 3 and list(ladder) == sorted(set(ladder))
        assert ladder[-1] == max(MIN_BUCKET, *lengths) and ladder[0] >= MIN_BUCKET
        distinct = sorted({max(n, MIN_BUCKET) for n in lengths})
        best = min(
            padded_steps(lengths, (*cut, distinct[-1]), 4)
            for r in range(3)
            for cut in itertools.combinations(distinct[:-1], r)
        )
        assert padded_steps(lengths, ladder, 4) == best


def test_bucket_ladder_limits_the_shapes():
    lengths = list(range(1, 200))
    ladder = bucket_ladder(lengths, 8)
    assert len(ladder) == MAX_BUCKETS and ladder[-1] == 199
    assert bucket_ladder([3, 3], 8) == (MIN_BUCKET,)
    assert bucket_ladder([], 8) == (MIN_BUCKET,)


def test_bucketize_and_batches():
    sents = [*toy_sentences(7, 0), Sentence(tuple("w" for _ in range(12)), ("NN",) * 12)]
    vocab = Vocabularies.build(sents, DEFAULT_FEATURES, 1)
    enc = [vocab.encode(s) for s in sents]
    buckets = bucketize(enc, len(DEFAULT_FEATURES), (8, 16))
    assert [b.length for b in buckets] == [8, 16]
    assert sorted(np.concatenate([b.index for b in buckets]).tolist()) == list(range(8))
    arrays = batch_arrays(buckets[0], 4, order=np.arange(len(buckets[0]))[::-1])
    assert arrays["words"].shape == (2, 4, 8)
    assert arrays["features"].shape == (2, 4, 8, len(DEFAULT_FEATURES))
    lengths = arrays["lengths"].reshape(-1)
    assert lengths[7] == 0  # the 8th slot is an empty filler sentence
    assert arrays["mask"].sum() == sum(len(s.words) for s in sents[:7])
    # Masked-out positions are padding ids.
    assert np.all(arrays["words"][arrays["mask"] == 0] == 0)
    first = buckets[0].index[-1]  # reversed order: the last sentence comes first
    assert lengths[0] == len(sents[first].words)
