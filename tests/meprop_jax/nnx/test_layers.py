"""NNX layers: ``meprop_jax.nnx.Linear`` and ``meprop_jax.nnx.LSTMCell``.

Stock parity (parameter state, initial values, ``k = 0`` outputs and gradients, bit for bit),
sparsified gradients against the functional ``meprop_jax.linear``, the RNG stream of random
mode, construction-time validation, and use inside ``nnx.RNN`` / ``nnx.Bidirectional``.
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import meprop_jax
from meprop_jax import nnx as mnnx

MODES = ("unified", "per_example", "random")


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def params_of(module: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def test_exported():
    assert meprop_jax.nnx is mnnx
    assert meprop_jax.LSTMCell is meprop_jax.linen.LSTMCell


# ------------------------------------------------------------------------------------ Linear

# Shapes match the docstring examples, so their compiled ops are shared.
IN, OUT = 5, 4
X = normal(0, (3, IN))
W_OUT = normal(1, (3, OUT))  # upstream weights: makes g = dL/dy non-uniform


def linear_loss(layer, x, **kwargs):
    return jnp.sum(layer(x, **kwargs) * W_OUT)


@pytest.mark.parametrize(
    "kwargs", [{}, {"k": 2}, {"k": 2, "mode": "random"}, {"k": 2, "use_bias": False}]
)
def test_linear_params_match_stock(kwargs):
    ours = mnnx.Linear(IN, OUT, rngs=nnx.Rngs(0), **kwargs)
    stock = nnx.Linear(IN, OUT, use_bias=kwargs.get("use_bias", True), rngs=nnx.Rngs(0))
    # Random mode forks its stream only after drawing the parameters: same values as stock.
    assert_trees_equal(params_of(ours), params_of(stock))
    assert isinstance(ours, nnx.Linear)
    assert (ours.meprop_rngs is not None) == (kwargs.get("mode") == "random")


@pytest.mark.parametrize("k", [0, OUT, 100])
def test_linear_dense_k_is_stock_bit_for_bit(k):
    ours = mnnx.Linear(IN, OUT, k=k, rngs=nnx.Rngs(0))
    stock = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours(X), stock(X))
    grad = nnx.grad(linear_loss, argnums=(0, 1))
    (g_ours, dx_ours), (g_stock, dx_stock) = grad(ours, X), grad(stock, X)
    assert_trees_equal(nnx.to_pure_dict(g_ours), nnx.to_pure_dict(g_stock))
    np.testing.assert_array_equal(dx_ours, dx_stock)


@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_linear_grads_equal_functional_linear(mode, sparse_bias):
    layer = mnnx.Linear(IN, OUT, k=2, mode=mode, sparse_bias=sparse_bias, rngs=nnx.Rngs(0))
    key = jax.random.key(9)
    loss = lambda m, x: linear_loss(m, x, rngs=key)
    g_layer, dx_layer = nnx.grad(loss, argnums=(0, 1))(layer, X)

    def loss_fn(p, x):
        y = meprop_jax.linear(
            x, p["kernel"], p["bias"], k=2, mode=mode, key=key, sparse_bias=sparse_bias
        )
        return jnp.sum(y * W_OUT)

    g_fn, dx_fn = jax.grad(loss_fn, (0, 1))(params_of(layer), X)
    assert_trees_equal(nnx.to_pure_dict(g_layer), g_fn)
    np.testing.assert_array_equal(dx_layer, dx_fn)
    dense = jax.grad(lambda p: jnp.sum((X @ p["kernel"] + p["bias"]) * W_OUT))(g_fn)
    assert not np.allclose(g_fn["kernel"], dense["kernel"])  # not vacuous


def test_linear_random_stream():
    """The kept stream is a fork of ``rngs["meprop"]``; every call draws the next key."""

    def build():
        return mnnx.Linear(IN, OUT, k=1, mode="random", rngs=nnx.Rngs(0, meprop=5))

    def kernel_grad(layer, rngs=None):
        # rngs is an argument, not a closure: NNX objects may only be mutated at their own level
        grad = nnx.grad(lambda m, r: linear_loss(m, X, rngs=r))
        return grad(layer, rngs)["kernel"][...]

    stream = nnx.Rngs(0, meprop=5).meprop.fork()
    layer = build()
    first = kernel_grad(layer)
    np.testing.assert_array_equal(first, kernel_grad(build(), rngs=stream()))
    second = kernel_grad(layer)  # the stream moved on
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, kernel_grad(build(), rngs=stream()))
    # A call argument wins over the kept stream, whatever its type.
    by_key = kernel_grad(layer, rngs=nnx.Rngs(meprop=3).meprop())
    np.testing.assert_array_equal(by_key, kernel_grad(layer, rngs=nnx.Rngs(meprop=3).meprop))
    np.testing.assert_array_equal(by_key, kernel_grad(layer, rngs=nnx.Rngs(meprop=3)))
    with pytest.raises(TypeError):
        layer(X, rngs=3)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": -1}, ValueError),
        ({"k": 1.5}, TypeError),
        ({"k": True}, TypeError),
        ({"mode": "top"}, ValueError),
        ({"k": 2, "dot_general": lambda *a, **kw: jax.lax.dot_general(*a, **kw)}, ValueError),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error):
    with pytest.raises(error):
        mnnx.Linear(IN, OUT, rngs=nnx.Rngs(0), **kwargs)
    if "dot_general" not in kwargs:
        with pytest.raises(error):
            mnnx.LSTMCell(IN, 8, rngs=nnx.Rngs(0), **kwargs)


def test_linear_per_example_mode_alias_and_dense_dot_general_hook():
    assert mnnx.Linear(IN, OUT, k=2, mode="per-example", rngs=nnx.Rngs(0)).mode == "per_example"
    hook = lambda *a, **kw: jax.lax.dot_general(*a, **kw)
    layer = mnnx.Linear(IN, OUT, dot_general=hook, rngs=nnx.Rngs(0))  # fine when k = 0
    np.testing.assert_array_equal(layer(X), nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))(X))


def test_linear_bfloat16():
    layer = mnnx.Linear(
        IN, OUT, k=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    x = X.astype(jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    stock = nnx.Linear(IN, OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(y, stock(x))
    w = W_OUT.astype(jnp.bfloat16)
    grads = nnx.grad(lambda m: jnp.sum((m(x) * w).astype(jnp.float32)))(layer)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    kernel_grad = np.asarray(grads["kernel"][...], np.float32)
    assert np.all(np.isfinite(kernel_grad))
    assert np.sum(np.any(kernel_grad != 0, axis=0)) == 2  # unified: two columns survive


def test_linear_out_sharding():
    """With sparsified backprop the output is resharded to ``out_sharding``."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    layer = mnnx.Linear(IN, OUT, k=2, rngs=nnx.Rngs(0))
    x = jnp.tile(X, (8, 1))  # [24, in]: three rows per device
    w = jnp.tile(W_OUT, (8, 1))
    loss = lambda m, x, spec: jnp.sum(m(x, out_sharding=spec) * w)
    expected = nnx.grad(loss)(layer, x, None)["kernel"][...]
    with jax.set_mesh(mesh):
        x_sharded = jax.device_put(x, P("data", None))
        assert layer(x_sharded, out_sharding=P("data", None)).sharding.spec == P("data", None)
        got = nnx.grad(loss)(layer, x_sharded, P("data", None))["kernel"][...]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- LSTMCell

