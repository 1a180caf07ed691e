"""``Dense(kernel_layout="out_in")``: the same layer as the stock layout, stored transposed.

Same initial values for the same key, same outputs and gradients (per-row and unified modes),
``to_kernel_layout`` round trips, and the compact optimizers train both layouts alike.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax.linen import TRANSPOSED_KERNEL, to_kernel_layout


class MLP(nn.Module):
    layout: str = "in_out"
    k: int = 2
    mode: str = "per_example"
    sparse_update: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = meprop_jax.Dense(
                9,
                k=self.k,
                mode=self.mode,
                sparse_update=self.sparse_update,
                kernel_layout=self.layout,
                name=f"hidden_{i}",
            )(x)
            x = nn.tanh(x)
        return meprop_jax.Dense(3, kernel_layout=self.layout, name="output")(x)


def loss(model, variables, x, y):
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def data(n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, 5)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, 3, n), jnp.int32)


def test_same_init_and_converters_round_trip():
    x, _ = data()
    stock = MLP().init(jax.random.key(0), x)["params"]
    transposed = MLP(layout="out_in").init(jax.random.key(0), x)["params"]
    assert set(transposed["hidden_0"]) == {TRANSPOSED_KERNEL, "bias"}
    assert transposed["hidden_0"][TRANSPOSED_KERNEL].shape == (9, 5)
    converted = to_kernel_layout(stock, "out_in")
    jax.tree.map(np.testing.assert_array_equal, converted, transposed)
    jax.tree.map(np.testing.assert_array_equal, to_kernel_layout(transposed, "in_out"), stock)
    only_output = to_kernel_layout(stock, "out_in", where=lambda path: path == ("output",))
    assert "kernel" in only_output["hidden_0"] and TRANSPOSED_KERNEL in only_output["output"]
    with pytest.raises(ValueError, match="kernel_layout"):
        to_kernel_layout(stock, "transposed")


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
def test_same_outputs_and_gradients(mode):
    x, y = data(6, seed=1)
    stock_model, t_model = MLP(mode=mode), MLP(layout="out_in", mode=mode)
    params = stock_model.init(jax.random.key(1), x)["params"]
    rngs = {"meprop": jax.random.key(2)}
    stock = lambda p: loss(stock_model, {"params": p}, x, y) if mode != "random" else None
    if mode == "random":
        stock = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            stock_model.apply({"params": p}, x, rngs=rngs), y
        ).mean()
        transposed = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            t_model.apply({"params": p}, x, rngs=rngs), y
        ).mean()
    else:
        transposed = lambda p: loss(t_model, {"params": p}, x, y)
    value, grads = jax.value_and_grad(stock)(params)
    t_value, t_grads = jax.value_and_grad(transposed)(to_kernel_layout(params, "out_in"))
    np.testing.assert_allclose(t_value, value, rtol=1e-6)
    back = to_kernel_layout(t_grads, "in_out")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), back, grads)


def _compact_run(layout, tx, steps=4, mode="per_example"):
    """Params (in the stock layout) after ``steps`` compact updates of the layout's MLP."""
    model = MLP(layout=layout, sparse_update=True, mode=mode)
    x, y = data(6)
    variables = model.init({"params": jax.random.key(0), "meprop": jax.random.key(1)}, x)
    state = meprop_jax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        taps=variables[meprop_jax.optim.TAP_COLLECTION],
        tx=meprop_jax.optim.compact(tx),
    )

    @jax.jit
    def step(state, x, y, key):
        def loss_fn(variables):
            logits = state.apply_fn(variables, x, rngs={"meprop": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        _, grads = state.value_and_grad(loss_fn)
        return state.apply_gradients(grads=grads)

    for i in range(steps):
        x, y = data(6, seed=i + 1)
        state = step(state, x, y, jax.random.key(i))
    return to_kernel_layout(state.params, "in_out"), state


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize(
    "tx",
    [
        optax.adam(0.05),
        optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(0.05, weight_decay=0.1)),
        optax.MultiSteps(optax.adagrad(0.1), 2),
    ],
    ids=["adam", "clip+adamw", "multisteps-adagrad"],
)
def test_compact_update_trains_both_layouts_alike(tx, mode):
    stock, _ = _compact_run("in_out", tx, mode=mode)
    transposed, state = _compact_run("out_in", tx, mode=mode)
    assert TRANSPOSED_KERNEL in state.params["hidden_0"]
    assert TRANSPOSED_KERNEL in state.taps["hidden_0"]
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), stock, _compact_run("in_out", tx, 0)[0]
    )
    assert all(jax.tree.leaves(changed["hidden_0"]))  # the steps did train the kernels
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), transposed, stock
    )


def test_compact_state_of_a_transposed_kernel_is_row_major():
    """The optimizer state of a ``kernel_t [out, in]`` stays ``[out, in]`` (no Transposed)."""
    _, state = _compact_run("out_in", optax.adam(0.05), steps=1)
    mu = state.opt_state.inner[0].mu["hidden_0"][TRANSPOSED_KERNEL]
    assert isinstance(mu, jax.Array) and mu.shape == (9, 5)
