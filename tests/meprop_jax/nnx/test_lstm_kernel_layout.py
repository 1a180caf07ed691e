"""``meprop_jax.nnx.LSTMCell(kernel_layout="out_in")``: every gate kernel stored transposed.

Same initial values for the same ``rngs`` (transposed), ``to_kernel_layout`` round trips the
cell's state (a stock ``nnx.LSTMCell``'s included), and the cell gives the same outputs and
gradients as the stock layout inside ``nnx.RNN`` and as Linen's transposed cell, in every mode
and with both gate products (the per-row modes with and without the native kernels).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meprop_jax import linen as mlinen
from meprop_jax import nnx as mnnx
from meprop_jax._src import native
from meprop_jax.linen import TRANSPOSED_KERNEL
from tests.meprop_jax.nnx.test_kernel_layout import spy_on_per_row_backward

H = 16  # hidden size: 2 rows of k = 2 leave most of each gate's 16 columns untouched
IN = 5
XS = jax.random.normal(jax.random.key(0), (2, 3, IN))  # [batch, time, in]
Y_W = jax.random.normal(jax.random.key(1), (2, 3, H))  # upstream weights of the outputs
GATES = ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")


def cell(layout, k=2, mode="per_example", fused=True, seed=2):
    return mnnx.LSTMCell(
        IN,
        H,
        k=k,
        mode=mode,
        fused_gates=fused,
        kernel_layout=layout,
        rngs=nnx.Rngs(seed, meprop=3),
    )


def params(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_same_init_and_converters_round_trip():
    stock = nnx.state(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(2)), nnx.Param)
    t_cell = cell("out_in")
    transposed = params(t_cell)
    assert sorted(transposed) == sorted(GATES)
    assert sorted(transposed["ii"]) == [TRANSPOSED_KERNEL]
    assert sorted(transposed["hi"]) == ["bias", TRANSPOSED_KERNEL]
    assert transposed["ii"][TRANSPOSED_KERNEL].shape == (H, IN)
    assert transposed["hi"][TRANSPOSED_KERNEL].shape == (H, H)
    # The gates are dense Linear layers of the same layout: callable, with x @ W.
    x = XS[:, 0]
    assert isinstance(t_cell.if_, mnnx.Linear) and t_cell.if_.kernel_layout == "out_in"
    # Two float32 products of different operand layouts: XLA may sum them in different orders
    # (one ulp apart on some CPUs).
    np.testing.assert_allclose(
        t_cell.if_(x), x @ transposed["if_"][TRANSPOSED_KERNEL].T, rtol=1e-6, atol=1e-7
    )
    # Same rngs, same values: flax's own cell's state converted is the transposed cell's.
    converted = mnnx.to_kernel_layout(stock, "out_in")
    assert_trees_equal(nnx.to_pure_dict(converted), transposed)
    back = mnnx.to_kernel_layout(nnx.state(t_cell, nnx.Param), "in_out")
    assert_trees_equal(nnx.to_pure_dict(back), nnx.to_pure_dict(stock))
    only_input = mnnx.to_kernel_layout(stock, "out_in", where=lambda path: path[-1][0] == "i")
    assert TRANSPOSED_KERNEL in only_input["ii"] and "kernel" in only_input["hi"]


def rnn_loss(rnn, xs):
    return jnp.sum(rnn(xs) * Y_W)


def rnn_grads(model):
    ys = model(XS)
    d_model, d_xs = nnx.grad(rnn_loss, argnums=(0, 1))(model, XS)
    return ys, nnx.to_pure_dict(nnx.filter_state(d_model, nnx.Param)), d_xs


# (mode, fused gate products, native kernels); the per-row modes also on the pure-XLA path.
CASES = [(m, f, True) for m in ("per_example", "unified", "random") for f in (True, False)]
CASES += [("per_example", True, False), ("random", False, False)]


@pytest.mark.parametrize("mode, fused, native_on", CASES)
def test_same_outputs_and_gradients_as_the_stock_layout(mode, fused, native_on):
    stock = nnx.RNN(cell("in_out", mode=mode, fused=fused))
    transposed = nnx.RNN(cell("out_in", mode=mode, fused=fused, seed=9))
    # The stock values, converted (the seeds differ: the update is what makes them equal).
    nnx.update(transposed, mnnx.to_kernel_layout(nnx.state(stock, nnx.Param), "out_in"))
    with contextlib.nullcontext() if native_on else native.disabled():
        ys, grads, d_xs = rnn_grads(stock)
        t_ys, t_grads, t_d_xs = rnn_grads(transposed)
    np.testing.assert_allclose(t_ys, ys, rtol=1e-6, atol=1e-6)
    assert_trees_close(mnnx.to_kernel_layout(t_grads, "in_out"), grads)
    np.testing.assert_allclose(t_d_xs, d_xs, rtol=1e-5, atol=1e-6)
    # The gradients are sparse: some gate columns dropped (else the check proves little).
    dead = np.all(np.asarray(grads["cell"]["hi"]["kernel"]) == 0, axis=0)
    assert dead.any() and not dead.all()


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "xla"])
def test_per_row_backward_gathers_rows_of_the_transposed_kernels(native_on, monkeypatch):
    seen = spy_on_per_row_backward(monkeypatch, native_on)
    with contextlib.nullcontext() if native_on else native.disabled():
        rnn_grads(nnx.RNN(cell("out_in")))
    # The four gates' kernels joined, transposed: [4h, in] (input) and [4h, h] (recurrent).
    assert {("out_in", (4 * H, IN)), ("out_in", (4 * H, H))} <= set(seen)
    assert all(layout == "out_in" for layout, _ in seen)


@pytest.mark.parametrize("k", [0, 50])
def test_dense_k_matches_the_stock_cell(k):
    """Nothing dropped: the transposed cell is flax's own cell, to float rounding."""
    stock = nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(2)))
    transposed = nnx.RNN(cell("out_in", k=k))
    _, grads, d_xs = rnn_grads(stock)
    _, t_grads, t_d_xs = rnn_grads(transposed)
    assert_trees_close(mnnx.to_kernel_layout(t_grads, "in_out"), grads)
    np.testing.assert_allclose(t_d_xs, d_xs, rtol=1e-5, atol=1e-6)


