"""Tests for experiments.tagging.model: the LSTM tagger, its gradients and its loss."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from experiments.corpora.conll import Sentence
from experiments.tagging.batching import batch_arrays, bucketize
from experiments.tagging.features import DEFAULT_FEATURES, Vocabularies
from experiments.tagging.model import Tagger, init_params, lstm_layer, token_loss, zero_carry
from experiments.tagging.predict import predict_tags
from experiments.tagging.task import TaggerSettings
from tests.experiments.tagging.toy import toy_sentences


def test_token_loss_counts_unknown_tags_as_errors():
    logits = jnp.array([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
    tags = jnp.array([[0, -1, 1]], jnp.int32)
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, aux = token_loss(logits, tags, mask)
    assert float(aux["count"]) == 2.0 and float(aux["correct"]) == 1.0
    assert np.isfinite(float(loss)) and float(loss) < 0.01


def random_params(model: Tagger, seed: int):
    """Parameters of the right shapes without compiling the initialisers (slow on CPU)."""
    shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_predictions(bidirectional):
    sents = toy_sentences(20, 0)
    long = Sentence(("w",) * 13, ("NN",) * 13)
    vocab = Vocabularies.build([*sents, long], DEFAULT_FEATURES, 1)
    settings = TaggerSettings(hidden=16, k=2, bidirectional=bidirectional)
    model = settings.model(vocab)
    params = random_params(model, 3)
    target = vocab.encode(sents[0])
    n = len(target.words)

    def logits(encoded, length, empty=0):
        b = len(encoded) + empty  # ``empty`` trailing all-padding rows
        words = np.zeros((b, length), np.int32)
        feats = np.zeros((b, length, len(DEFAULT_FEATURES)), np.int32)
        lengths = np.zeros(b, np.int32)
        for i, e in enumerate(encoded):
            words[i, : len(e.words)] = e.words
            feats[i, : len(e.words)] = e.features
            lengths[i] = len(e.words)
        return np.asarray(model.apply(params, words, feats, lengths, False))

    alone = logits([target], n)[0]
    batch = [vocab.encode(long), target, vocab.encode(sents[1])]
    padded = logits(batch, 16, empty=1)[1, :n]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    assert np.array_equal(padded.argmax(-1), alone.argmax(-1))
    # predict_tags buckets and batches on its own: same tags whatever the company.
    together = predict_tags(model, params, batch, batch_size=4)[1]
    single = predict_tags(model, params, [target], batch_size=1)[0]
    assert np.array_equal(together, single) and np.array_equal(single, alone.argmax(-1))


def test_model_parameter_shapes():
    vocab = Vocabularies.build(toy_sentences(10, 0), DEFAULT_FEATURES, 1)
    model = TaggerSettings(hidden=12, k=3).model(vocab)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))["params"]
    assert params["word_embedding"].shape == (len(vocab.words), 50)
    assert params["feature_embedding_6"].shape == (len(vocab.features[6]), 20)
    assert params["lstm"]["ii"]["kernel"].shape == (190, 12)  # 50 + 7 x 20 inputs
    assert params["output"]["kernel"].shape == (12, len(vocab.tags))


# ---------------------------------------------------------------------------------------------
# Gradients


class _OneWay(nn.Module):
    """One LSTM direction exactly as the tagger builds it."""

    hidden: int
    k: int
    mode: str
    reverse: bool

    @nn.compact
    def __call__(self, x, lengths):
        rnn = lstm_layer(self.hidden, self.k, self.mode, self.reverse, "lstm")
        return rnn(x, initial_carry=zero_carry(x, self.hidden), seq_lengths=lengths)


def _flip_within_lengths(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Each row's first ``length`` positions reversed, the padding left in place."""
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(x, index[..., None], axis=1)


