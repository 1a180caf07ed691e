"""``LSTMCell(kernel_layout="out_in")``: the stock cell's gates, each kernel stored transposed.

Same initial values for the same key (transposed), ``to_kernel_layout`` round trips the
cell's tree (also inside ``nn.RNN``), and a scanned sequence gives the same outputs and the
same gradients as the stock layout in every mode, with both gate products (the per-row modes
with and without the native kernels), also with meSimp's record, error feedback and adaptive k.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import linen as mlinen
from meprop_jax._src import native
from meprop_jax.linen import TRANSPOSED_KERNEL, to_kernel_layout

H = 16  # hidden size: 6 rows (batch x time) of k = 2 leave some gate columns untouched
IN = 5
# nn.RNN hands the scanned cell only the "params" stream unless told otherwise.
SPLIT = {"params": False, "meprop": True}
XS = jax.random.normal(jax.random.key(0), (2, 3, IN))  # [batch, time, in]
Y_W = jax.random.normal(jax.random.key(1), (2, 3, H))  # upstream weights of the outputs
GATES = ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")


def rnn(layout, k=2, mode="per_example", fused=True):
    cell = mlinen.LSTMCell(H, k=k, mode=mode, fused_gates=fused, kernel_layout=layout)
    return nn.RNN(cell, split_rngs=SPLIT)


def init(model):
    return model.init({"params": jax.random.key(2), "meprop": jax.random.key(3)}, XS)["params"]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_same_init_and_converters_round_trip():
    stock = init(rnn("in_out"))
    transposed = init(rnn("out_in"))
    cell = transposed["cell"]
    assert sorted(cell) == sorted(GATES)
    assert sorted(cell["ii"]) == [TRANSPOSED_KERNEL]
    assert sorted(cell["hi"]) == ["bias", TRANSPOSED_KERNEL]
    assert cell["ii"][TRANSPOSED_KERNEL].shape == (H, IN)
    assert cell["hi"][TRANSPOSED_KERNEL].shape == (H, H)
    # Same key, same values: the stock tree converted is the transposed cell's, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, to_kernel_layout(stock, "out_in"), transposed)
    jax.tree.map(np.testing.assert_array_equal, to_kernel_layout(transposed, "in_out"), stock)
    # The stock tree is flax's own LSTMCell's: a stock checkpoint loads into the new layout.
    flax_cell = nn.RNN(nn.LSTMCell(H)).init(jax.random.key(2), XS)["params"]
    jax.tree.map(np.testing.assert_array_equal, stock, flax_cell)
    only_input = to_kernel_layout(stock, "out_in", where=lambda path: path[-1].startswith("i"))
    assert TRANSPOSED_KERNEL in only_input["cell"]["ii"]
    assert "kernel" in only_input["cell"]["hi"]


def loss(model, params, xs, key):
    ys = model.apply({"params": params}, xs, rngs={"meprop": key})
    return jnp.sum(ys * Y_W)


# (mode, fused gate products, native kernels); the per-row modes also on the pure-XLA path.
CASES = [(m, f, True) for m in ("per_example", "unified", "random") for f in (True, False)]
CASES += [("per_example", True, False), ("random", False, False)]


@pytest.mark.parametrize("mode, fused, native_on", CASES)
def test_same_outputs_and_gradients(mode, fused, native_on):
    with contextlib.nullcontext() if native_on else native.disabled():
        check_same_outputs_and_gradients(mode, fused)


def check_same_outputs_and_gradients(mode, fused):
    stock_model = rnn("in_out", mode=mode, fused=fused)
    t_model = rnn("out_in", mode=mode, fused=fused)
    params = init(stock_model)
    key = jax.random.key(4)
    ys = stock_model.apply({"params": params}, XS, rngs={"meprop": key})
    t_params = to_kernel_layout(params, "out_in")
    t_ys = t_model.apply({"params": t_params}, XS, rngs={"meprop": key})
    np.testing.assert_allclose(t_ys, ys, rtol=1e-6, atol=1e-6)

    grad = jax.grad(loss, (1, 2))
    d_params, d_xs = grad(stock_model, params, XS, key)
    t_d_params, t_d_xs = grad(t_model, t_params, XS, key)
    assert_trees_close(to_kernel_layout(t_d_params, "in_out"), d_params)
    np.testing.assert_allclose(t_d_xs, d_xs, rtol=1e-5, atol=1e-6)
    # The gradients are sparse: some gate columns dropped (else the check proves little).
    dead = np.all(np.asarray(d_params["cell"]["hi"]["kernel"]) == 0, axis=0)
    assert dead.any() and not dead.all()


@pytest.mark.parametrize("k", [0, 50])
def test_dense_k_matches_the_stock_cell(k):
    """Nothing dropped: the transposed cell is flax's own cell, to float rounding."""
    stock_model, t_model = nn.RNN(nn.LSTMCell(H)), rnn("out_in", k=k)
    params = init(stock_model)
    key = jax.random.key(5)
    d_params, d_xs = jax.grad(loss, (1, 2))(stock_model, params, XS, key)
    t_d_params, t_d_xs = jax.grad(loss, (1, 2))(
        t_model, to_kernel_layout(params, "out_in"), XS, key
    )
    assert_trees_close(to_kernel_layout(t_d_params, "in_out"), d_params)
    np.testing.assert_allclose(t_d_xs, d_xs, rtol=1e-5, atol=1e-6)


def test_bad_kernel_layout_raises_naming_it():
    cell = mlinen.LSTMCell(H, k=2, kernel_layout="transposed")
    carry = cell.initialize_carry(jax.random.key(0), XS[:, 0].shape)
    with pytest.raises(ValueError, match="kernel_layout"):
        cell.init(jax.random.key(0), carry, XS[:, 0])


@pytest.mark.parametrize(
    "options",
    [
        {"record": True, "mode": "per_example"},
        {"feedback": 0.5},
        {"adaptive": meprop_jax.AdaptiveK(mass=0.9, k_min=1)},
    ],
    ids=["record", "feedback", "adaptive"],
)
def test_extras_give_the_same_gradients(options):
    """meSimp's record, error feedback and adaptive k: the same taps and gradients (one step)."""
    x, h0 = XS[:, 0], jnp.tanh(Y_W[:, 0])
    carry = (0.5 * h0, h0)

    def grads(layout):
        cell = mlinen.LSTMCell(H, k=3, kernel_layout=layout, **options)
        variables = cell.init(jax.random.key(6), carry, x)
        fixed = {n: v for n, v in variables.items() if n == "mesimp"}  # the mask, not trained
        free = {n: v for n, v in variables.items() if n != "mesimp"}
        loss = lambda free: jnp.sum(Y_W[:, 1] * cell.apply({**free, **fixed}, carry, x)[1])
        return jax.grad(loss)(free)

    stock, transposed = grads("in_out"), grads("out_in")
    transposed["params"] = to_kernel_layout(transposed["params"], "in_out")
    assert_trees_close(transposed, stock)
