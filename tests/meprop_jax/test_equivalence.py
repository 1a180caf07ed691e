"""Linen and NNX layers agree, and the LSTM cells match a hand-written reference.

Linen <-> NNX: a Linen ``Dense`` / ``LSTMCell`` is initialized, its parameters are copied into
the NNX module, and outputs and gradients are compared. Random mode feeds both the same key:
the Linen layer draws ``make_rng("meprop")``, which ``KeyProbe`` reproduces, and the NNX layer
takes that key as its ``rngs=`` call argument.

Reference: a plain-JAX LSTM cell, independent of ``meprop_jax._src.linear``, whose gate
pre-activation ``x W_i + h W_h`` passes through a ``custom_vjp`` identity that masks its
cotangent per gate by the top-k rule (the bias, added afterwards, keeps the dense gradient).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax

import meprop_jax
from meprop_jax import linen as mlinen
from meprop_jax import nnx as mnnx

MODES = ("unified", "per_example", "random")
# Shapes match the docstring examples and the other test files, so compiled ops are shared.
IN, OUT, H = 5, 4, 8
LINEN_GATES = ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")


class KeyProbe(nn.Module):
    """The key a top-level Linen module's first ``make_rng("meprop")`` returns."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("meprop")


def probe_key(rng: jax.Array) -> jax.Array:
    return KeyProbe().apply({}, rngs={"meprop": rng})


def normal(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


# ------------------------------------------------------------------------ Dense <-> Linear

X = normal(0, (3, IN))
W_OUT = normal(1, (3, OUT))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 3])
def test_dense_and_linear_agree(k, mode):
    rng = jax.random.key(4)
    dense = meprop_jax.Dense(OUT, k=k, mode=mode)
    params = dense.init({"params": jax.random.key(2), "meprop": rng}, X)
    linear = mnnx.Linear(IN, OUT, k=k, mode=mode, rngs=nnx.Rngs(0))
    linear.kernel[...] = params["params"]["kernel"]
    linear.bias[...] = params["params"]["bias"]
    key = probe_key(rng)

    def loss_linen(p, x):
        return jnp.sum(dense.apply(p, x, rngs={"meprop": rng}) * W_OUT)

    def loss_nnx(m, x):
        return jnp.sum(m(x, rngs=key) * W_OUT)

    assert_trees_close(dense.apply(params, X, rngs={"meprop": rng}), linear(X, rngs=key))
    g_linen, dx_linen = jax.grad(loss_linen, (0, 1))(params, X)
    g_nnx, dx_nnx = nnx.grad(loss_nnx, argnums=(0, 1))(linear, X)
    assert_trees_close(g_linen["params"], nnx.to_pure_dict(g_nnx))
    assert_trees_close(dx_linen, dx_nnx)


# ------------------------------------------------------------------ LSTMCell <-> LSTMCell

XS = normal(3, (3, 3, IN))  # [time, batch, in]
CARRY = (normal(5, (3, H)), normal(4, (3, H)))  # (c, h)
Y_W = normal(6, (3, 3, H))
STEP_RNGS = jax.random.split(jax.random.key(11), 3)


@functools.cache
def lstm_params():
    return nn.LSTMCell(H).init(jax.random.key(7), CARRY, XS[0])["params"]


@functools.cache
def step_keys():
    return [probe_key(r) for r in STEP_RNGS]


def nnx_name(linen_name: str) -> str:
    return "if_" if linen_name == "if" else linen_name


def to_linen_names(nnx_tree: dict) -> dict:
    return {name: nnx_tree[nnx_name(name)] for name in LINEN_GATES}


def run_linen(cell, params, xs, carry):
    """Output loss of three top-level steps, step ``t`` drawing from ``STEP_RNGS[t]``."""
    loss = jnp.zeros((), jnp.float32)
    for t in range(xs.shape[0]):
        carry, y = cell.apply({"params": params}, carry, xs[t], rngs={"meprop": STEP_RNGS[t]})
        loss = loss + jnp.sum(y * Y_W[t])
    return loss + jnp.sum(carry[0] * carry[1])


def run_nnx(cell, xs, carry):
    loss = jnp.zeros((), jnp.float32)
    for t, key in enumerate(step_keys()):
        carry, y = cell(carry, xs[t], rngs=key)
        loss = loss + jnp.sum(y * Y_W[t])
    return loss + jnp.sum(carry[0] * carry[1])


def nnx_cell(k: int, mode: str):
    cell = mnnx.LSTMCell(IN, H, k=k, mode=mode, rngs=nnx.Rngs(0))
    for name, p in lstm_params().items():
        gate = getattr(cell, nnx_name(name))
        gate.kernel[...] = p["kernel"]
        if "bias" in p:
            gate.bias[...] = p["bias"]
    return cell