@pytest.mark.parametrize(("k", "mode"), [(0, "unified"), (3, "unified"), (3, "per_example")])
def test_backward_lstm_gradients_match_hand_reversed_sequences(k, mode):
    """The tagger's right-to-left LSTM (``nn.RNN(reverse=True, seq_lengths=...)``) equals the
    left-to-right one run on each sentence reversed by hand, gradients and top-k included."""
    hidden, batch, time, features = 8, 4, 7, 5
    lengths = jnp.array([7, 3, 5, 1], jnp.int32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, time, features)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(batch, time, hidden)), jnp.float32)
    mask = (jnp.arange(time)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]
    backward = _OneWay(hidden, k, mode, reverse=True)
    forward = _OneWay(hidden, k, mode, reverse=False)
    params = backward.init(jax.random.key(1), x, lengths)

    def loss_backward(params, x):
        return jnp.sum(backward.apply(params, x, lengths) * weights * mask)

    def loss_reference(params, x):
        out = forward.apply(params, _flip_within_lengths(x, lengths), lengths)
        return jnp.sum(_flip_within_lengths(out, lengths) * weights * mask)

    value, grads = jax.value_and_grad(loss_backward, argnums=(0, 1))(params, x)
    ref_value, ref_grads = jax.value_and_grad(loss_reference, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Not vacuous: the backward direction differs from the forward one on unflipped input.
    other = jax.grad(lambda p: jnp.sum(forward.apply(p, x, lengths) * weights * mask))(params)
    kernel = ref_grads[0]["params"]["lstm"]["ii"]["kernel"]
    assert not np.allclose(other["params"]["lstm"]["ii"]["kernel"], kernel)


def _keep_top_k_per_gate(z: jax.Array, k: int) -> jax.Array:
    """Identity forward; backward keeps, in each of the 4 gate blocks of ``z [batch, 4h]``,
    the ``k`` columns with the largest ``sum |dz|`` over the batch (meProp's unified rule)."""

    @jax.custom_vjp
    def keep(z):
        return z

    def backward(_, g):
        gates, width = 4, g.shape[-1] // 4
        scores = jnp.sum(jnp.abs(g), axis=0).reshape(gates, width)
        top = jax.lax.top_k(scores, k)[1]
        mask = jnp.zeros((gates, width)).at[jnp.arange(gates)[:, None], top].set(1.0)
        return (g * mask.reshape(-1),)

    keep.defvjp(lambda z: (z, None), backward)
    return keep(z)


def _reference_tagger_loss(params, words, features, tags, mask, k):
    """The tagger written out by hand: embeddings, an LSTM whose gate pre-activation
    gradient (after the sigmoid/tanh derivatives, before the products with the weights) keeps
    ``k`` columns per gate, the dense bias gradient, and a dense output layer."""
    p = params["params"]
    parts = [p["word_embedding"][words]]
    parts += [p[f"feature_embedding_{j}"][features[..., j]] for j in range(features.shape[-1])]
    x = jnp.concatenate(parts, axis=-1)
    cell = p["lstm"]
    w_i = jnp.concatenate([cell[n]["kernel"] for n in ("ii", "if", "ig", "io")], axis=1)
    w_h = jnp.concatenate([cell[n]["kernel"] for n in ("hi", "hf", "hg", "ho")], axis=1)
    b = jnp.concatenate([cell[n]["bias"] for n in ("hi", "hf", "hg", "ho")])
    hidden = w_h.shape[0]

    def step(carry, x_t):
        c, h = carry
        z = _keep_top_k_per_gate(x_t @ w_i + h @ w_h, k) + b
        z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(z_f) * c + jax.nn.sigmoid(z_i) * jnp.tanh(z_g)
        h = jax.nn.sigmoid(z_o) * jnp.tanh(c)
        return (c, h), h

    zeros = jnp.zeros((x.shape[0], hidden))
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    logits = jnp.swapaxes(hs, 0, 1) @ p["output"]["kernel"] + p["output"]["bias"]
    return token_loss(logits, tags, mask)[0]


def test_meprop_sparsifies_the_gate_preactivation_gradient_only():
    """In the tagger, top-k acts on the LSTM gate pre-activation gradient: the kernels'
    gradients match a masked reference and are column-sparse; the output layer stays dense."""
    sents = toy_sentences(12, 5)
    vocab = Vocabularies.build(sents, DEFAULT_FEATURES, 1)
    hidden, k, time = 16, 2, 3
    model = TaggerSettings(hidden=hidden, k=k).model(vocab)
    params = random_params(model, 7)
    params = jax.tree.map(lambda a: a * 0.4, params)  # keep the gates off saturation
    encoded = [vocab.encode(s) for s in sents]
    words = jnp.asarray(np.stack([e.words[:time] for e in encoded]))
    features = jnp.asarray(np.stack([e.features[:time] for e in encoded]))
    tags = jnp.asarray(np.stack([e.tags[:time] for e in encoded]))
    lengths = jnp.full((len(sents),), time, jnp.int32)
    mask = jnp.ones(tags.shape, jnp.float32)

    def tagger_loss(params):
        rngs = {"meprop": jax.random.key(0)}
        logits = model.apply(params, words, features, lengths, True, rngs=rngs)
        return token_loss(logits, tags, mask)[0]

    # Jitted: one program each, not hundreds of operations compiled one by one.
    got = jax.jit(jax.grad(tagger_loss))(params)["params"]
    reference = jax.jit(jax.grad(_reference_tagger_loss), static_argnums=5)
    want = reference(params, words, features, tags, mask, k)["params"]
    dense = reference(params, words, features, tags, mask, hidden)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # Each time step keeps k columns per gate: at most k * time of the hidden columns.
    for name in ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho"):
        kept = np.count_nonzero(np.any(np.asarray(got["lstm"][name]["kernel"]) != 0, axis=0))
        assert 1 <= kept <= k * time < hidden, (name, kept)
    # The bias (meProp keeps it dense) and the output layer get every entry.
    assert np.all(np.asarray(got["lstm"]["hi"]["bias"]) != 0)
    assert np.all(np.asarray(got["output"]["kernel"]) != 0)
    assert np.all(np.asarray(got["output"]["bias"]) != 0)
    # Not vacuous: the masked gradient differs from ordinary backprop.
    assert not np.allclose(got["lstm"]["ii"]["kernel"], dense["params"]["lstm"]["ii"]["kernel"])


# ---------------------------------------------------------------------------------------------
# Learning


def context_sentences(n: int, seed: int) -> list[Sentence]:
    """A toy language whose tags need the word, its suffix and the left context: "saw" and
    "runs" are nouns after a determiner and verbs after a noun; unseen "-ly" words are
    adverbs."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "bird", "saw", "runs", "house"]
    verbs = ["saw", "runs", "sees", "likes"]
    adverbs = ["quickly", "slowly", "badly", "rarely"] if seed == 0 else ["oddly", "madly"]
    out = []
    for _ in range(n):
        words, tags = [rng.choice(["the", "a"]), rng.choice(nouns)], ["DT", "NN"]
        words += [rng.choice(verbs)]
        tags += ["VB"]
        if rng.random() < 0.5:
            words += [rng.choice(adverbs)]
            tags += ["RB"]
        words += [rng.choice(["the", "a"]), rng.choice(nouns), "."]
        tags += ["DT", "NN", "."]
        out.append(Sentence(tuple(words), tuple(tags)))
    return out


@pytest.mark.slow
def test_tagger_learns_a_toy_language():
    train, test = context_sentences(256, 0), context_sentences(100, 1)
    vocab = Vocabularies.build(train, DEFAULT_FEATURES, 1)
    model = TaggerSettings(hidden=32, k=4).model(vocab)
    tx = optax.adam(0.02)
    params = init_params(model, jax.random.key(0))
    opt_state = tx.init(params)
    (bucket,) = bucketize([vocab.encode(s) for s in train], len(DEFAULT_FEATURES), (16,))
    arrays = jax.tree.map(jnp.asarray, batch_arrays(bucket, 16))

    @jax.jit
    def epoch(params, opt_state, key):
        def step(carry, xs):
            params, opt_state = carry
            batch, key = xs

            def loss(params):
                logits = model.apply(
                    params, batch["words"], batch["features"], batch["lengths"], True,
                    rngs={"meprop": key},
                )  # fmt: skip
                return token_loss(logits, batch["tags"], batch["mask"])[0]

            grads = jax.grad(loss)(params)
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        keys = jax.random.split(key, arrays["words"].shape[0])
        return jax.lax.scan(step, (params, opt_state), (arrays, keys))[0]

    for e in range(12):
        params, opt_state = epoch(params, opt_state, jax.random.key(e))
    predicted = predict_tags(model, params, [vocab.encode(s) for s in test])
    gold = [np.array([vocab.tags.id(t) for t in s.tags]) for s in test]
    correct = sum(int(np.sum(p == g)) for p, g in zip(predicted, gold, strict=True))
    total = sum(len(g) for g in gold)
    assert correct / total >= 0.99, f"{correct}/{total}"


def test_each_feature_reads_its_own_embedding_table():
    """The feature tables are looked up as one stacked table: feature ``j`` must still read
    table ``j`` at its own id (changing that row moves the logits; any other row does not)."""
    vocab = Vocabularies.build(toy_sentences(20, 0), DEFAULT_FEATURES, 1)
    model = TaggerSettings(hidden=4, k=0, word_dim=2, feature_dim=3).model(vocab)
    params = random_params(model, 4)
    e = vocab.encode(toy_sentences(1, 7)[0])
    words, feats = np.asarray([e.words], np.int32), np.asarray([e.features], np.int32)
    lengths = np.asarray([len(e.words)], np.int32)
    apply = jax.jit(lambda p: model.apply(p, words, feats, lengths, False))
    base = np.asarray(apply(params))
    for j, size in enumerate(model.feature_sizes):
        used = set(feats[0, :, j].tolist())
        unused = next(r for r in range(size) if r not in used) if len(used) < size else None
        for row, moves in [(int(feats[0, 0, j]), True), (unused, False)]:
            if row is None:
                continue
            p = jax.tree.map(lambda a: a, params)
            table = np.array(p["params"][f"feature_embedding_{j}"])
            table[row] += 1.0
            p["params"][f"feature_embedding_{j}"] = table
            changed = not np.allclose(np.asarray(apply(p)), base)
            assert changed == moves, (j, row)
