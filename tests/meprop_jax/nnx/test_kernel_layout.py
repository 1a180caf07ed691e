"""``meprop_jax.nnx.Linear(kernel_layout="out_in")``: the stock layer, its kernel stored transposed.

Same initial values for the same ``rngs`` (transposed), ``to_kernel_layout`` round trips NNX
states (a stock ``nnx.Linear`` model's included), the same outputs and gradients as the stock
layout and as Linen's ``Dense(kernel_layout="out_in")`` in every mode (the per-row modes with
and without the native kernels), and :class:`meprop_jax.nnx.Optimizer` trains both layouts
alike.
"""

import contextlib
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meprop_jax
from meprop_jax import nnx as mnnx
from meprop_jax import optim
from meprop_jax._src import native, rowwise
from meprop_jax.linen import TRANSPOSED_KERNEL

# 6 rows of k = 2: 12 columns leave some of HIDDEN's untouched and cover NARROW's.
IN, HIDDEN, NARROW, OUT = 5, 16, 8, 3
MODES = ("per_example", "unified", "random")


class MLP(nnx.Module):
    """Two sparse hidden layers and a dense output layer, all in ``layout``.

    The per-row modes take the compact weight gradient in the first hidden layer and the full
    products of the masked gradient in the second, whose columns the rows cover.
    """

    def __init__(self, rngs, layout="in_out", mode="per_example", k=2, sparse_update=False):
        def layer(i, o, k):
            return mnnx.Linear(
                i, o, k=k, mode=mode, sparse_update=sparse_update, kernel_layout=layout, rngs=rngs
            )

        self.hidden = nnx.List([layer(IN, HIDDEN, k), layer(HIDDEN, NARROW, k)])
        self.output = layer(NARROW, OUT, 0)

    def __call__(self, x, keys=(None, None)):
        for layer, key in zip(self.hidden, keys, strict=True):
            x = nnx.tanh(layer(x, rngs=key))
        return self.output(x)


class StockMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.List(
            [nnx.Linear(IN, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, NARROW, rngs=rngs)]
        )
        self.output = nnx.Linear(NARROW, OUT, rngs=rngs)


def data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, IN)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, OUT, n), jnp.int32)


def params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_same_init_and_converters_round_trip():
    stock = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    t_model = MLP(nnx.Rngs(0), layout="out_in")
    transposed = nnx.state(t_model, nnx.Param)
    assert sorted(transposed["hidden"][0]) == ["bias", TRANSPOSED_KERNEL]
    assert t_model.hidden[0].kernel_t.shape == (HIDDEN, IN)
    assert not hasattr(t_model.hidden[0], "kernel")
    # Same rngs, same values: the stock state converted is the transposed model's, bit for bit.
    converted = mnnx.to_kernel_layout(stock, "out_in")
    assert isinstance(converted, nnx.State)
    assert type(converted["hidden"][0][TRANSPOSED_KERNEL]) is nnx.Param
    assert_trees_equal(nnx.to_pure_dict(converted), nnx.to_pure_dict(transposed))
    back = mnnx.to_kernel_layout(transposed, "in_out")
    assert_trees_equal(nnx.to_pure_dict(back), nnx.to_pure_dict(stock))
    # Pure dicts convert too, into pure dicts.
    pure = mnnx.to_kernel_layout(nnx.to_pure_dict(stock), "out_in")
    assert_trees_equal(pure, nnx.to_pure_dict(transposed))
    only_output = mnnx.to_kernel_layout(stock, "out_in", where=lambda path: path == ("output",))
    assert "kernel" in only_output["hidden"][0] and TRANSPOSED_KERNEL in only_output["output"]
    with pytest.raises(ValueError, match="kernel_layout"):
        mnnx.to_kernel_layout(stock, "transposed")


