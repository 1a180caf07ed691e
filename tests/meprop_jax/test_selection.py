"""The selection rules of ``meprop_jax._selection`` against a NumPy reference.

Reference rule: rank by ``|g|`` in descending order with a stable sort, so that ties go to the
lower column index; the unified rule ranks columns by the sum of ``|g|`` over every leading
axis. Gradients are drawn from small integer sets (scaled by a power of two) so that every
column sum is exact in float32 and ties are frequent: NumPy and JAX must then agree exactly.
"""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meprop_jax
from meprop_jax import _selection
from meprop_jax._selection import (
    MODES,
    check_groups,
    check_k,
    check_mode,
    column_scores,
    is_dense,
    per_example_mask,
    random_mask,
    top_k_mask,
    unified_columns,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

# Jitted once per (shape, k, groups): far fewer compilations than op-by-op dispatch.
jit_unified_columns = jax.jit(unified_columns, static_argnums=(1, 2))
jit_per_example_mask = jax.jit(per_example_mask, static_argnums=(1, 2))
jit_top_k_mask = jax.jit(top_k_mask, static_argnums=(1,))
jit_random_mask = jax.jit(random_mask, static_argnums=(1, 2, 3))


# --------------------------------------------------------------------------- NumPy reference


def np_top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries along the last axis; ties to the lower index.

    NaN is ranked like +inf (first), as ``lax.top_k`` does.
    """
    s = np.where(np.isnan(scores), np.inf, scores)
    return np.argsort(-s, axis=-1, kind="stable")[..., :k]


def np_top_k_mask(scores: np.ndarray, k: int, groups: int = 1) -> np.ndarray:
    shape = scores.shape
    blocks = scores.reshape((*shape[:-1], groups, shape[-1] // groups))
    idx = np_top_k_indices(blocks, k)
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask.reshape(shape)


def np_unified_columns(g: np.ndarray, k: int, groups: int = 1) -> np.ndarray:
    scores = np.abs(g.astype(np.float64)).sum(axis=tuple(range(g.ndim - 1)))
    return np.flatnonzero(np_top_k_mask(scores, k, groups))


def np_per_example_mask(g: np.ndarray, k: int, groups: int = 1) -> np.ndarray:
    return np_top_k_mask(np.abs(g.astype(np.float64)), k, groups)


# --------------------------------------------------------------------------- strategies


@st.composite
def gradients(draw, max_rank=3, groups=1):
    """An integer-valued float32 gradient ``[..., out]`` (exact column sums) and a ``k``."""
    lead = draw(st.lists(st.sampled_from([1, 3, 4]), min_size=0, max_size=max_rank - 1))
    width = draw(st.sampled_from([1, 2, 5, 8]))
    out = width * groups
    values = draw(st.sampled_from(["ties", "wide"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (*lead, out)
    if values == "ties":  # many equal magnitudes and many equal column sums
        g = rng.integers(-2, 3, size=shape)
    else:
        g = rng.integers(-1000, 1001, size=shape)
    g = (g / 8.0).astype(np.float32)
    k = draw(st.sampled_from([1, width, max(width - 1, 1), draw(st.integers(1, width))]))
    return g, k


# --------------------------------------------------------------------------- unified


@SETTINGS
@given(gradients(max_rank=4))
def test_unified_columns_matches_reference(case):
    g, k = case
    cols = jit_unified_columns(jnp.asarray(g), k, 1)
    assert cols.dtype == jnp.int32
    assert cols.shape == (k,)
    assert len(set(np.asarray(cols).tolist())) == k
    np.testing.assert_array_equal(np.sort(np.asarray(cols)), np_unified_columns(g, k))


@SETTINGS
@given(gradients(max_rank=3, groups=4))
def test_unified_columns_groups_keep_k_per_block(case):
    g, k = case
    out = g.shape[-1]
    width = out // 4
    cols = np.sort(np.asarray(jit_unified_columns(jnp.asarray(g), k, 4)))
    assert cols.shape == (4 * k,)
    np.testing.assert_array_equal(np.bincount(cols // width, minlength=4), [k] * 4)
    np.testing.assert_array_equal(cols, np_unified_columns(g, k, groups=4))


def test_unified_columns_sums_over_every_leading_axis():
    # Column 2 wins on the total over both leading axes although column 0 has the largest
    # single entry and column 1 wins in the first slice.
    g = np.zeros((2, 3, 4), np.float32)
    g[0, 0] = [9.0, 0.0, 0.0, 0.0]
    g[0, 1] = [0.0, 4.0, 3.0, 0.0]
    g[1, :, 2] = 3.0
    g[1, 2, 1] = -2.0
    np.testing.assert_allclose(column_scores(jnp.asarray(g)), [9.0, 6.0, 12.0, 0.0])
    assert unified_columns(jnp.asarray(g), 1).tolist() == [2]
    assert sorted(unified_columns(jnp.asarray(g), 2).tolist()) == [0, 2]


def test_unified_ties_go_to_lower_index():
    g = jnp.array([[1.0, -2.0, 2.0, 0.0, -2.0], [0.0, 1.0, -1.0, 2.0, 1.0]])
    # Column sums: 1, 3, 3, 2, 3.
    assert unified_columns(g, 1).tolist() == [1]
    assert sorted(unified_columns(g, 2).tolist()) == [1, 2]
    assert sorted(unified_columns(g, 3).tolist()) == [1, 2, 4]
    assert sorted(unified_columns(g, 4).tolist()) == [1, 2, 3, 4]


def test_column_scores_are_float32_for_bfloat16():
    g = jnp.array([[1.0, 256.0, 1.0]], jnp.bfloat16)
    g = jnp.concatenate([g] * 3, axis=0)
    scores = column_scores(g)
    assert scores.dtype == jnp.float32
    # 3 * 256 + ... would round in bfloat16 accumulation; float32 keeps it exact.
    np.testing.assert_array_equal(scores, [3.0, 768.0, 3.0])


def test_float64_gradients_are_ranked_in_float64():
    with jax.enable_x64(True):
        g = jnp.array([[1.0, 1.0 + 1e-12]], jnp.float64)
        assert column_scores(g).dtype == jnp.float64
        assert unified_columns(g, 1).tolist() == [1]
        assert per_example_mask(g, 1).tolist() == [[False, True]]
        beyond_float32 = jnp.array([[1e300, -3e300, 2e300]], jnp.float64)
        assert unified_columns(beyond_float32, 1).tolist() == [1]
        assert per_example_mask(beyond_float32, 2).tolist() == [[False, True, True]]
        # Narrower gradients are still ranked in float32.
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            assert column_scores(jnp.ones((2, 3), dtype)).dtype == jnp.float32
        # Through the layer: only the column with the larger float64 gradient survives.
        x, w = jnp.ones((1, 2), jnp.float64), jnp.ones((2, 2), jnp.float64)
        dw = jax.grad(lambda w: jnp.sum(meprop_jax.linear(x, w, k=1) * g))(w)
        assert dw.dtype == jnp.float64
        assert dw.tolist() == [[0.0, 1.0 + 1e-12], [0.0, 1.0 + 1e-12]]


# --------------------------------------------------------------------------- per example


@SETTINGS
@given(gradients(max_rank=3))
def test_per_example_mask_matches_reference(case):
    g, k = case
    mask = np.asarray(jit_per_example_mask(jnp.asarray(g), k, 1))
    assert mask.dtype == np.bool_
    assert mask.shape == g.shape
    np.testing.assert_array_equal(mask.sum(-1), np.full(g.shape[:-1], k))
    np.testing.assert_array_equal(mask, np_per_example_mask(g, k))


@SETTINGS
@given(gradients(max_rank=3, groups=4))
def test_per_example_mask_groups_keep_k_per_block(case):
    g, k = case
    mask = np.asarray(jit_per_example_mask(jnp.asarray(g), k, 4))
    blocks = mask.reshape((*g.shape[:-1], 4, -1))
    np.testing.assert_array_equal(blocks.sum(-1), np.full((*g.shape[:-1], 4), k))
    np.testing.assert_array_equal(mask, np_per_example_mask(g, k, groups=4))


def test_per_example_ties_go_to_lower_index_and_ignore_sign():
    g = jnp.array([[-3.0, 3.0, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, -2.0, 2.0]])
    assert per_example_mask(g, 1).astype(int).tolist() == [
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
    ]
    assert per_example_mask(g, 2).astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
    ]


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from([1, 3]), min_size=0, max_size=2),
    st.sampled_from([1, 4, 9]),
    st.data(),
)
def test_top_k_mask_matches_reference_on_signed_scores(seed, lead, n, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=(*lead, n)).astype(np.float32)
    mask = np.asarray(jit_top_k_mask(jnp.asarray(scores), k))
    np.testing.assert_array_equal(mask, np_top_k_mask(scores, k))


def test_top_k_mask_continuous_scores():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((7, 13)).astype(np.float32)
    for k in (1, 5, 12, 13):
        mask = np.asarray(top_k_mask(jnp.asarray(scores), k))
        np.testing.assert_array_equal(mask, np_top_k_mask(scores, k))


# --------------------------------------------------------------------------- non-finite
# Defined behaviour: every rule ranks a NaN or +-inf entry of g above every finite value, and
# the backward pass of ``linear`` gives dense backprop's non-finite rows of dx and columns of
# dW even where the selection is too small to keep every non-finite entry.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_per_example_always_selects_non_finite_entry(bad):
    g = np.full((3, 6), 100.0, np.float32)
    g[:, 0] = 1000.0  # the largest finite entry of each row
    g[1, 4] = bad
    mask = np.asarray(per_example_mask(jnp.asarray(g), 1))
    assert mask[1].tolist() == [False, False, False, False, True, False]
    assert mask[0, 0] and mask[2, 0]
    mask = np.asarray(per_example_mask(jnp.asarray(g), 2, groups=2))
    assert mask[1].tolist() == [True, True, False, True, True, False]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_unified_always_selects_non_finite_column(bad):
    g = np.full((4, 6), 1.0, np.float32)
    g[:, 1] = 1e30  # the largest finite column sum
    g[2, 5] = bad
    assert unified_columns(jnp.asarray(g), 1).tolist() == [5]
    assert sorted(unified_columns(jnp.asarray(g), 2).tolist()) == [1, 5]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_unified_non_finite_column_beats_an_overflowing_finite_sum(bad):
    g = np.zeros((2, 4), np.float32)
    g[:, 0] = 3e38  # finite entries whose float32 column sum overflows to inf
    g[1, 3] = bad
    assert unified_columns(jnp.asarray(g), 1).tolist() == [3]
    assert unified_columns(jnp.asarray(g), 2).tolist() == [3, 0]
    assert unified_columns(jnp.asarray(g), 1, 2).tolist() == [0, 3]


def test_unified_columns_come_in_rank_order_per_group():
    g = jnp.array([[1.0, 3.0, 2.0, 0.0, 5.0, 4.0, 6.0, 0.5]])
    assert unified_columns(g, 3).tolist() == [6, 4, 5]
    assert unified_columns(g, 2, 2).tolist() == [1, 2, 6, 4]


def test_non_finite_columns():
    g = jnp.array([[[1.0, jnp.nan, 0.0]], [[jnp.inf, 2.0, 0.0]], [[0.0, 0.0, -jnp.inf]]])
    assert _selection.non_finite_columns(g).tolist() == [True, True, True]
    assert _selection.non_finite_columns(g[:2, :, 1:2]).tolist() == [True]
    assert _selection.non_finite_columns(jnp.ones((3, 2))).tolist() == [False, False]


def test_flag_dropped_non_finite_spoils_every_row_of_a_group_that_dropped_one():
    g = np.ones((3, 8), np.float32)
    g[:, 3] = -0.0
    g[0, [1, 2]] = np.inf  # group 0 holds two non-finite columns
    g[1, 2] = np.nan
    g[2, 6] = -np.inf  # group 1 holds one
    g = jnp.asarray(g)
    non_finite = _selection.non_finite_columns(g)
    assert non_finite.tolist() == [False, True, True, False, False, False, True, False]
    cols = unified_columns(g, 1, 2)
    assert cols.tolist() == [1, 6]
    g_cols = jnp.take(g, cols, axis=-1)
    flagged = np.asarray(_selection.flag_dropped_non_finite(non_finite, g_cols, 1, 2))
    assert np.isnan(flagged[:, 0]).all()  # group 0 dropped column 2: every row
    np.testing.assert_array_equal(flagged[:, 1], g_cols[:, 1])
    # k=2 keeps both of group 0's: nothing changes, bit for bit (-0.0 stays -0.0).
    cols = unified_columns(g, 2, 2)
    assert cols.tolist() == [1, 2, 6, 4]
    g_cols = np.asarray(jnp.take(g, jnp.array([3, 3, 3, 3]), axis=-1))
    same = np.asarray(_selection.flag_dropped_non_finite(non_finite, jnp.asarray(g_cols), 2, 2))
    np.testing.assert_array_equal(np.signbit(same), np.signbit(g_cols))
    np.testing.assert_array_equal(same, g_cols)


def test_top_k_mask_ranks_nan_first():
    scores = jnp.array([[1.0, jnp.nan, jnp.inf, 5.0], [jnp.nan, 2.0, 3.0, 4.0]])
    assert top_k_mask(scores, 1).astype(int).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert top_k_mask(scores, 2).astype(int).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_random_mask_keeps_non_finite_entries_first(bad):
    key = jax.random.key(5)
    g = np.ones((50, 6), np.float32)
    g[3, 4] = bad
    g[7, [0, 5]] = bad
    mask = np.asarray(random_mask(key, g.shape, 1, g=jnp.asarray(g)))
    assert mask.sum(-1).tolist() == [1] * 50
    assert mask[3, 4] and mask[7, 0]  # ties between non-finite entries: lower index
    mask = np.asarray(random_mask(key, g.shape, 2, groups=2, g=jnp.asarray(g)))
    assert mask[3, 4] and mask[7, 0] and mask[7, 5]
    # A finite g changes nothing: the same draws as without it.
    np.testing.assert_array_equal(
        random_mask(key, g.shape, 2, g=jnp.ones(g.shape)), random_mask(key, g.shape, 2)
    )
    with pytest.raises(ValueError, match="shape"):
        random_mask(key, (50, 3), 1, g=jnp.asarray(g))


LEAD, N_IN, OUT = (2, 3), 4, 16


def _non_finite_cases() -> list[np.ndarray]:
    """Gradients ``[2, 3, 16]`` with NaN/inf entries, from one alone to more than k per row."""
    rng = np.random.default_rng(11)
    base = rng.integers(-8, 9, size=(*LEAD, OUT)).astype(np.float32)
    base[..., 0] = 1000.0  # the column every finite rule would rank first
    cases = []
    for bad in (np.nan, np.inf, -np.inf):
        g = base.copy()
        g[1, 2, 5] = bad
        cases.append(g)
        g = base.copy()
        g[0, 0, 12] = bad
        cases.append(g)
    g = base.copy()
    g[0, 1, [2, 6, 9, 14]] = [np.inf, np.nan, -np.inf, np.inf]
    g[1, 1, 9] = -np.inf
    g[1, 2, 15] = np.nan
    cases.append(g)
    g = base.copy()
    g[:, :, 3] = np.nan  # a whole column
    g[0, 2, 7] = np.inf
    cases.append(g)
    return cases


@functools.partial(jax.jit, static_argnames=("k", "mode", "groups", "compact"))
def _grads(x, w, b, g, key, *, k, mode, groups, compact):
    """``(dx, dW or its CompactGrad, db)`` of a sparsified linear layer with sparse_bias."""
    tap = None
    if compact:
        tap = meprop_jax.compact_tap(N_IN, OUT, k=k, mode=mode, groups=groups, batch_shape=LEAD)

    def f(x, w, b, tap):
        taps = None if tap is None else (tap,)
        y = meprop_jax.multi_linear(
            (x,), (w,), b, k=k, mode=mode, key=key, groups=groups, sparse_bias=True, taps=taps
        )
        return y

    _, vjp = jax.vjp(f, x, w, b, tap)
    dx, dw, db, dtap = vjp(g)
    return dx, dtap if compact else dw, db


def test_dense_backprop_spreads_non_finite_entries_over_rows_and_columns():
    # The pattern the sparsified layer must reproduce: checked here on dense backprop itself.
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((*LEAD, N_IN)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((N_IN, OUT)).astype(np.float32))
    b = jnp.zeros(OUT, jnp.float32)
    dense = jax.jit(lambda g: jax.vjp(lambda x, w, b: x @ w + b, x, w, b)[1](g))
    for g in _non_finite_cases():
        dx, dw, db = (np.asarray(a) for a in dense(jnp.asarray(g)))
        bad_rows = ~np.isfinite(g).all(-1)
        bad_cols = ~np.isfinite(g).all((0, 1))
        np.testing.assert_array_equal(
            np.isfinite(dx), np.broadcast_to(~bad_rows[..., None], dx.shape)
        )
        np.testing.assert_array_equal(np.isfinite(dw), np.broadcast_to(~bad_cols, dw.shape))
        np.testing.assert_array_equal(np.isfinite(db), ~bad_cols)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize(
    ("k", "groups"),
    [(1, 1), (3, 1), (1, 2)],  # per-row modes: union of columns, masked dense, grouped union
)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_gradient_reaches_dx_and_dw_as_in_dense_backprop(mode, k, groups, compact):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((*LEAD, N_IN)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((N_IN, OUT)).astype(np.float32))
    b = jnp.zeros(OUT, jnp.float32)
    key = jax.random.key(3, impl="rbg")
    spoiled = 0
    for g in _non_finite_cases():
        bad_rows = ~np.isfinite(g).all(-1)
        bad_cols = ~np.isfinite(g).all((0, 1))
        if mode == "unified" and np.any(bad_cols.reshape(groups, -1).sum(-1) > k):
            bad_rows[...] = True  # a non-finite column was dropped: dx is NaN throughout
            spoiled += 1
        dx, dw, db = _grads(
            x, w, b, jnp.asarray(g), key, k=k, mode=mode, groups=groups, compact=compact
        )
        dx, db = np.asarray(dx), np.asarray(db)
        # Dense backprop: the rows and columns of g holding a NaN or inf are non-finite.
        np.testing.assert_array_equal(
            np.isfinite(dx), np.broadcast_to(~bad_rows[..., None], dx.shape)
        )
        np.testing.assert_array_equal(np.isfinite(db), ~bad_cols)
        if not compact:
            np.testing.assert_array_equal(np.isfinite(dw), np.broadcast_to(~bad_cols, dw.shape))
            continue
        block, cols = np.asarray(dw.block), np.asarray(dw.cols).astype(int)
        held = cols < OUT
        assert not np.isfinite(block).all()
        np.testing.assert_array_equal(
            np.isfinite(block[held]),
            np.broadcast_to(~bad_cols[cols[held]][:, None], block[held].shape),
        )
        np.testing.assert_array_equal(block[~held], 0.0)
    assert (spoiled > 0) == (mode == "unified")  # both unified outcomes were exercised


# --------------------------------------------------------------------------- random


def test_random_mask_exactly_k_distinct_per_row():
    key = jax.random.key(0)
    for shape, k, groups in [((2, 3, 7), 3, 1), ((4, 12), 2, 4), ((9,), 9, 1)]:
        mask = np.asarray(jit_random_mask(key, shape, k, groups))
        assert mask.shape == shape and mask.dtype == np.bool_
        blocks = mask.reshape((*shape[:-1], groups, -1))
        np.testing.assert_array_equal(blocks.sum(-1), np.full((*shape[:-1], groups), k))


def test_random_mask_reproducible_and_key_dependent():
    shape, k = (16, 10), 3
    a = np.asarray(jit_random_mask(jax.random.key(1), shape, k, 1))
    b = np.asarray(jit_random_mask(jax.random.key(1), shape, k, 1))
    c = np.asarray(jit_random_mask(jax.random.key(2), shape, k, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Rows are not all the same selection.
    assert len({tuple(row) for row in a.tolist()}) > 1


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_mask_uniform_over_subsets():
    # 4000 rows, each a 2-subset of 6 columns: 15 subsets with 266.7 expected each.
    n_rows, n, k = 4000, 6, 2
    mask = np.asarray(jit_random_mask(jax.random.key(3), (n_rows, n), k, 1))
    subsets = list(itertools.combinations(range(n), k))
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for row in mask:
        counts[index[tuple(np.flatnonzero(row))]] += 1
    # 14 degrees of freedom: P(chi2 > 45) is about 4e-5.
    assert _chi_square(counts) < 45.0
    # Every column is kept with probability k / n.
    per_column = mask.sum(0)
    assert _chi_square(per_column) < 25.0  # 5 degrees of freedom, very loose
    np.testing.assert_allclose(per_column / n_rows, k / n, atol=0.03)


def test_random_mask_groups_uniform_within_blocks():
    mask = np.asarray(jit_random_mask(jax.random.key(4), (3000, 8), 1, 2))
    blocks = mask.reshape(3000, 2, 4)
    np.testing.assert_array_equal(blocks.sum(-1), 1)
    for b in range(2):
        assert _chi_square(blocks[:, b].sum(0)) < 25.0  # 3 degrees of freedom


# --------------------------------------------------------------------------- doctests


def test_doctest_examples():
    result = doctest.testmod(_selection, verbose=False)
    assert result.attempted >= 2
    assert result.failed == 0


def test_docstring_examples_explicitly():
    g = jnp.array([[1.0, -5.0, 0.0, 2.0], [1.0, 0.0, 0.0, -2.0]])
    assert unified_columns(g, 2).tolist() == [1, 3]
    g = jnp.array([[1.0, -5.0, 0.0, 2.0], [3.0, 0.0, 0.0, -2.0]])
    assert per_example_mask(g, 1).astype(int).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("k", [True, False, 2.0, 0.5, "3", None, [1], jnp.float32(2.0)])
def test_check_k_rejects_non_integers(k):
    with pytest.raises(TypeError, match=r"\bk\b"):
        check_k(k)


@pytest.mark.parametrize("k", [-1, np.int64(-2)])
def test_check_k_rejects_negative(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        check_k(k)


@pytest.mark.parametrize("k", [0, 3, np.int64(3), np.int32(5), np.uint8(7)])
def test_check_k_accepts_integers(k):
    value = check_k(k)
    assert type(value) is int
    assert value == int(k)


@pytest.mark.parametrize("mode", ["Unified", "topk", "", "per example", None, 1])
def test_check_mode_rejects_unknown_and_lists_valid_modes(mode):
    with pytest.raises(ValueError, match="mode") as info:
        check_mode(mode)
    for name in MODES:
        assert name in str(info.value)


def test_check_mode_accepts_modes_and_alias():
    assert MODES == ("unified", "per_example", "random")
    for name in MODES:
        assert check_mode(name) == name
    assert check_mode("per-example") == "per_example"


@pytest.mark.parametrize("groups", [0, -1, 2.0, True, None])
def test_check_groups_rejects_non_positive_ints(groups):
    with pytest.raises(ValueError, match="groups"):
        check_groups(groups, 8)


def test_check_groups_must_divide_out():
    assert check_groups(4, 8) == 4
    with pytest.raises(ValueError, match="groups"):
        check_groups(3, 8)


def test_is_dense():
    assert is_dense(0, 10)
    assert is_dense(10, 10)
    assert is_dense(11, 10)
    assert not is_dense(9, 10)
    assert is_dense(3, 12, groups=4)
    assert not is_dense(2, 12, groups=4)


def test_public_exports():
    for name in ("column_scores", "per_example_mask", "random_mask", "top_k_mask"):
        assert getattr(meprop_jax, name) is getattr(_selection, name)
    assert meprop_jax.unified_columns is unified_columns
    assert meprop_jax.MODES == MODES
