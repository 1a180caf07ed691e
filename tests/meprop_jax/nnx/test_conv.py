"""``meprop_jax.nnx.Conv``: the stock layer at k = 0, and the Linen layer's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meprop_jax
from meprop_jax import nnx as mnnx


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_nnx_conv_matches_stock_and_linen(k, mode):
    fields = dict(strides=2, padding="CIRCULAR", feature_group_count=2)
    x = jax.random.normal(jax.random.key(7), (3, 7, 7, 4))
    stock = nnx.Conv(4, 8, (3, 3), **fields, rngs=nnx.Rngs(0))
    ours = mnnx.Conv(4, 8, (3, 3), **fields, k=k, mode=mode, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(stock, nnx.Param))
    assert_trees_equal(nnx.to_pure_dict(nnx.state(ours, nnx.Param)), params)
    np.testing.assert_array_equal(ours(x), stock(x))
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    grads = nnx.to_pure_dict(nnx.grad(loss)(ours))
    if k == 0:
        assert_trees_equal(grads, nnx.to_pure_dict(nnx.grad(loss)(stock)))
        return
    linen = meprop_jax.Conv(8, (3, 3), **fields, k=k, mode=mode)
    linen_loss = lambda p: jnp.sum(jnp.sin(linen.apply({"params": p}, x)))
    assert_trees_equal(grads, jax.grad(linen_loss)(params))
    if mode == "unified":  # k channels in each of the 2 groups
        assert np.any(grads["kernel"] != 0, axis=(0, 1, 2)).sum() == 2 * k


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
