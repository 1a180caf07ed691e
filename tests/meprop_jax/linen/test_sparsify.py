"""``meprop_jax.sparsify``: meProp for stock Flax Linen models.

Gradients of a sparsified stock model against the same model built by hand from this
package's layers (an MLP, an LSTM tagger, a Transformer block, a CNN), the unchanged forward
pass, the default layer set (every layer but the output layer), ``layers=`` and ``k=``
selection, the report, and argument errors.
"""

import doctest
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import linen as mlinen

sparsify_module = sys.modules["meprop_jax.linen.sparsify"]

MODES = ("unified", "per_example", "random")
RNGS = {"meprop": jax.random.key(42)}


def dense(hand: bool, k: int, mode: str, features: int, name: str) -> nn.Module:
    if hand:
        return mlinen.Dense(features, k=k, mode=mode, name=name)
    return nn.Dense(features, name=name)


class MLP(nn.Module):
    hand: bool = False
    k: int = 0
    mode: str = "unified"

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate((32, 24)):
            x = nn.relu(dense(self.hand, self.k, self.mode, features, f"hidden_{i}")(x))
        return nn.Dense(5, name="out")(x)


class Tagger(nn.Module):
    """Embedding, an LSTM over time, a per-token output layer."""

    hand: bool = False
    k: int = 0
    mode: str = "unified"
    optimized: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 12)(tokens)
        if self.hand:
            cell = mlinen.LSTMCell(
                16, k=self.k, mode=self.mode, fused_gates=self.optimized, name="cell"
            )
        elif self.optimized:
            cell = nn.OptimizedLSTMCell(16, name="cell")
        else:
            cell = nn.LSTMCell(16, name="cell")
        x = nn.RNN(cell)(x)
        return nn.Dense(7, name="out")(x)


class HandAttention(nn.Module):
    """``nn.MultiHeadDotProductAttention`` with ``meprop_jax.Dense`` query/key/value."""

    heads: int
    k: int
    mode: str

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        split = lambda y: y.reshape((*y.shape[:-1], self.heads, features // self.heads))
        q, k, v = (
            split(mlinen.Dense(features, k=self.k, mode=self.mode, name=n)(x))
            for n in ("query", "key", "value")
        )
        y = nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(features, axis=(-2, -1), name="out")(y)


class Block(nn.Module):
    """A pre-norm Transformer block and a classification head."""

    hand: bool = False
    k: int = 0
    mode: str = "unified"

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        if self.hand:
            h = HandAttention(2, self.k, self.mode, name="attn")(h)
        else:
            h = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.gelu(dense(self.hand, self.k, self.mode, 48, "mlp_in")(h))
        x = x + dense(self.hand, self.k, self.mode, x.shape[-1], "mlp_out")(h)
        return nn.Dense(3, name="head")(x.mean(axis=1))


class CNN(nn.Module):
    hand: bool = False
    k: int = 0
    mode: str = "unified"

    @nn.compact
    def __call__(self, x):
        def conv(features, name):
            if self.hand:
                return meprop_jax.Conv(features, (3, 3), k=self.k, mode=self.mode, name=name)
            return nn.Conv(features, (3, 3), name=name)

        x = nn.relu(conv(8, "conv_0")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(conv(12, "conv_1")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(self.hand, self.k, self.mode, 16, "fc")(x))
        return nn.Dense(4, name="head")(x)


def loss_and_grads(apply_fn, params, x):
    @jax.jit
    def run(params, x):
        loss = lambda p: jnp.sum(jnp.sin(apply_fn(p, x, rngs=RNGS)))
        return jax.value_and_grad(loss)(params)

    return run(params, x)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6), a, b)


def check_against_hand_built(
    model_cls, x, k, mode, *, exact=True, to_hand=None, sparsify_kwargs=None, **fields
):
    stock = model_cls(**fields)
    hand = model_cls(hand=True, k=k, mode=mode, **fields)
    params = stock.init(jax.random.key(0), x)
    sparse_apply = meprop_jax.sparsify(stock.apply, k=k, mode=mode, **(sparsify_kwargs or {}))
    np.testing.assert_array_equal(sparse_apply(params, x, rngs=RNGS), stock.apply(params, x))
    hand_params = to_hand(params) if to_hand else params
    loss, grads = loss_and_grads(sparse_apply, params, x)
    hand_loss, hand_grads = loss_and_grads(hand.apply, hand_params, x)
    _, stock_grads = loss_and_grads(stock.apply, params, x)
    if to_hand:
        hand_grads = to_hand(grads, inverse=hand_grads)
    (assert_trees_equal if exact else assert_trees_close)(grads, hand_grads)
    if exact:
        assert loss == hand_loss
    # Something was dropped, and the output layer's gradient is the stock one.
    flat = lambda t: jax.tree.leaves(t)
    assert any(np.any(a != b) for a, b in zip(flat(grads), flat(stock_grads), strict=True))
    return params, grads, stock_grads


@pytest.mark.parametrize("mode", MODES)
def test_mlp_matches_hand_built(mode):
    x = jax.random.normal(jax.random.key(1), (6, 10))
    _, grads, stock_grads = check_against_hand_built(MLP, x, 4, mode)
    assert_trees_equal(grads["params"]["out"], stock_grads["params"]["out"])


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("optimized", [False, True])
def test_lstm_tagger_matches_hand_built(mode, optimized):
    # meprop_jax.LSTMCell computes nn.OptimizedLSTMCell's products (fused_gates=True) or
    # nn.LSTMCell's (False), bit for bit.
    tokens = jax.random.randint(jax.random.key(1), (3, 5), 0, 20)
    _, grads, _ = check_against_hand_built(Tagger, tokens, 3, mode, optimized=optimized)
    kernel = np.asarray(grads["params"]["cell"]["ii"]["kernel"])
    assert np.any(kernel == 0) and np.any(kernel != 0)


def _map_qkv(tree, fn):
    attn = dict(tree["params"]["attn"])
    for layer in ("query", "key", "value"):
        attn[layer] = {name: fn(layer, name, a) for name, a in attn[layer].items()}
    return {**tree, "params": {**tree["params"], "attn": attn}}


def attention_to_hand(params, inverse=None):
    """Stock query/key/value parameters ``[d, heads, head_dim]`` as ``[d, features]``.

    With ``inverse`` (a tree in the hand-built layout), that tree in the layout of ``params``.
    """
    if inverse is None:
        flat = lambda layer, name, a: a.reshape((a.shape[0], -1) if name == "kernel" else (-1,))
        return _map_qkv(params, flat)
    stock_shape = lambda layer, name, a: a.reshape(params["params"]["attn"][layer][name].shape)
    return _map_qkv(inverse, stock_shape)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_block_matches_hand_built(mode):
    # The hand-built block's output projection is a dense nn.DenseGeneral: leave it out.
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    layers = ["attn/query", "attn/key", "attn/value", "mlp_*"]
    check_against_hand_built(
        Block, x, 4, mode, to_hand=attention_to_hand, sparsify_kwargs=dict(layers=layers)
    )


@pytest.mark.parametrize("mode", MODES)
def test_cnn_matches_hand_built(mode):
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 2))
    check_against_hand_built(CNN, x, 3, mode)