def test_doctests():
    result = doctest.testmod(mnnx.layout, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_stock_state_loads_into_the_transposed_model():
    """A stock ``nnx.Linear`` model's state, converted, is the transposed model's state."""
    stock = StockMLP(nnx.Rngs(3))
    model = MLP(nnx.Rngs(0), layout="out_in")
    nnx.update(model, mnnx.to_kernel_layout(nnx.state(stock, nnx.Param), "out_in"))
    np.testing.assert_array_equal(model.hidden[1].kernel_t[...], stock.hidden[1].kernel[...].T)
    x, _ = data()
    h = x
    for layer in stock.hidden:
        h = nnx.tanh(layer(h))
    np.testing.assert_allclose(model(x), stock.output(h), rtol=1e-6, atol=1e-6)


def test_sharding_metadata_is_transposed():
    meta = {"out_sharding": ("data", "model"), "eager_sharding": False}
    layer = mnnx.Linear(IN, OUT, kernel_layout="out_in", kernel_metadata=meta, rngs=nnx.Rngs(0))
    assert layer.kernel_t.get_metadata()["out_sharding"] == ("model", "data")
    back = mnnx.to_kernel_layout(nnx.state(layer), "in_out")
    assert back["kernel"].get_metadata()["out_sharding"] == ("data", "model")


@pytest.mark.parametrize("bad", ["transposed", None, ("out", "in")])
def test_bad_kernel_layout_raises_naming_it(bad):
    with pytest.raises(ValueError, match="kernel_layout"):
        mnnx.Linear(IN, OUT, k=2, kernel_layout=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_layout"):
        mnnx.LSTMCell(IN, OUT, k=2, kernel_layout=bad, rngs=nnx.Rngs(0))


def test_dot_general_hook_is_refused_in_the_transposed_layout():
    with pytest.raises(ValueError, match=r"kernel_layout=.out_in. does not take a dot_general"):
        mnnx.Linear(IN, OUT, kernel_layout="out_in", dot_general=jnp.dot, rngs=nnx.Rngs(0))


def loss(model, x, y, keys):
    return optax.softmax_cross_entropy_with_integer_labels(model(x, keys), y).mean()


def value_and_grads(model, x, y, keys):
    grad_fn = nnx.value_and_grad(loss, argnums=(0, 1))
    value, (d_model, d_x) = grad_fn(model, x, y, keys)
    return value, nnx.to_pure_dict(nnx.filter_state(d_model, nnx.Param)), d_x


# (mode, native kernels); the per-row modes also on the pure-XLA path.
CASES = [(m, True) for m in MODES] + [("per_example", False), ("random", False)]


@pytest.mark.parametrize("mode, native_on", CASES)
def test_same_outputs_and_gradients_as_the_stock_layout(mode, native_on):
    x, y = data(seed=1)
    keys = tuple(jax.random.split(jax.random.key(2))) if mode == "random" else (None, None)
    stock = MLP(nnx.Rngs(1), mode=mode)
    transposed = MLP(nnx.Rngs(5), layout="out_in", mode=mode)
    nnx.update(transposed, mnnx.to_kernel_layout(nnx.state(stock, nnx.Param), "out_in"))
    with contextlib.nullcontext() if native_on else native.disabled():
        value, grads, d_x = value_and_grads(stock, x, y, keys)
        t_value, t_grads, t_d_x = value_and_grads(transposed, x, y, keys)
    np.testing.assert_allclose(t_value, value, rtol=1e-6)
    assert_trees_close(mnnx.to_kernel_layout(t_grads, "in_out"), grads)
    np.testing.assert_allclose(t_d_x, d_x, rtol=1e-5, atol=1e-6)
    # The gradients are sparse: some columns dropped (else the check proves little).
    dead = np.all(np.asarray(grads["hidden"][0]["kernel"]) == 0, axis=0)
    assert dead.any() and not dead.all()


def spy_on_per_row_backward(monkeypatch, native_on):
    """Records ``(kernel_layout, kernel shape)`` of every per-row backward product."""
    seen = []
    if native_on:
        real_native = rowwise.native_backward

        def native_spy(xs, kernels, g, scores, k, groups, layout, *args, **kwargs):
            seen.extend((layout, w.shape) for w in kernels)
            return real_native(xs, kernels, g, scores, k, groups, layout, *args, **kwargs)

        monkeypatch.setattr(rowwise, "native_backward", native_spy)
    else:
        real_xla = rowwise.gathered_input_grad

        def xla_spy(g_kept, idx, kernel, kernel_layout, *args):
            seen.append((kernel_layout, kernel.shape))
            return real_xla(g_kept, idx, kernel, kernel_layout, *args)

        monkeypatch.setattr(rowwise, "gathered_input_grad", xla_spy)
    return seen


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "xla"])
def test_per_row_backward_gathers_rows_of_the_transposed_kernel(native_on, monkeypatch):
    seen = spy_on_per_row_backward(monkeypatch, native_on)
    model = MLP(nnx.Rngs(0), layout="out_in")
    x, y = data()
    with contextlib.nullcontext() if native_on else native.disabled():
        value_and_grads(model, x, y, (None, None))
    assert ("out_in", (HIDDEN, IN)) in seen
    assert all(layout == "out_in" for layout, _ in seen)


