"""Linen layers: ``meprop_jax.linen.Dense`` and ``meprop_jax.linen.LSTMCell``.

Stock parity (parameter trees, initial values, ``k = 0`` outputs and gradients, bit for bit),
sparsified gradients against the functional ``meprop_jax.linear``, RNG handling of random mode,
argument validation, and use inside ``nn.RNN`` / ``nn.Bidirectional``.
"""

import doctest
import functools

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import linen as mlinen
from tests.helpers import forward_products

MODES = ("unified", "per_example", "random")
# nn.RNN hands the scanned cell only the "params" stream unless told otherwise.
SPLIT = {"params": False, "meprop": True}


class KeyProbe(nn.Module):
    """The key a top-level module's first ``make_rng("meprop")`` returns."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("meprop")


def probe_key(rng: jax.Array) -> jax.Array:
    return KeyProbe().apply({}, rngs={"meprop": rng})


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# ------------------------------------------------------------------------------------- Dense


# Shapes match the docstring examples, so their compiled ops are shared.
F = 4  # output features
X = normal(0, (3, 5))
W_OUT = normal(1, (3, F))  # upstream weights: makes g = dL/dy non-uniform


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("k", [0, 3])
def test_dense_param_tree_and_init_match_stock(k, use_bias):
    stock = nn.Dense(F, use_bias=use_bias).init(jax.random.key(2), X)
    ours = meprop_jax.Dense(F, k=k, use_bias=use_bias).init(jax.random.key(2), X)
    assert_trees_equal(ours, stock)


@pytest.mark.parametrize("k", [0, F, 100])
def test_dense_dense_k_is_stock_bit_for_bit(k):
    params = nn.Dense(F).init(jax.random.key(2), X)

    def loss(module, p, x):
        return jnp.sum(module.apply(p, x) * W_OUT)

    ours = meprop_jax.Dense(F, k=k)
    np.testing.assert_array_equal(ours.apply(params, X), nn.Dense(F).apply(params, X))
    assert_trees_equal(
        jax.grad(loss, (1, 2))(ours, params, X), jax.grad(loss, (1, 2))(nn.Dense(F), params, X)
    )


@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_dense_grads_equal_functional_linear(mode, sparse_bias):
    layer = meprop_jax.Dense(F, k=2, mode=mode, sparse_bias=sparse_bias)
    rng = jax.random.key(9)
    params = layer.init({"params": jax.random.key(2), "meprop": rng}, X)

    def loss_layer(p, x):
        return jnp.sum(layer.apply(p, x, rngs={"meprop": rng}) * W_OUT)

    def loss_fn(p, x):
        y = meprop_jax.linear(
            x,
            p["params"]["kernel"],
            p["params"]["bias"],
            k=2,
            mode=mode,
            key=probe_key(rng),
            sparse_bias=sparse_bias,
        )
        return jnp.sum(y * W_OUT)

    got = jax.grad(loss_layer, (0, 1))(params, X)
    assert_trees_equal(got, jax.grad(loss_fn, (0, 1))(params, X))
    # Not vacuous: dense backprop gives something else.
    dense = jax.grad(lambda p: jnp.sum(nn.Dense(F).apply(p, X) * W_OUT))(params)
    assert not np.allclose(got[0]["params"]["kernel"], dense["params"]["kernel"])


def test_dense_random_mode_needs_rng_and_is_reproducible():
    layer = meprop_jax.Dense(F, k=2, mode="random")
    params = nn.Dense(F).init(jax.random.key(2), X)
    with pytest.raises(flax.errors.InvalidRngError):
        layer.apply(params, X)

    def grad(seed):
        f = lambda p: jnp.sum(layer.apply(p, X, rngs={"meprop": jax.random.key(seed)}) * W_OUT)
        return jax.grad(f)(params)

    assert_trees_equal(grad(0), grad(0))
    assert not np.array_equal(grad(0)["params"]["kernel"], grad(1)["params"]["kernel"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": -1}, ValueError),
        ({"k": 1.5}, TypeError),
        ({"k": True}, TypeError),
        ({"mode": "top"}, ValueError),
    ],
)
def test_dense_bad_arguments_raise_at_call(kwargs, error):
    layer = meprop_jax.Dense(F, **kwargs)  # building the dataclass does not validate
    with pytest.raises(error):
        layer.init(jax.random.key(0), X)


def test_dense_bfloat16():
    layer = meprop_jax.Dense(F, k=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = X.astype(jnp.bfloat16)
    params = layer.init(jax.random.key(2), x)
    y = layer.apply(params, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, nn.Dense(F, dtype=jnp.bfloat16).apply(params, x))
    w = W_OUT.astype(jnp.bfloat16)
    grads = jax.grad(lambda p: jnp.sum((layer.apply(p, x) * w).astype(jnp.float32)))(params)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    kernel_grad = np.asarray(grads["params"]["kernel"], np.float32)
    assert np.all(np.isfinite(kernel_grad))
    assert np.sum(np.any(kernel_grad != 0, axis=0)) == 2  # unified: two columns survive


def test_dense_and_sparsify_make_the_same_taps_the_same_way():
    # One rule for both: a tap is made where "meprop_taps" is mutable, and read otherwise.
    x = normal(1, (4, 5))
    hand = mlinen.Dense(6, k=2, sparse_update=True)
    variables = hand.init(jax.random.key(0), x)
    params = {"params": variables["params"]}
    _, made = hand.apply(params, x, mutable=["meprop_taps"])
    assert_trees_equal(made, {"meprop_taps": variables["meprop_taps"]})
    assert "meprop_taps" in hand.apply(params, x, mutable=True)[1]
    assert hand.apply(params, x, mutable=["mesimp"])[1] == {}  # evaluation: no tap
    stock = nn.Dense(6)
    sparse_apply = meprop_jax.sparsify(stock.apply, k=2, layers="*", sparse_update=True)
    _, from_stock = sparse_apply(params, x, mutable=["meprop_taps"])
    assert_trees_equal(from_stock, made)


# ---------------------------------------------------------------------------------- LSTMCell

H = 8  # hidden size
XS = normal(3, (3, 3, 5))  # [time, batch, in]
H0 = normal(4, (3, H))
C0 = normal(5, (3, H))
Y_W = normal(6, (3, 3, H))  # upstream weights of the per-step outputs


@functools.cache
def stock_params(seed: int = 7):
    return nn.LSTMCell(H).init(jax.random.key(seed), (C0, H0), XS[0])


def unrolled_loss(cell, params, xs, carry, rngs):
    """Three top-level steps; step ``t`` uses ``rngs[t]`` (or no RNG)."""
    loss = jnp.zeros((), jnp.float32)
    for t in range(xs.shape[0]):
        kwargs = {} if rngs is None else {"rngs": {"meprop": rngs[t]}}
        carry, y = cell.apply(params, carry, xs[t], **kwargs)
        loss = loss + jnp.sum(y * Y_W[t])
    return loss + jnp.sum(carry[0] * carry[1])


@pytest.mark.parametrize("k", [0, 3])
def test_lstm_param_tree_and_init_match_stock(k):
    ours = mlinen.LSTMCell(H, k=k).init(jax.random.key(7), (C0, H0), XS[0])
    assert_trees_equal(ours, stock_params())
    assert sorted(ours["params"]) == ["hf", "hg", "hi", "ho", "if", "ig", "ii", "io"]
    assert sorted(ours["params"]["ii"]) == ["kernel"]
    assert sorted(ours["params"]["hi"]) == ["bias", "kernel"]


def test_lstm_initialize_carry_and_feature_axes_match_stock():
    ours, stock = mlinen.LSTMCell(H, k=2), nn.LSTMCell(H)
    assert_trees_equal(
        ours.initialize_carry(jax.random.key(0), (3, 5)),
        stock.initialize_carry(jax.random.key(0), (3, 5)),
    )
    assert ours.num_feature_axes == stock.num_feature_axes == 1


@pytest.mark.parametrize("k", [0, H, 50])
def test_lstm_dense_k_is_stock_bit_for_bit(k):
    params = stock_params()
    args = (params, XS, (C0, H0), None)
    ours = jax.grad(unrolled_loss, (1, 2, 3))(mlinen.LSTMCell(H, k=k), *args)
    assert_trees_equal(ours, jax.grad(unrolled_loss, (1, 2, 3))(nn.LSTMCell(H), *args))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_lstm_sparse_forward_is_the_stock_program(mode, fused):
    # The same products as a stock cell, so the same rounding on any CPU, not only equal
    # outputs on this one: nn.OptimizedLSTMCell's (one per input) or nn.LSTMCell's (per gate).
    params = stock_params()
    rngs = {"meprop": jax.random.key(0)}
    cell = mlinen.LSTMCell(H, k=2, mode=mode, fused_gates=fused)
    ours = functools.partial(cell.apply, rngs=rngs)
    stock = (nn.OptimizedLSTMCell if fused else nn.LSTMCell)(H).apply
    args = (params, (C0, H0), XS[0])
    assert forward_products(ours, *args) == forward_products(stock, *args)
    assert_trees_equal(ours(*args), stock(*args))


@pytest.mark.parametrize("mode", MODES)
def test_lstm_one_step_keeps_k_per_gate(mode):
    """One step: every gate block of dW_i and dW_h has the mode's number of live columns."""
    params, k = stock_params(), 2
    cell = mlinen.LSTMCell(H, k=k, mode=mode)

    def loss(p):
        (c, h), _ = cell.apply(p, (C0, H0), XS[0], rngs={"meprop": jax.random.key(1)})
        return jnp.sum(c * Y_W[0]) + jnp.sum(h * Y_W[1])

    grads = jax.grad(loss)(params)["params"]
    for names in (("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho")):
        for name in names:
            live = int(np.sum(np.any(np.asarray(grads[name]["kernel"]) != 0, axis=0)))
            if mode == "unified":
                assert live == k
            else:  # three rows, k each: between k and 3k distinct columns
                assert k <= live <= 3 * k
        # dense bias gradient by default
        assert all(np.all(np.asarray(grads[n]["bias"]) != 0) for n in names if n[0] == "h")