H = 8  # hidden size
XS = normal(3, (3, 3, IN))  # [time, batch, in]
CARRY = (normal(5, (3, H)), normal(4, (3, H)))  # (c, h)
Y_W = normal(6, (3, 3, H))  # upstream weights of the per-step outputs
GATES = ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")


def unrolled_loss(cell, xs, carry):
    loss = jnp.zeros((), jnp.float32)
    for t in range(xs.shape[0]):
        carry, y = cell(carry, xs[t])
        loss = loss + jnp.sum(y * Y_W[t])
    return loss + jnp.sum(carry[0] * carry[1])


@pytest.mark.parametrize("kwargs", [{}, {"k": 2}, {"k": 2, "mode": "random"}])
def test_lstm_params_and_carry_match_stock(kwargs):
    ours = mnnx.LSTMCell(IN, H, rngs=nnx.Rngs(0), **kwargs)
    stock = nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0))
    assert sorted(params_of(ours)) == sorted(GATES)
    assert sorted(params_of(ours)["ii"]) == ["kernel"]
    assert sorted(params_of(ours)["hi"]) == ["bias", "kernel"]
    assert_trees_equal(params_of(ours), params_of(stock))
    assert_trees_equal(
        ours.initialize_carry((3, IN), nnx.Rngs(1)), stock.initialize_carry((3, IN), nnx.Rngs(1))
    )
    assert ours.num_feature_axes == 1


