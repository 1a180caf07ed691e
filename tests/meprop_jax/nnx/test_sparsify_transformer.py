"""``meprop_jax.nnx.sparsify`` of a stock Flax NNX Transformer encoder, and Linen <-> NNX.

The NNX encoder (token and learned position embeddings, pre-norm blocks of
``nnx.MultiHeadAttention`` and a two-layer MLP, a per-token output layer) is converted whole:
the four ``nnx.LinearGeneral`` projections of each attention become
:class:`meprop_jax.nnx.LinearGeneral`, the forward pass is the stock program bit for bit,
the report lists every projection with its ``k``, and a second ``sparsify`` takes a new ``k``
(``0``: the stock gradients). The same block in Linen and in NNX, with the same parameters
and ``k``, has the same meProp gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meprop_jax
from meprop_jax import nnx as mnnx
from tests.helpers import forward_products
from tests.meprop_jax._src.test_general import assert_close, np_dense_general
from tests.meprop_jax.linen.test_sparsify_transformer import (
    HEADS,
    LENGTH,
    MLP,
    PROJECTIONS,
    TAGS,
    VOCAB,
    D,
    EncoderBlock,
    kept_columns,
)


class NNXBlock(nnx.Module):
    """The Linen ``EncoderBlock`` in NNX, with the same parameter names."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln_attn = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(D, rngs=rngs)
        self.mlp_in = nnx.Linear(D, MLP, rngs=rngs)
        self.mlp_out = nnx.Linear(MLP, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


class NNXEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (LENGTH, D)))
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
        self.ln_out = nnx.LayerNorm(D, rngs=rngs)
        self.out = nnx.Linear(D, TAGS, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.positions[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln_out(x))


TOKENS = jax.random.randint(jax.random.key(1), (3, LENGTH), 0, VOCAB)


def grads_of(model, x):
    return nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def products(model, x):
    graphdef, state = nnx.split(model)
    return forward_products(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
@pytest.mark.parametrize("per_head", [False, True])
def test_forward_is_the_stock_program_bit_for_bit(mode, per_head):
    stock = NNXEncoder(nnx.Rngs(0))
    sparse, _ = mnnx.sparsify(
        stock,
        k=3,
        mode=mode,
        per_head=per_head,
        example_args=(TOKENS,),
        rngs=nnx.Rngs(meprop=5),
    )
    for block in sparse.blocks:
        for layer in ("query", "key", "value", "out"):
            assert type(getattr(block.attn, layer)) is mnnx.LinearGeneral
    assert products(sparse, TOKENS) == products(stock, TOKENS)
    np.testing.assert_array_equal(sparse(TOKENS), stock(TOKENS))
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(run(sparse, TOKENS), run(stock, TOKENS))


def test_report_lists_every_projection_with_its_k():
    _, rows = mnnx.sparsify(NNXEncoder(nnx.Rngs(0)), k=3, example_args=(TOKENS,))
    expected = [
        (f"blocks/{i}/{layer}", "LinearGeneral" if layer.startswith("attn") else "Linear")
        for i in range(2)
        for layer in PROJECTIONS
    ]
    assert [(r.path, r.kind) for r in rows] == [*expected, ("out", "Linear")]
    assert all((r.k, r.reason) == (3, "sparsified") for r in rows[:-1])
    assert (rows[-1].k, rows[-1].reason) == (0, "output layer")
    widths = [MLP if r.path.endswith("mlp_in") else D for r in rows[:-1]]
    assert [r.features for r in rows[:-1]] == widths
    _, per_head = mnnx.sparsify(NNXEncoder(nnx.Rngs(0)), k=2, per_head=True, example_args=(TOKENS,))
    assert {(r.path.split("/", 2)[2], r.features) for r in per_head[:6]} == {
        ("attn/query", D // HEADS),
        ("attn/key", D // HEADS),
        ("attn/value", D // HEADS),
        ("attn/out", D),
        ("mlp_in", MLP),
        ("mlp_out", D),
    }


@pytest.mark.parametrize("per_head", [False, True])
def test_gradients_keep_k_columns_and_sparsify_again_takes_the_new_k(per_head):
    stock = NNXEncoder(nnx.Rngs(0))
    sparse, _ = mnnx.sparsify(stock, k=3, per_head=per_head, example_args=(TOKENS,))
    grads = grads_of(sparse, TOKENS)
    for i in range(2):
        attn = grads["blocks"][i]["attn"]
        cols = kept_columns(attn["query"]["kernel"]).reshape(HEADS, D // HEADS)
        assert cols.sum(axis=1).tolist() == [3] * HEADS if per_head else cols.sum() == 3
        assert kept_columns(attn["out"]["kernel"], in_ndim=2).sum() == 3
    again, _ = mnnx.sparsify(sparse, k=2, per_head=per_head, example_args=(TOKENS,))
    assert again.blocks[0].attn.query.k == 2 and sparse.blocks[0].attn.query.k == 3
    dense, rows = mnnx.sparsify(again, k=0, example_args=(TOKENS,))
    assert all(r.k == 0 for r in rows)
    assert_trees_equal(grads_of(dense, TOKENS), grads_of(stock, TOKENS))


def test_sparse_update_refuses_attention_projections_by_name():
    with pytest.raises(ValueError, match=r"'blocks/0/attn/query' is a LinearGeneral"):
        mnnx.sparsify(NNXEncoder(nnx.Rngs(0)), k=3, sparse_update=True, example_args=(TOKENS,))
    _, rows = mnnx.sparsify(
        NNXEncoder(nnx.Rngs(0)), k=3, sparse_update=True, layers="*/mlp_*", example_args=(TOKENS,)
    )
    assert sum(r.k > 0 for r in rows) == 4


def test_linear_general_layer():
    layer = mnnx.LinearGeneral((2, 4), 6, axis=(-2, -1), k=2, rngs=nnx.Rngs(0))
    stock = nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), rngs=nnx.Rngs(0))
    assert_trees_equal(nnx.to_pure_dict(nnx.state(layer)), nnx.to_pure_dict(nnx.state(stock)))
    x = jax.random.normal(jax.random.key(2), (3, 5, 2, 4))
    np.testing.assert_array_equal(layer(x), stock(x))
    kernel = grads_of(layer, x)["kernel"]
    assert kept_columns(kernel, in_ndim=2).sum() == 2
    hook = lambda *a, **kw: jax.lax.dot_general(*a, **kw)
    with pytest.raises(ValueError, match="does not take dot_general hook"):
        mnnx.LinearGeneral(4, (2, 3), k=2, dot_general=hook, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="k must be >= 0"):
        mnnx.LinearGeneral(4, (2, 3), k=-1, rngs=nnx.Rngs(0))
    dense = mnnx.LinearGeneral(4, (2, 3), k=6, dot_general=hook, rngs=nnx.Rngs(0))
    assert dense(jnp.ones((1, 4))).shape == (1, 2, 3)


# --------------------------------------------------------------------------- Linen <-> NNX


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("per_head", [False, True])
def test_linen_and_nnx_blocks_have_the_same_meprop_gradients(mode, per_head):
    x = jax.random.normal(jax.random.key(3), (2, LENGTH, D))
    linen_block = EncoderBlock()
    params = linen_block.init(jax.random.key(0), x)
    nnx_block = NNXBlock(nnx.Rngs(1))
    state = nnx.state(nnx_block, nnx.Param)
    nnx.replace_by_pure_dict(state, params["params"])
    nnx.update(nnx_block, state)
    # Stock Linen and NNX blocks themselves differ by float rounding.
    np.testing.assert_allclose(nnx_block(x), linen_block.apply(params, x), rtol=1e-5, atol=1e-6)

    options = dict(k=3, mode=mode, per_head=per_head, layers="*")
    linen_apply = meprop_jax.sparsify(linen_block.apply, **options)
    sparse, rows = mnnx.sparsify(nnx_block, **options)
    assert sum(r.k > 0 for r in rows) == 6
    linen_rows = meprop_jax.sparsify_report(linen_apply, params, x)
    by_path = lambda rows: {r.path: (r.features, r.k) for r in rows}
    assert by_path(linen_rows) == by_path(rows)
    linen_grads = jax.grad(lambda p: jnp.sum(jnp.sin(linen_apply(p, x))))(params)["params"]
    nnx_grads = grads_of(sparse, x)
    assert jax.tree.structure(linen_grads) == jax.tree.structure(nnx_grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), linen_grads, nnx_grads
    )
    for layer in ("query", "out"):  # the same entries dropped
        in_ndim = 2 if layer == "out" else 1
        np.testing.assert_array_equal(
            kept_columns(linen_grads["attn"][layer]["kernel"], in_ndim),
            kept_columns(nnx_grads["attn"][layer]["kernel"], in_ndim),
        )


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("per_head", [False, True])
def test_linear_general_gradients_match_the_numpy_reference(mode, per_head):
    # A query projection, [batch, length, D] -> [batch, length, heads, head_dim].
    features = (HEADS, D // HEADS)
    layer = mnnx.LinearGeneral(D, features, k=2, mode=mode, per_head=per_head, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.full(features, 0.5)
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, D))
    graphdef, params = nnx.split(layer)
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    g = (np.random.default_rng(0).integers(-1000, 1001, y.shape) / 8.0).astype(np.float32)
    grads, dx = vjp(g)
    ref = np_dense_general(
        x,
        layer.kernel[...],
        layer.bias[...],
        g,
        axis=(-1,),
        k=2,
        mode=mode,
        groups=HEADS if per_head else 1,
    )
    got = (y, dx, grads["kernel"][...], grads["bias"][...])
    for a, e, what in zip(got, ref, ("y", "dx", "dW", "db"), strict=True):
        assert_close(a, e, what)
