"""``meprop_jax.sparsify`` of a stock Flax Linen Transformer encoder.

The encoder (token and learned position embeddings, pre-norm blocks of
``nn.MultiHeadDotProductAttention`` and a two-layer MLP, a per-token output layer) is
converted whole: the forward pass is the stock one bit for bit, eagerly and under ``jit``;
every projection (query, key, value, the two-axis output projection, the MLP) has its ``k`` in
the report while the embeddings and LayerNorms stay dense; the attention projections'
gradients keep ``k`` entries of the flattened ``heads * head_dim`` features (or ``k`` per head
with ``per_head=True``); and ``sparse_update`` refuses them by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from tests.helpers import forward_products
from tests.meprop_jax._src.test_general import assert_close, np_dense_general

VOCAB, LENGTH, D, HEADS, MLP, TAGS = 20, 6, 16, 2, 32, 5
RNGS = {"meprop": jax.random.key(42)}


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder block, stock Flax only."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(MLP, name="mlp_in")(h))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(h)


class Encoder(nn.Module):
    """Embeddings, two encoder blocks, a per-token output layer."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        positions = self.param("positions", nn.initializers.normal(0.02), (LENGTH, D))
        x = x + positions[: tokens.shape[-1]]
        for i in range(2):
            x = EncoderBlock(name=f"block_{i}")(x)
        return nn.Dense(TAGS, name="out")(nn.LayerNorm(name="ln_out")(x))


PROJECTIONS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "mlp_out")


def _axes(axis):
    return (axis,) if isinstance(axis, int) else axis


def setup(batch=3):
    model = Encoder()
    tokens = jax.random.randint(jax.random.key(1), (batch, LENGTH), 0, VOCAB)
    params = model.init(jax.random.key(0), tokens)
    return model, params, tokens


@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
@pytest.mark.parametrize("per_head", [False, True])
def test_forward_is_the_stock_forward_bit_for_bit(mode, per_head):
    model, params, tokens = setup()
    sparse_apply = meprop_jax.sparsify(model.apply, k=3, mode=mode, per_head=per_head)
    expected = model.apply(params, tokens)
    np.testing.assert_array_equal(sparse_apply(params, tokens, rngs=RNGS), expected)
    jitted = jax.jit(lambda p, t: sparse_apply(p, t, rngs=RNGS))(params, tokens)
    np.testing.assert_array_equal(jitted, jax.jit(model.apply)(params, tokens))
    # The same products on any CPU, not only equal outputs on this one.
    sparse_products = forward_products(lambda p, t: sparse_apply(p, t, rngs=RNGS), params, tokens)
    assert sparse_products == forward_products(model.apply, params, tokens)


def test_report_lists_every_projection_with_its_k():
    model, params, tokens = setup()
    rows = meprop_jax.sparsify_report(meprop_jax.sparsify(model.apply, k=3), params, tokens)
    expected = [
        (f"block_{i}/{layer}", "DenseGeneral" if layer.startswith("attn") else "Dense")
        for i in range(2)
        for layer in PROJECTIONS
    ]
    assert [(r.path, r.kind) for r in rows] == [*expected, ("out", "Dense")]
    widths = {"mlp_in": MLP}
    for row in rows[:-1]:
        assert row.features == widths.get(row.path.split("/", 1)[1], D)  # heads * head_dim
        assert (row.k, row.reason) == (3, "sparsified")
    assert (rows[-1].k, rows[-1].reason) == (0, "output layer")


def test_report_per_head_and_k_patterns():
    model, params, tokens = setup()
    sparse_apply = meprop_jax.sparsify(model.apply, k={"*/attn/*": 2, "*/mlp_*": 5}, per_head=True)
    rows = {r.path: r for r in meprop_jax.sparsify_report(sparse_apply, params, tokens)}
    head_dim = D // HEADS
    for layer in ("query", "key", "value"):  # k of head_dim in each head
        assert (rows[f"block_0/attn/{layer}"].features, rows[f"block_0/attn/{layer}"].k) == (
            head_dim,
            2,
        )
    assert (rows["block_1/attn/out"].features, rows["block_1/attn/out"].k) == (D, 2)
    assert rows["block_1/mlp_in"].k == 5
    assert (rows["out"].k, rows["out"].reason) == (0, "output layer")