def linen_key(layer, variables, key):
    """The key a Linen layer draws in ``mode="random"`` when applied with ``{"meprop": key}``."""
    return layer.apply(variables, rngs={"meprop": key}, method=lambda m: m.make_rng("meprop"))


@pytest.mark.parametrize("mode, native_on", CASES)
def test_same_outputs_and_gradients_as_linen(mode, native_on):
    """Linen's ``Dense(kernel_layout="out_in")`` and NNX's, same params: same everything."""
    x, _ = data(seed=4)
    w_y = jax.random.normal(jax.random.key(8), (x.shape[0], HIDDEN))  # weights of the outputs
    dense = meprop_jax.Dense(HIDDEN, k=2, mode=mode, kernel_layout="out_in")
    variables = dense.init(jax.random.key(0), x)
    linear = mnnx.Linear(IN, HIDDEN, k=2, mode=mode, kernel_layout="out_in", rngs=nnx.Rngs(7))
    nnx.update(linear, variables["params"])
    key = jax.random.key(3)
    nnx_key = linen_key(dense, variables, key) if mode == "random" else None

    def linen_loss(p, x):
        return jnp.sum(w_y * dense.apply({"params": p}, x, rngs={"meprop": key}))

    def nnx_loss(layer, x):
        return jnp.sum(w_y * layer(x, rngs=nnx_key))

    with contextlib.nullcontext() if native_on else native.disabled():
        y = dense.apply(variables, x, rngs={"meprop": key})
        l_grads, l_d_x = jax.grad(linen_loss, (0, 1))(variables["params"], x)
        d_layer, d_x = nnx.grad(nnx_loss, argnums=(0, 1))(linear, x)
        np.testing.assert_allclose(linear(x, rngs=nnx_key), y, rtol=1e-6, atol=1e-6)
    grads = nnx.to_pure_dict(nnx.filter_state(d_layer, nnx.Param))
    assert sorted(grads) == ["bias", TRANSPOSED_KERNEL]
    assert_trees_close(grads, dict(l_grads))
    np.testing.assert_allclose(d_x, l_d_x, rtol=1e-5, atol=1e-6)
    dead = np.all(np.asarray(grads[TRANSPOSED_KERNEL]) == 0, axis=1)  # [out] rows
    assert dead.any() and not dead.all()


@nnx.jit
def compact_step(model, optimizer, x, y, keys):
    _, grads = optimizer.value_and_grad(model, loss, x, y, keys)
    optimizer.update(model, grads)


def compact_run(layout, tx, mode, steps=4):
    """Params (in the stock layout) after ``steps`` compact updates, and the optimizer."""
    model = MLP(nnx.Rngs(0), layout=layout, mode=mode, sparse_update=True)
    optimizer = mnnx.Optimizer(model, tx)
    for i in range(steps):
        x, y = data(seed=i + 1)
        compact_step(model, optimizer, x, y, (None, None))
    return nnx.to_pure_dict(mnnx.to_kernel_layout(nnx.state(model, nnx.Param), "in_out")), optimizer


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize(
    "tx",
    [
        optim.sparse_adam(0.05),
        optim.compact(optax.adam(0.05), lazy=False),
    ],
    ids=["sparse_adam", "adam-masked"],
)
def test_compact_update_trains_both_layouts_alike(tx, mode):
    stock, _ = compact_run("in_out", tx, mode)
    transposed, optimizer = compact_run("out_in", tx, mode)
    # The transposed kernel's optimizer state stays [out, in]: its columns are rows.
    mu = optimizer.opt_state.inner[0].mu["hidden"][0][TRANSPOSED_KERNEL][...]
    assert mu.shape == (HIDDEN, IN)
    initial, _ = compact_run("in_out", tx, mode, steps=0)
    moved = np.any(stock["hidden"][0]["kernel"] != initial["hidden"][0]["kernel"], axis=0)
    assert moved.any()  # the steps did train the kernels
    assert_trees_close(transposed, stock, rtol=2e-5, atol=2e-6)