def test_lstm_bad_arguments_raise_at_call():
    for kwargs, error in [({"k": -2}, ValueError), ({"mode": "x"}, ValueError)]:
        with pytest.raises(error):
            mlinen.LSTMCell(H, **kwargs).init(jax.random.key(0), (C0, H0), XS[0])


def test_lstm_random_mode_needs_rng():
    with pytest.raises(flax.errors.InvalidRngError):
        mlinen.LSTMCell(H, k=2, mode="random").apply(stock_params(), (C0, H0), XS[0])


# ----------------------------------------------------------------------- nn.RNN, Bidirectional


def rnn_loss(model, params, xs, rng):
    y = model.apply(params, xs, rngs={"meprop": rng})
    return jnp.sum(y * jnp.ones_like(y).cumsum(-1))


@pytest.mark.parametrize(
    "model",
    [
        # Two scans, two modes: compiling one scan per mode would double the test time.
        nn.Bidirectional(
            nn.RNN(mlinen.LSTMCell(H, k=2, mode="unified"), split_rngs=SPLIT),
            nn.RNN(mlinen.LSTMCell(H, k=2, mode="per_example"), split_rngs=SPLIT),
        ),
        nn.RNN(mlinen.LSTMCell(H, k=2, mode="random"), split_rngs=SPLIT),
    ],
    ids=["bidirectional-unified-per_example", "rnn-random"],
)
def test_rnn_and_bidirectional_jit_grad(model):
    xs = jnp.swapaxes(XS, 0, 1)  # [batch, time, in]
    cell = stock_params()["params"]
    if isinstance(model, nn.Bidirectional):
        params = {"params": {"forward_rnn": {"cell": cell}, "backward_rnn": {"cell": cell}}}
    else:
        params = {"params": {"cell": cell}}
    grad = jax.jit(jax.grad(lambda p, x, r: rnn_loss(model, p, x, r), (0, 1)))
    g1 = grad(params, xs, jax.random.key(2))
    assert jax.tree.structure(g1[0]) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g1))
    assert_trees_equal(g1, grad(params, xs, jax.random.key(2)))
    g2 = grad(params, xs, jax.random.key(3))
    # Only random mode depends on the key.
    flat = lambda g: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)])
    assert np.array_equal(flat(g1), flat(g2)) != isinstance(model, nn.RNN)


def test_rnn_random_mode_without_split_rngs_raises():
    xs = jnp.swapaxes(XS, 0, 1)
    model = nn.RNN(mlinen.LSTMCell(H, k=2, mode="random"))
    params = {"params": {"cell": stock_params()["params"]}}
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply(params, xs, rngs={"meprop": jax.random.key(1)})


def test_doctests():
    for module in (mlinen.layers, mlinen.conv):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__
