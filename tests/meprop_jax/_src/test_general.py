"""The multi-axis meProp projection (``DenseGeneral``) against a NumPy reference.

Reference, in float64 and written with ``np.einsum`` on the unflattened arrays: the forward
pass ``y = x . W + b`` contracting the input's axes ``axis`` with the kernel's leading axes;
the output gradient ``g [*rest, *features]`` seen as rows of the flattened features
``[prod(rest), prod(features)]``; the top ``k`` of each group of those features, per row
(``"per_example"``) or by column sums over all rows (``"unified"``); ``dW`` and ``dx`` from
the kept entries only; the bias gradient dense (or from the kept entries with
``sparse_bias``). Tolerances are relative to the sum of absolute products behind each entry,
so entries that must be zero are exactly zero. The forward pass is also checked against
``nn.DenseGeneral`` bit for bit.
"""

import math
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from meprop_jax._src import general

RTOL = 1e-5


def np_top_k_mask(scores: np.ndarray, k: int, groups: int) -> np.ndarray:
    """Top ``k`` per block of the last axis; ties to the lower index."""
    blocks = scores.reshape((*scores.shape[:-1], groups, -1))
    idx = np.argsort(-blocks, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask.reshape(scores.shape)


def np_dense_general(x, w, b, g, *, axis, k, mode, groups=1, sparse_bias=False):
    """``(y, dx, dW, db)``, each a ``(value, error_bound)`` pair in float64."""
    x, w, b, g = (np.asarray(a, np.float64) for a in (x, w, b, g))
    axis = tuple(sorted(a % x.ndim for a in axis))  # Flax's order of the kernel's in axes
    n_features = w.ndim - len(axis)
    letters = string.ascii_lowercase
    xs = letters[: x.ndim]
    ins = "".join(xs[a] for a in axis)
    rest = "".join(c for i, c in enumerate(xs) if i not in axis)
    feats = letters[x.ndim : x.ndim + n_features]
    ws, ys = ins + feats, rest + feats

    def both(spec, u, v):
        return np.einsum(spec, u, v), np.einsum(spec, np.abs(u), np.abs(v))

    y, y_bound = both(f"{xs},{ws}->{ys}", x, w)
    rows = g.reshape((math.prod(g.shape[: len(rest)]), -1))  # [rows, prod(features)]
    if mode == "unified":
        mask = np.broadcast_to(np_top_k_mask(np.abs(rows).sum(0), k, groups), rows.shape)
    else:
        mask = np_top_k_mask(np.abs(rows), k, groups)
    kept = np.where(mask, rows, 0.0).reshape(g.shape)
    lead = tuple(range(len(rest)))
    gb = kept if sparse_bias else g
    return (
        (y + b, y_bound + np.abs(b)),
        both(f"{ys},{ws}->{xs}", kept, w),
        both(f"{xs},{ys}->{ws}", x, kept),
        (gb.sum(lead), np.abs(gb).sum(lead)),
    )


def assert_close(actual, expected, what):
    value, bound = expected
    actual = np.asarray(actual, np.float64)
    assert actual.shape == value.shape, what
    err = np.abs(actual - value)
    bad = err > RTOL * bound + 1e-30
    assert not bad.any(), f"{what}: {bad.sum()} entries off, worst {err.max()}"


# (input shape, axis, features, k, groups): the attention's query/key/value projection
# (one contracted axis, features (heads, head_dim)), its output projection (contracting
# (heads, head_dim)), and contracted axes out of order and not last.
CASES = [
    ((2, 5, 6), (-1,), (2, 4), 3, 1),
    ((2, 5, 6), (-1,), (2, 4), 2, 2),
    ((2, 5, 2, 4), (-2, -1), (6,), 2, 1),
    ((3, 2, 5, 4), (3, 1), (3, 2), 1, 3),
    ((3, 2, 5, 4), (3, 1), (3, 2), 4, 1),
]


@pytest.mark.parametrize(("shape", "axis", "features", "k", "groups"), CASES)
@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("sparse_bias", [False, True])
def test_matches_numpy_reference(shape, axis, features, k, groups, mode, sparse_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    in_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in axis))
    w = rng.standard_normal((*in_shape, *features)).astype(np.float32)
    b = rng.standard_normal(features).astype(np.float32)
    rest = tuple(
        n for i, n in enumerate(shape) if i % len(shape) not in {a % len(shape) for a in axis}
    )
    # Multiples of 1/8: the column sums are exact in float32, so both rank the same.
    g = (rng.integers(-1000, 1001, (*rest, *features)) / 8.0).astype(np.float32)

    def f(x, w, b):
        return general.dense_general(
            x,
            w,
            b,
            axis=general.normalize_axes(axis, x.ndim),
            k=k,
            mode=mode,
            groups=groups,
            sparse_bias=sparse_bias,
        )

    y, vjp = jax.vjp(f, x, w, b)
    dx, dw, db = vjp(g)
    ref = np_dense_general(
        x, w, b, g, axis=axis, k=k, mode=mode, groups=groups, sparse_bias=sparse_bias
    )
    for got, expected, what in zip((y, dx, dw, db), ref, ("y", "dx", "dW", "db"), strict=True):
        assert_close(got, expected, what)
    if mode == "unified":  # whole columns of the kernel gradient dropped
        assert np.any(np.asarray(dw) == 0)
    stock = nn.DenseGeneral(features, axis=axis)
    variables = {"params": {"kernel": w, "bias": b}}
    np.testing.assert_array_equal(y, stock.apply(variables, x))
    np.testing.assert_array_equal(jax.jit(f)(x, w, b), jax.jit(stock.apply)(variables, x))


def test_dense_k_gives_the_stock_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
    w = jax.random.normal(jax.random.key(1), (2, 4, 5))
    b = jnp.zeros(5)
    stock = nn.DenseGeneral(5, axis=(-2, -1))
    loss = lambda f: lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))
    meprop = lambda x, w, b: general.dense_general(x, w, b, axis=(2, 3), k=5)
    dense = lambda x, w, b: stock.apply({"params": {"kernel": w, "bias": b}}, x)
    got = jax.grad(loss(meprop), (0, 1, 2))(x, w, b)
    expected = jax.grad(loss(dense), (0, 1, 2))(x, w, b)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kernel .* does not contract"):
        general.dense_general(jnp.ones((2, 3)), jnp.ones((4, 5)), None, axis=(1,), k=1)
    with pytest.raises(ValueError, match="axis=5 is out of range"):
        general.normalize_axes(5, 3)
    with pytest.raises(ValueError, match="names an axis twice"):
        general.normalize_axes((1, -2), 3)
    assert general.flat_features((2, 4), per_head=True) == (4, 2)
    assert general.flat_features((2, 4), per_head=False) == (8, 1)
    assert general.flat_features((6,), per_head=True) == (6, 1)


def test_doctests():
    import doctest

    result = doctest.testmod(general, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