def kept_columns(kernel_grad, in_ndim=1):
    """Which flattened output columns of a ``[*in, *features]`` kernel gradient are nonzero."""
    g = np.asarray(kernel_grad)
    flat = g.reshape((int(np.prod(g.shape[:in_ndim])), -1))
    return np.any(flat != 0, axis=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_unified_gradients_keep_k_columns_of_the_flattened_features(per_head):
    model, params, tokens = setup()
    k = 3
    sparse_apply = meprop_jax.sparsify(model.apply, k=k, per_head=per_head)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(sparse_apply(p, tokens))))(params)["params"]
    stock = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, tokens))))(params)["params"]
    for i in range(2):
        attn = grads[f"block_{i}"]["attn"]
        for layer in ("query", "key", "value"):  # kernel [D, heads, head_dim]
            cols = kept_columns(attn[layer]["kernel"]).reshape(HEADS, D // HEADS)
            if per_head:
                assert cols.sum(axis=1).tolist() == [k] * HEADS
            else:
                assert cols.sum() == k
        assert kept_columns(attn["out"]["kernel"], in_ndim=2).sum() == k  # [heads, head_dim, D]
        assert kept_columns(grads[f"block_{i}"]["mlp_in"]["kernel"]).sum() == k
    # Dense layers: the embeddings' and LayerNorms' gradients are ordinary (nonzero) ones.
    assert np.all(np.asarray(grads["block_0"]["ln_attn"]["scale"]) != 0)
    assert np.any(np.asarray(grads["embed"]["embedding"]) != 0)
    np.testing.assert_array_equal(grads["out"]["kernel"], stock["out"]["kernel"])  # output layer
    assert np.any(np.asarray(grads["positions"]) != np.asarray(stock["positions"]))


def test_sparse_update_refuses_attention_projections_by_name():
    model, params, tokens = setup()
    sparse_apply = meprop_jax.sparsify(model.apply, k=3, sparse_update=True)
    with pytest.raises(ValueError, match=r"'block_0/attn/query' is a DenseGeneral"):
        sparse_apply(params, tokens)
    only_mlp = meprop_jax.sparsify(model.apply, k=3, sparse_update=True, layers="*/mlp_*")
    rows = meprop_jax.sparsify_report(only_mlp, params, tokens)
    assert {r.path for r in rows if r.k} == {
        f"block_{i}/mlp_{s}" for i in (0, 1) for s in ("in", "out")
    }
    only_mlp(params, tokens)


def test_batch_dims_stay_dense():
    layer = nn.DenseGeneral((3, 4), axis=-1, batch_dims=(0,))
    x = jnp.ones((2, 5, 6))
    params = layer.init(jax.random.key(0), x)
    sparse_apply = meprop_jax.sparsify(layer.apply, k=2, layers="*")
    (row,) = meprop_jax.sparsify_report(sparse_apply, params, x)
    assert (row.k, row.reason) == (0, "batch_dims")
    np.testing.assert_array_equal(sparse_apply(params, x), layer.apply(params, x))


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize(("axis", "features"), [((-2, -1), D), (-1, (HEADS, D // HEADS))])
def test_projection_gradients_match_the_numpy_reference(mode, axis, features):
    # An attention output projection ([batch, length, heads, head_dim] -> [..., D]) and a
    # query projection ([batch, length, D] -> [..., heads, head_dim]), each sparsified alone.
    layer = nn.DenseGeneral(features, axis=axis)
    shape = (2, LENGTH, HEADS, D // HEADS) if axis == (-2, -1) else (2, LENGTH, D)
    x = jax.random.normal(jax.random.key(1), shape)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a + 0.5, params)  # a nonzero bias
    sparse_apply = meprop_jax.sparsify(layer.apply, k=3, mode=mode, layers="*")
    y, vjp = jax.vjp(lambda p, x: sparse_apply(p, x), params, x)
    g = (np.random.default_rng(0).integers(-1000, 1001, y.shape) / 8.0).astype(np.float32)
    grads, dx = vjp(g)
    p = params["params"]
    ref = np_dense_general(x, p["kernel"], p["bias"], g, axis=_axes(axis), k=3, mode=mode)
    got = (y, dx, grads["params"]["kernel"], grads["params"]["bias"])
    for a, e, what in zip(got, ref, ("y", "dx", "dW", "db"), strict=True):
        assert_close(a, e, what)
