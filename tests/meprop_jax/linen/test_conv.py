"""``meprop_jax.Conv``, the Linen layer: the stock layer at k = 0, its forward pass and
sparse backward pass in every padding mode, grouping and mask, and bad arguments."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import linen as mlinen

MODES = ("unified", "per_example", "random")


LAYER_CASES = [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=6, kernel_size=(3, 3), strides=2, padding="VALID", use_bias=False),
    dict(features=8, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
    dict(features=6, kernel_size=(2, 3), padding="CIRCULAR", strides=(1, 2)),
    dict(features=6, kernel_size=(2, 3), padding=((1, 1), (0, 2)), input_dilation=(1, 2)),
    dict(features=8, kernel_size=(3, 3), feature_group_count=2),
    dict(features=6, kernel_size=(3, 3), mask=jnp.triu(jnp.ones((3, 3, 4, 6)))),
]


def _input(fields, batch=(2,)):
    rank = len(fields["kernel_size"])
    return jax.random.normal(jax.random.key(7), (*batch, *([6] * rank), 4))


@pytest.mark.parametrize("fields", LAYER_CASES)
def test_conv_layer_is_the_stock_layer_at_k0(fields):
    x = _input(fields, batch=(2, 3))  # two batch axes, flattened as the stock layer does
    stock, ours = nn.Conv(**fields), meprop_jax.Conv(**fields)
    params = stock.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params
    )
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(0), x), params)
    loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.value_and_grad(loss(ours))(params),
        jax.value_and_grad(loss(stock))(params),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fields", LAYER_CASES)
def test_conv_layer_forward_is_stock_and_backward_sparse(fields, mode):
    x = _input(fields)
    stock = nn.Conv(**fields)
    ours = meprop_jax.Conv(**fields, k=1, mode=mode)
    params = stock.init(jax.random.key(0), x)
    rngs = {"meprop": jax.random.key(5)}
    y = ours.apply(params, x, rngs=rngs)
    np.testing.assert_array_equal(y, stock.apply(params, x))
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x, rngs=rngs))))(params)
    dense = jax.grad(lambda p: jnp.sum(jnp.sin(stock.apply(p, x))))(params)
    kernel = np.asarray(grads["params"]["kernel"])
    channels = np.any(kernel != 0, axis=tuple(range(kernel.ndim - 1)))
    groups = fields.get("feature_group_count", 1)
    assert 0 < channels.sum() < fields["features"]
    if mode == "unified":
        assert channels.sum() == groups
    if "bias" in dense["params"]:
        np.testing.assert_allclose(grads["params"]["bias"], dense["params"]["bias"], rtol=1e-5)


def test_conv_layer_errors():
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(ValueError, match="mode"):
        meprop_jax.Conv(4, (3, 3), k=1, mode="top").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="k must be >= 0"):
        meprop_jax.Conv(4, (3, 3), k=-1).init(jax.random.key(0), x)


def test_doctests():
    result = doctest.testmod(mlinen.conv, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
