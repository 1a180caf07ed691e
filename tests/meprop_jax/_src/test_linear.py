"""``meprop_jax.linear`` / ``multi_linear`` against a NumPy reference of the meProp backward.

Reference: mask the output gradient ``g`` with the selection rule (for ``mode="random"`` the
mask comes from ``meprop_jax.random_mask`` since the randomness is JAX's), then
``dx = g_sparse @ W.T``, ``dW = sum over leading axes of x^T g_sparse`` and
``db = sum g`` (dense) or ``sum g_sparse`` (``sparse_bias=True``), all in float64.

Tolerances are relative to the sum of absolute products behind each entry (the natural
floating-point error bound of a dot product), so entries that must be exactly zero (dropped
columns of ``dW``) are checked to be exactly zero.
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import meprop_jax
from meprop_jax import linear, multi_linear

MODES = ("unified", "per_example", "random")
SPARSE_MODES = ("unified", "per_example")  # the deterministic, magnitude-based rules
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
F32_RTOL = 1e-5
BF16_RTOL = 2e-2


def fast_key(seed: int) -> jax.Array:
    """A PRNG key for tests that only need *some* random mask.

    XLA:CPU takes about a second to compile threefry for each new shape; the RBG generator
    compiles in a fraction of that. Tests whose point is the randomness under a transform
    (``vmap``, sharding) and the public-call test keep the default (threefry) keys: RBG bits
    are not invariant under ``vmap`` or sharding.
    """
    return jax.random.key(seed, impl="rbg")


_random_mask = jax.jit(meprop_jax.random_mask, static_argnums=(1, 2, 3))

# --------------------------------------------------------------------------- NumPy reference


def np_top_k_mask(scores: np.ndarray, k: int, groups: int = 1) -> np.ndarray:
    """Top ``k`` per block of the last axis, stable descending order (ties to lower index)."""
    shape = scores.shape
    blocks = scores.reshape((*shape[:-1], groups, shape[-1] // groups))
    idx = np.argsort(-blocks, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask.reshape(shape)


def lead_axes(a: np.ndarray) -> tuple[int, ...]:
    return tuple(range(a.ndim - 1))


def ref_mask(g, k, mode, key=None, groups=1):
    g = np.asarray(g, np.float64)
    if mode == "unified":
        cols = np_top_k_mask(np.abs(g).sum(lead_axes(g)), k, groups)
        return np.broadcast_to(cols, g.shape)
    if mode == "per_example":
        return np_top_k_mask(np.abs(g), k, groups)
    return np.asarray(_random_mask(key, g.shape, k, groups))


def ref_grads(xs, ws, g, mask, sparse_bias):
    """Reference ``(dxs, dws, db)``, each as a ``(value, error_bound)`` pair, in float64."""
    xs = [np.asarray(x, np.float64) for x in xs]
    ws = [np.asarray(w, np.float64) for w in ws]
    g = np.asarray(g, np.float64)
    lead = lead_axes(g)
    gs = np.where(mask, g, 0.0)
    dxs = [(gs @ w.T, np.abs(gs) @ np.abs(w).T) for w in ws]
    dws = [
        (np.tensordot(x, gs, axes=(lead, lead)), np.tensordot(np.abs(x), np.abs(gs), (lead, lead)))
        for x in xs
    ]
    gb = gs if sparse_bias else g
    db = (gb.sum(lead), np.abs(gb).sum(lead))
    return dxs, dws, db


def assert_close(actual, expected, rtol, what=""):
    value, bound = expected
    actual = np.asarray(actual, np.float64)
    assert actual.shape == value.shape, what
    err = np.abs(actual - value)
    tol = rtol * bound + 1e-30
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} entries off; worst error {err.max()} "
        f"(value {value[bad][:3]}, got {actual[bad][:3]})"
    )


def check_against_reference(grads, xs, ws, g, mask, sparse_bias, has_bias, rtol=F32_RTOL):
    dxs, dws, db = grads
    ref_dxs, ref_dws, ref_db = ref_grads(xs, ws, g, mask, sparse_bias)
    for i, (a, e) in enumerate(zip(dxs, ref_dxs, strict=True)):
        assert_close(a, e, rtol, f"dx[{i}]")
    for i, (a, e) in enumerate(zip(dws, ref_dws, strict=True)):
        assert_close(a, e, rtol, f"dW[{i}]")
    if has_bias:
        assert_close(db, ref_db, rtol, "db")
    else:
        assert db is None


@functools.partial(jax.jit, static_argnames=("k", "mode", "groups", "sparse_bias"))
def meprop_vjp(xs, ws, b, g, key, *, k, mode, groups=1, sparse_bias=False):
    """``(y, (dxs, dws, db))`` of ``multi_linear`` for the cotangent ``g``."""

    def f(xs, ws, b):
        return multi_linear(
            xs, ws, b, k=k, mode=mode, key=key, groups=groups, sparse_bias=sparse_bias
        )

    y, vjp = jax.vjp(f, xs, ws, b)
    return y, vjp(g)


def dense_forward(x, w, b=None):
    y = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    return y if b is None else y + b


def integer_gradient(rng, shape, kind):
    """Gradients whose column sums are exact in float32 (and bfloat16 for ``"ties"``)."""
    if kind == "ties":
        g = rng.integers(-2, 3, size=shape)
    else:
        g = rng.integers(-1000, 1001, size=shape)
    return (g / 8.0).astype(np.float32)


def unified_selection_is_clear(g, k, groups=1):
    """True unless the k-th and (k+1)-th column sums are too close for float32 to rank."""
    g = np.asarray(g, np.float64)
    scores = np.abs(g).sum(lead_axes(g)).reshape(groups, -1)
    s = -np.sort(-scores, axis=-1)
    if k >= s.shape[-1]:
        return True
    return bool(np.all(s[:, k - 1] - s[:, k] > 1e-4 * (1.0 + s[:, 0])))


# --------------------------------------------------------------------------- reference checks


@st.composite
def linear_cases(draw):
    lead = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=3)))
    n_in = draw(st.sampled_from([1, 3, 4]))
    out = draw(st.sampled_from([2, 5, 9]))
    k = draw(st.sampled_from([1, out - 1, draw(st.integers(1, out - 1))]))
    mode = draw(st.sampled_from(MODES))
    kind = draw(st.sampled_from(["ties", "wide", "normal"]))
    sparse_bias = draw(st.booleans())
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return lead, n_in, out, k, mode, kind, sparse_bias, has_bias, seed


@SETTINGS
@given(linear_cases())
def test_linear_matches_reference(case):
    lead, n_in, out, k, mode, kind, sparse_bias, has_bias, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, out)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if has_bias else None
    if kind == "normal":
        g = rng.standard_normal((*lead, out)).astype(np.float32)
        if mode == "unified":
            assume(unified_selection_is_clear(g, k))
    else:
        g = integer_gradient(rng, (*lead, out), kind)
    key = fast_key(seed % 1000)
    y, (dxs, dws, db) = meprop_vjp((x,), (w,), b, g, key, k=k, mode=mode, sparse_bias=sparse_bias)
    mask = ref_mask(g, k, mode, key)
    assert y.shape == g.shape
    check_against_reference((dxs, dws, db), [x], [w], g, mask, sparse_bias, has_bias)


@pytest.mark.parametrize("mode", MODES)
def test_linear_matches_reference_with_public_vjp(mode):
    """The brief's exact call: ``jax.vjp(lambda x, w, b: linear(...), x, w, b)[1](g)``."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    g = integer_gradient(rng, (2, 3, 7), "ties")
    key = jax.random.key(5)
    grads = jax.vjp(lambda x, w, b: linear(x, w, b, k=3, mode=mode, key=key), x, w, b)[1](g)
    dx, dw, db = grads
    check_against_reference(([dx], [dw], db), [x], [w], g, ref_mask(g, 3, mode, key), False, True)