@pytest.mark.parametrize("k", [0, H, 50])
def test_lstm_dense_k_is_stock_bit_for_bit(k):
    ours = mnnx.LSTMCell(IN, H, k=k, rngs=nnx.Rngs(0))
    stock = nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0))
    grad = nnx.grad(unrolled_loss, argnums=(0, 1, 2))
    g_ours, g_stock = grad(ours, XS, CARRY), grad(stock, XS, CARRY)
    assert_trees_equal(nnx.to_pure_dict(g_ours[0]), nnx.to_pure_dict(g_stock[0]))
    assert_trees_equal(g_ours[1:], g_stock[1:])


@pytest.mark.parametrize("mode", MODES)
def test_lstm_sparse_forward_matches_stock(mode):
    ours = mnnx.LSTMCell(IN, H, k=2, mode=mode, rngs=nnx.Rngs(0))
    stock = nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        ours(CARRY, XS[0]),
        stock(CARRY, XS[0]),
    )


@pytest.mark.parametrize("mode", MODES)
def test_lstm_one_step_keeps_k_per_gate(mode):
    k = 2
    cell = mnnx.LSTMCell(IN, H, k=k, mode=mode, rngs=nnx.Rngs(0))

    def loss(m):
        (c, h), _ = m(CARRY, XS[0])
        return jnp.sum(c * Y_W[0]) + jnp.sum(h * Y_W[1])

    grads = nnx.to_pure_dict(nnx.grad(loss)(cell))
    for name in GATES:
        live = int(np.sum(np.any(np.asarray(grads[name]["kernel"]) != 0, axis=0)))
        assert live == k if mode == "unified" else k <= live <= 3 * k
        if name[0] == "h":  # dense bias gradient by default
            assert np.all(np.asarray(grads[name]["bias"]) != 0)


# --------------------------------------------------------------------- nnx.RNN, Bidirectional


def rnn_loss(model, xs):
    y = model(xs)
    return jnp.sum(y * jnp.ones_like(y).cumsum(-1))


@nnx.jit
def rnn_grads(model, xs):
    return nnx.grad(rnn_loss, argnums=(0, 1))(model, xs)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def build_rnn(bidirectional: bool, seed: int = 0):
    if bidirectional:
        # Two scans, two modes: compiling one scan per mode would double the test time.
        cell = lambda mode: mnnx.LSTMCell(IN, H, k=2, mode=mode, rngs=nnx.Rngs(seed))
        return nnx.Bidirectional(nnx.RNN(cell("unified")), nnx.RNN(cell("per_example")))
    return nnx.RNN(mnnx.LSTMCell(IN, H, k=2, mode="random", rngs=nnx.Rngs(seed, meprop=7)))


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidi-unified-per_ex", "random"])
def test_rnn_and_bidirectional_jit_grad(bidirectional):
    xs = jnp.swapaxes(XS, 0, 1)  # [batch, time, in]
    model = build_rnn(bidirectional)
    g1, dx1 = rnn_grads(model, xs)
    assert jax.tree.structure(nnx.to_pure_dict(g1)) == jax.tree.structure(params_of(model))
    assert np.all(np.isfinite(flat(nnx.to_pure_dict(g1)))) and np.all(np.isfinite(dx1))
    g2, _ = rnn_grads(model, xs)  # the random cell's stream has moved on
    assert np.array_equal(flat(g1), flat(g2)) == bidirectional
    # A fresh model with the same seeds repeats the first call.
    assert_trees_equal(
        nnx.to_pure_dict(rnn_grads(build_rnn(bidirectional), xs)[0]), nnx.to_pure_dict(g1)
    )


def test_doctests():
    names = ("layers", "conv", "optimizer", "sparsify")
    for module in (importlib.import_module(f"meprop_jax.nnx.{name}") for name in names):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__