# --------------------------------------------------------------------------- selection


def report(sparse_apply, params, x, **kwargs):
    return {r.path: (r.k, r.reason) for r in meprop_jax.sparsify_report(sparse_apply, params, x)}


def test_default_spares_the_output_layer_and_narrow_layers():
    model, x = MLP(), jnp.ones((2, 10))
    params = model.init(jax.random.key(0), x)
    assert report(meprop_jax.sparsify(model.apply, k=24), params, x) == {
        "hidden_0": (24, "sparsified"),
        "hidden_1": (0, "features <= k"),
        "out": (0, "output layer"),
    }


def test_layers_patterns_predicate_and_k_mapping():
    model, x = MLP(), jnp.ones((2, 10))
    params = model.init(jax.random.key(0), x)
    by_pattern = meprop_jax.sparsify(model.apply, k=2, layers=["hidden_1", "o*"])
    assert report(by_pattern, params, x) == {
        "hidden_0": (0, "not selected"),
        "hidden_1": (2, "sparsified"),
        "out": (2, "sparsified"),
    }
    by_predicate = meprop_jax.sparsify(model.apply, k=2, layers=lambda p: p.endswith("_0"))
    assert report(by_predicate, params, x)["hidden_0"] == (2, "sparsified")
    assert report(by_predicate, params, x)["hidden_1"] == (0, "not selected")
    mapping = meprop_jax.sparsify(model.apply, k={"hidden_0": 8, "hidden_*": 3})
    assert report(mapping, params, x) == {
        "hidden_0": (8, "sparsified"),
        "hidden_1": (3, "sparsified"),
        "out": (0, "output layer"),
    }


def test_package_layers_are_left_alone():
    model, x = MLP(hand=True, k=4), jnp.ones((2, 10))
    params = model.init(jax.random.key(0), x)
    assert list(report(meprop_jax.sparsify(model.apply, k=2), params, x)) == ["out"]


def test_attention_projections_are_all_sparsified():
    model, x = Block(), jnp.ones((2, 6, 16))
    params = model.init(jax.random.key(0), x)
    rows = report(meprop_jax.sparsify(model.apply, k=4), params, x)
    for layer in ("query", "key", "value", "out"):
        assert rows[f"attn/{layer}"] == (4, "sparsified")
    assert rows["head"] == (0, "output layer")


def test_random_mode_draws_from_the_meprop_stream():
    model, x = MLP(), jax.random.normal(jax.random.key(1), (6, 10))
    params = model.init(jax.random.key(0), x)
    sparse_apply = meprop_jax.sparsify(model.apply, k=4, mode="random")
    grad = lambda key: jax.grad(lambda p: jnp.sum(sparse_apply(p, x, rngs={"meprop": key}) ** 2))(
        params
    )
    assert_trees_equal(grad(jax.random.key(3)), grad(jax.random.key(3)))
    differs = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), grad(jax.random.key(3)), grad(jax.random.key(4))
    )
    assert differs["params"]["hidden_0"]["kernel"]
    with pytest.raises(Exception, match="meprop"):
        sparse_apply(params, x)


def test_jit_matches_eager():
    model, x = CNN(), jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    params = model.init(jax.random.key(0), x)
    sparse_apply = meprop_jax.sparsify(model.apply, k=3)
    np.testing.assert_array_equal(jax.jit(sparse_apply)(params, x), model.apply(params, x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k=1.5), TypeError, "non-negative int"),
        (dict(k=2, mode="top"), ValueError, "valid modes"),
        (dict(k=2, layers=5), TypeError, "layers must be"),
        (dict(k=2, layers=[]), ValueError, "selects no layer"),
        (dict(k={"hidden_0": -2}), ValueError, "k must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        meprop_jax.sparsify(MLP().apply, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(k=2, layers="encoder/*"), dict(k={"nope": 2})])
def test_pattern_matching_no_layer_is_an_error(kwargs):
    model, x = MLP(), jnp.ones((2, 10))
    params = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"matches no layer.*hidden_0"):
        meprop_jax.sparsify(model.apply, **kwargs)(params, x)


def test_doctests():
    result = doctest.testmod(sparsify_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
