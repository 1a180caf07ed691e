"""The tagger's evaluation forward (a ``while`` loop up to the longest sentence) against its
training forward (``nn.RNN`` scans over the whole padded length)."""

import jax
import numpy as np
import pytest

from experiments.tagging.features import DEFAULT_FEATURES, Vocabularies
from experiments.tagging.task import TaggerSettings
from meprop_jax import AdaptiveK
from tests.experiments.tagging.test_model import random_params
from tests.experiments.tagging.toy import toy_sentences

_SETTINGS = {
    "one-way": {},
    "two-way": {"bidirectional": True},
    "random": {"bidirectional": True, "mode": "random"},
    "mesimp": {"mesimp": True},
    "feedback-adaptive": {"feedback": 0.5, "adaptive": AdaptiveK(mass=0.9, k_min=1)},
}


def _batch(vocab: Vocabularies, time: int):
    """Four toy sentences and one empty row, padded to ``time``."""
    encoded = [vocab.encode(s) for s in toy_sentences(4, 5)]
    words = np.zeros((5, time), np.int32)
    features = np.zeros((5, time, len(DEFAULT_FEATURES)), np.int32)
    lengths = np.zeros(5, np.int32)
    for i, e in enumerate(encoded):
        words[i, : len(e.words)] = e.words
        features[i, : len(e.words)] = e.features
        lengths[i] = len(e.words)
    return words, features, lengths


@pytest.mark.parametrize("name", list(_SETTINGS))
def test_evaluation_loop_equals_the_training_scan(name):
    vocab = Vocabularies.build(toy_sentences(20, 0), DEFAULT_FEATURES, 1)
    model = TaggerSettings(hidden=8, k=2, word_dim=4, feature_dim=2, **_SETTINGS[name]).model(vocab)
    variables = random_params(model, 0)
    # Random values everywhere, the meSimp mask and the error-feedback memory included.
    words, features, lengths = _batch(vocab, 11)
    assert lengths.max() < 11 and lengths.min() == 0  # padding past every sentence

    def logits(train):
        rngs = {"meprop": jax.random.key(1), "dropout": jax.random.key(2)}
        fn = jax.jit(lambda v: model.apply(v, words, features, lengths, train, rngs=rngs))
        return np.asarray(fn(variables))

    scanned, looped = logits(True), logits(False)  # dropout 0: the same forward
    real = np.arange(words.shape[1])[None, :] < lengths[:, None]
    np.testing.assert_allclose(looped[real], scanned[real], rtol=1e-5, atol=1e-6)
    assert np.array_equal(looped[real].argmax(-1), scanned[real].argmax(-1))


def test_one_evaluation_program_serves_every_padded_length():
    """The loop stops at the batch's longest sentence: padding the batch further changes no
    real token's logit, so evaluation batches can share one padded length (one compiled program)."""
    vocab = Vocabularies.build(toy_sentences(20, 0), DEFAULT_FEATURES, 1)
    model = TaggerSettings(hidden=8, k=2, word_dim=4, feature_dim=2, bidirectional=True).model(
        vocab
    )
    variables = random_params(model, 0)
    apply = jax.jit(lambda v, w, f, n: model.apply(v, w, f, n, False))
    short = _batch(vocab, 8)
    long = _batch(vocab, 24)
    n = short[0].shape[1]
    lengths = short[2]
    assert lengths.max() < n  # both padded past every sentence
    real = np.arange(n)[None, :] < lengths[:, None]
    np.testing.assert_allclose(
        np.asarray(apply(variables, *long))[:, :n][real],
        np.asarray(apply(variables, *short))[real],
        rtol=1e-6,
        atol=1e-7,
    )
