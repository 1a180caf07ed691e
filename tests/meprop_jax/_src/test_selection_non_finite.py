"""Non-finite gradients in the selection rules: a NaN or an infinity is always selected
(first in its row or column), and through ``linear`` it reaches ``dx`` and ``dW`` as it would
in dense backprop, in every mode and with compact gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meprop_jax
from meprop_jax._src import selection as _selection
from meprop_jax._src.selection import (
    MODES,
    per_example_mask,
    random_mask,
    top_k_mask,
    unified_columns,
)

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