def linen_grads(k: int, mode: str):
    cell = mlinen.LSTMCell(H, k=k, mode=mode)
    return jax.grad(functools.partial(run_linen, cell), (0, 1, 2))(lstm_params(), XS, CARRY)


def nnx_grads(k: int, mode: str):
    g, dxs, dcarry = nnx.grad(run_nnx, argnums=(0, 1, 2))(nnx_cell(k, mode), XS, CARRY)
    return to_linen_names(nnx.to_pure_dict(g)), dxs, dcarry


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 3])
def test_lstm_cells_agree(k, mode):
    linen_cell = mlinen.LSTMCell(H, k=k, mode=mode)
    out_linen = linen_cell.apply(
        {"params": lstm_params()}, CARRY, XS[0], rngs={"meprop": STEP_RNGS[0]}
    )
    assert_trees_close(out_linen, nnx_cell(k, mode)(CARRY, XS[0], rngs=step_keys()[0]))
    assert_trees_close(linen_grads(k, mode), nnx_grads(k, mode), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ reference


def gate_mask(g: jax.Array, k: int, mode: str, key: jax.Array) -> jax.Array:
    """``[batch, 4h]`` bool: ``k`` kept entries in each gate block of every row."""
    batch, four_h = g.shape
    h = four_h // 4
    columns = jnp.arange(h)
    if mode == "unified":
        # One column set per gate, ranked by sum |g| over the batch.
        _, idx = lax.top_k(jnp.sum(jnp.abs(g), axis=0).reshape(4, h), k)  # [4, k]
        keep = jnp.any(columns[None, None, :] == idx[:, :, None], axis=1)  # [4, h]
        return jnp.broadcast_to(keep.reshape(1, four_h), g.shape)
    # Per row: the k largest |g|, or the k largest of uniform noise (a uniform k-subset).
    scores = jnp.abs(g) if mode == "per_example" else jax.random.uniform(key, g.shape)
    _, idx = lax.top_k(scores.reshape(batch, 4, h), k)  # [batch, 4, k]
    keep = jnp.any(columns == idx[..., None], axis=-2)  # [batch, 4, h]
    return keep.reshape(batch, four_h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sparsify_grad(z: jax.Array, k: int, mode: str, key: jax.Array) -> jax.Array:
    return z


def _sparsify_fwd(z, k, mode, key):
    return z, key


def _sparsify_bwd(k, mode, key, g):
    return jnp.where(gate_mask(g, k, mode, key), g, jnp.zeros_like(g)), None


sparsify_grad.defvjp(_sparsify_fwd, _sparsify_bwd)


def reference_cell(params, carry, x, k, mode, key):
    c, h = carry
    w_i = jnp.concatenate([params[n]["kernel"] for n in LINEN_GATES[:4]], axis=1)
    w_h = jnp.concatenate([params[n]["kernel"] for n in LINEN_GATES[4:]], axis=1)
    b = jnp.concatenate([params[n]["bias"] for n in LINEN_GATES[4:]])
    z = sparsify_grad(x @ w_i + h @ w_h, k, mode, key) + b
    z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
    new_c = jax.nn.sigmoid(z_f) * c + jax.nn.sigmoid(z_i) * jnp.tanh(z_g)
    new_h = jax.nn.sigmoid(z_o) * jnp.tanh(new_c)
    return (new_c, new_h), new_h


def run_reference(k, mode, params, xs, carry):
    loss = jnp.zeros((), jnp.float32)
    for t, key in enumerate(step_keys()):
        carry, y = reference_cell(params, carry, xs[t], k, mode, key)
        loss = loss + jnp.sum(y * Y_W[t])
    return loss + jnp.sum(carry[0] * carry[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [3, H])
def test_lstm_grads_match_masked_reference(k, mode):
    """Three steps: every step's gate gradient is masked per gate, and nothing else changes."""
    reference = jax.grad(functools.partial(run_reference, k, mode), (0, 1, 2))(
        lstm_params(), XS, CARRY
    )
    assert_trees_close(linen_grads(k, mode), reference, rtol=1e-5, atol=1e-6)
    assert_trees_close(nnx_grads(k, mode), reference, rtol=1e-5, atol=1e-6)
    stock = jax.grad(functools.partial(run_linen, nn.LSTMCell(H)), (0, 1, 2))(
        lstm_params(), XS, CARRY
    )
    if k >= H:  # nothing masked: the reference is the stock cell
        assert_trees_close(reference, stock, rtol=1e-5, atol=1e-6)
    else:  # not vacuous
        assert not np.allclose(reference[0]["ii"]["kernel"], stock[0]["ii"]["kernel"])