@pytest.mark.parametrize(
    ("lead", "out", "k", "sparse_bias"),
    [
        ((2,), 12, 3, False),  # N*k = 6 < 12: products over the padded union of columns
        ((1, 3), 12, 1, True),  # N*k = 3 < 12
        ((4,), 12, 3, True),  # N*k = 12 >= 12: masked dense products
        ((2, 5), 7, 2, False),  # N*k = 20 >= 7
    ],
)
@pytest.mark.parametrize("mode", ["per_example", "random"])
def test_rowwise_modes_both_code_paths(lead, out, k, sparse_bias, mode):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((*lead, 3)).astype(np.float32)
    w = rng.standard_normal((3, out)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    g = integer_gradient(rng, (*lead, out), "ties")
    key = fast_key(11)
    _, grads = meprop_vjp((x,), (w,), b, g, key, k=k, mode=mode, sparse_bias=sparse_bias)
    check_against_reference(grads, [x], [w], g, ref_mask(g, k, mode, key), sparse_bias, True)


@pytest.mark.parametrize("selected", [(0, 4), (3, 7), (7, 9)])
def test_per_example_union_path_with_repeated_columns(selected):
    """Rows that choose the same columns leave padding slots (which repeat column 0)."""
    rng = np.random.default_rng(0)
    n, out, k = 4, 10, 2  # N*k = 8 < 10: union path, but the union has only 2 columns
    g = np.full((n, out), 0.125, np.float32)
    g[:, list(selected)] = rng.integers(1, 9, size=(n, 2)) * np.float32(1.0)
    g[1] *= -1
    x = rng.standard_normal((n, 3)).astype(np.float32)
    w = rng.standard_normal((3, out)).astype(np.float32)
    b = np.zeros(out, np.float32)
    _, grads = meprop_vjp((x,), (w,), b, g, None, k=k, mode="per_example", sparse_bias=True)
    mask = ref_mask(g, k, "per_example")
    assert set(np.flatnonzero(mask.any(0))) == set(selected)
    check_against_reference(grads, [x], [w], g, mask, True, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("groups", "k"), [(1, 7), (4, 1), (4, 2)])
def test_multi_linear_two_inputs_matches_reference(mode, groups, k):
    rng = np.random.default_rng(groups * 10 + k)
    lead, out = (2, 3), 12
    x = rng.standard_normal((*lead, 4)).astype(np.float32)
    h = rng.standard_normal((*lead, 2)).astype(np.float32)
    wx = rng.standard_normal((4, out)).astype(np.float32)
    wh = rng.standard_normal((2, out)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    g = integer_gradient(rng, (*lead, out), "ties")
    key = fast_key(3)
    y, grads = meprop_vjp((x, h), (wx, wh), b, g, key, k=k, mode=mode, groups=groups)
    mask = ref_mask(g, k, mode, key, groups)
    blocks = mask.reshape((*lead, groups, out // groups))
    np.testing.assert_array_equal(blocks.sum(-1), k)
    check_against_reference(grads, [x, h], [wx, wh], g, mask, False, True)
    want = dense_forward(x, wx) + dense_forward(h, wh) + b
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- forward, dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 3])
def test_forward_is_exactly_dense(mode, k):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((5, 7)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(7).astype(np.float32))
    key = fast_key(0)
    y = linear(x, w, b, k=k, mode=mode, key=key)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, dense_forward(x, w, b))
    np.testing.assert_array_equal(linear(x, w, k=k, mode=mode, key=key), dense_forward(x, w))
    if k == 3:
        y_jit = jax.jit(lambda x, w, b: linear(x, w, b, k=k, mode=mode, key=key))(x, w, b)
        np.testing.assert_array_equal(y_jit, jax.jit(dense_forward)(x, w, b))


@pytest.mark.parametrize(
    ("mode", "k", "shape"),
    [("unified", 0, (5, 4)), ("per_example", 6, (2, 3, 4)), ("random", 9, (5, 4))],
)
def test_dense_k_gives_bitwise_dense_gradients(mode, k, shape):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((4, 6)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(6).astype(np.float32))

    def loss(f):
        return lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))

    meprop = jax.grad(loss(lambda x, w, b: linear(x, w, b, k=k, mode=mode)), argnums=(0, 1, 2))
    plain = jax.grad(loss(lambda x, w, b: x @ w + b), argnums=(0, 1, 2))
    for a, e in zip(meprop(x, w, b), plain(x, w, b), strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_check_grads_at_dense_k(mode):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((4, 5)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(5).astype(np.float32))
    f = lambda x, w, b: jnp.sum(jnp.sin(linear(x, w, b, k=5, mode=mode)))
    check_grads(jax.jit(f), (x, w, b), order=2, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_check_grads_when_gradient_is_already_k_sparse(mode):
    """If ``g`` has nonzeros in ``k`` columns only, meProp drops nothing: exact gradients."""
    rng = np.random.default_rng(6)
    k = 2
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((4, 6)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(6).astype(np.float32))
    f = lambda x, w, b: jnp.sum(jnp.sin(linear(x, w, b, k=k, mode=mode)[:, 1 : 1 + k]))
    check_grads(jax.jit(f), (x, w, b), order=2, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- transforms


def grad_fn(mode, k, key=None):
    def loss(x, w, b, g):
        return jnp.sum(linear(x, w, b, k=k, mode=mode, key=key) * g)

    return jax.grad(loss, argnums=(0, 1, 2))


def small_problem(seed, lead=(4,), n_in=5, out=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, out)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    g = integer_gradient(rng, (*lead, out), "wide")
    return x, w, b, g


def test_linear_docstring_example():
    result = doctest.testmod(meprop_jax._src.linear, verbose=False)
    assert result.attempted >= 1
    assert result.failed == 0


def test_random_mode_needs_key():
    x, w, b, _ = small_problem(12)
    with pytest.raises(ValueError, match="key"):
        linear(x, w, b, k=2, mode="random")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("xs", "kernels", "bias", "kwargs", "error", "name"),
    [
        ([(4, 5)], [(6, 8)], None, {}, ValueError, "kernel"),
        ([(4, 5)], [(5, 8, 1)], None, {}, ValueError, "kernel"),
        ([(4, 5)], [(5,)], None, {}, ValueError, "kernel"),
        ([(4, 5)], [(5, 8)], (7,), {}, ValueError, "bias"),
        ([(4, 5)], [(5, 8)], (1, 8), {}, ValueError, "bias"),
        ([(4, 5)], [(5, 8)], None, {"k": 2.0}, TypeError, "k"),
        ([(4, 5)], [(5, 8)], None, {"k": True}, TypeError, "k"),
        ([(4, 5)], [(5, 8)], None, {"k": None}, TypeError, "k"),
        ([(4, 5)], [(5, 8)], None, {"k": "2"}, TypeError, "k"),
        ([(4, 5)], [(5, 8)], None, {"k": -1}, ValueError, "k"),
        ([(4, 5)], [(5, 8)], None, {"mode": "top"}, ValueError, "mode"),
        ([(4, 5)], [(5, 8)], None, {"groups": 3}, ValueError, "groups"),
        ([(4, 5)], [(5, 8)], None, {"groups": 0}, ValueError, "groups"),
        ([(4, 5), (4, 2)], [(5, 8)], None, {}, ValueError, "kernels"),
        ([(4, 5), (4, 2)], [(5, 8), (2, 9)], None, {}, ValueError, "out"),
        ([(4, 5), (3, 2)], [(5, 8), (2, 8)], None, {}, ValueError, "leading axes"),
        ([], [], None, {}, ValueError, "xs"),
    ],
)
def test_multi_linear_errors_name_the_argument(xs, kernels, bias, kwargs, error, name):
    xs = [jnp.ones(s, jnp.float32) for s in xs]
    kernels = [jnp.ones(s, jnp.float32) for s in kernels]
    bias = None if bias is None else jnp.ones(bias, jnp.float32)
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(error, match=name):
        multi_linear(xs, kernels, bias, **kwargs)


def test_linear_errors_name_the_argument():
    x = jnp.ones((4, 5), jnp.float32)
    w = jnp.ones((5, 8), jnp.float32)
    with pytest.raises(ValueError, match="kernel"):
        linear(x, jnp.ones((4, 8), jnp.float32), k=2)
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, jnp.ones(5, jnp.float32), k=2)
    with pytest.raises(TypeError, match="k"):
        linear(x, w, k=1.5)
    with pytest.raises(ValueError, match="k"):
        linear(x, w, k=-3)
    with pytest.raises(ValueError, match="mode") as info:
        linear(x, w, k=2, mode="per_row")
    for mode in MODES:
        assert mode in str(info.value)
    # Accepted spellings.
    np.testing.assert_array_equal(linear(x, w, k=np.int64(2), mode="per-example"), x @ w)


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("mode", SPARSE_MODES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_reaches_dx_and_dw(mode, bad):
    """Defined behaviour: a NaN/inf entry of g is always kept, so it spreads like dense."""
    x, w, b, g = small_problem(13, lead=(2, 3))
    g = np.full(g.shape, 1.0, np.float32)
    g[..., 0] = 50.0  # the column every rule would pick for k=1 if g were finite
    g[1, 2, 5] = bad
    sparse = meprop_vjp((x,), (w,), b, g, None, k=1, mode=mode)[1]
    dense = meprop_vjp((x,), (w,), b, g, None, k=0, mode=mode)[1]
    (dx,), (dw,), db = sparse
    (dx_dense,), (dw_dense,), db_dense = dense
    assert not np.all(np.isfinite(dx)) and not np.all(np.isfinite(dw))
    np.testing.assert_array_equal(np.isfinite(dx), np.isfinite(dx_dense))
    np.testing.assert_array_equal(np.isfinite(dw), np.isfinite(dw_dense))
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(dx_dense))
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(dw_dense))
    np.testing.assert_array_equal(np.isfinite(db), np.isfinite(db_dense))
    assert not np.all(np.isfinite(dx[1, 2]))  # the row holding the bad entry
    assert not np.all(np.isfinite(dw[:, 5]))  # the column holding it


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_dtypes(dtype, mode):
    sparse_bias = mode != "per_example"
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.standard_normal((3, 4, 6)), dtype)
    w = jnp.asarray(rng.standard_normal((6, 10)), dtype)
    b = jnp.asarray(rng.standard_normal(10), dtype)
    g = jnp.asarray(integer_gradient(rng, (3, 4, 10), "ties"), dtype)
    key = fast_key(7)
    y, grads = meprop_vjp((x,), (w,), b, g, key, k=3, mode=mode, sparse_bias=sparse_bias)
    (dx,), (dw,), db = grads
    assert y.dtype == dtype
    assert (dx.dtype, dw.dtype, db.dtype) == (x.dtype, w.dtype, b.dtype)
    # Reference in float64 from the (rounded) inputs; the selection is exact on them.
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    mask = ref_mask(as64(g), 3, mode, key)
    rtol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
    check_against_reference(
        ([dx], [dw], db), [as64(x)], [as64(w)], as64(g), mask, sparse_bias, True, rtol=rtol
    )


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_bfloat16_with_float32_accumulation(mode):
    # The bias is float32 like the accumulated product: under the suite's strict dtype
    # promotion a bfloat16 bias cannot be added to a float32 product (as in flax's Dense).
    rng = np.random.default_rng(15)
    x = jnp.asarray(rng.standard_normal((5, 6)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((6, 10)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(10), jnp.float32)
    f = lambda x, w, b: linear(x, w, b, k=3, mode=mode, preferred_element_type=jnp.float32)
    y, vjp = jax.vjp(f, x, w, b)
    assert y.dtype == jnp.float32
    dx, dw, db = vjp(jnp.ones(y.shape, jnp.float32))
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    mask = ref_mask(np.ones(y.shape), 3, mode)
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    check_against_reference(
        ([dx], [dw], db), [as64(x)], [as64(w)], np.ones(y.shape), mask, False, True, BF16_RTOL
    )