def to_nnx_gates(tree):
    """A Linen cell's tree with NNX's gate names (``if`` is ``if_``)."""
    return {("if_" if name == "if" else name): value for name, value in tree.items()}


@pytest.mark.parametrize("mode, fused, native_on", CASES)
def test_same_outputs_and_gradients_as_linen(mode, fused, native_on):
    """Linen's ``LSTMCell(kernel_layout="out_in")`` and NNX's, same params: one step alike."""
    x, h0 = XS[:, 0], jnp.tanh(Y_W[:, 0])
    carry = (0.5 * h0, h0)
    linen_cell = mlinen.LSTMCell(H, k=2, mode=mode, fused_gates=fused, kernel_layout="out_in")
    variables = linen_cell.init(jax.random.key(4), carry, x)
    nnx_cell = cell("out_in", mode=mode, fused=fused, seed=7)
    nnx.update(nnx_cell, to_nnx_gates(variables["params"]))
    key = jax.random.key(5)
    nnx_key = None
    if mode == "random":  # the key the Linen cell draws
        draw = lambda m: m.make_rng("meprop")
        nnx_key = linen_cell.apply(variables, rngs={"meprop": key}, method=draw)

    def linen_loss(p, x, carry):
        (c, _), h = linen_cell.apply({"params": p}, carry, x, rngs={"meprop": key})
        return jnp.sum(Y_W[:, 1] * h) + jnp.sum(Y_W[:, 2] * c)

    def nnx_loss(module, x, carry):
        (c, _), h = module(carry, x, rngs=nnx_key)
        return jnp.sum(Y_W[:, 1] * h) + jnp.sum(Y_W[:, 2] * c)

    with contextlib.nullcontext() if native_on else native.disabled():
        value, (l_grads, l_dx, l_dcarry) = jax.value_and_grad(linen_loss, (0, 1, 2))(
            variables["params"], x, carry
        )
        n_value, (d_cell, dx, dcarry) = nnx.value_and_grad(nnx_loss, argnums=(0, 1, 2))(
            nnx_cell, x, carry
        )
    np.testing.assert_allclose(n_value, value, rtol=1e-6)
    grads = nnx.to_pure_dict(nnx.filter_state(d_cell, nnx.Param))
    assert_trees_close(grads, to_nnx_gates(l_grads))
    np.testing.assert_allclose(dx, l_dx, rtol=1e-5, atol=1e-6)
    assert_trees_close(dcarry, l_dcarry)
    dead = np.all(np.asarray(grads["hi"][TRANSPOSED_KERNEL]) == 0, axis=1)  # [h] rows
    assert dead.any() and not dead.all()
