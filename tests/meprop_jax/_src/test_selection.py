"""The selection rules of ``meprop_jax._src.selection`` against a NumPy reference.

Reference rule: rank by ``|g|`` in descending order with a stable sort, so that ties go to the
lower column index; the unified rule ranks columns by the sum of ``|g|`` over every leading
axis. Gradients are drawn from small integer sets (scaled by a power of two) so that every
column sum is exact in float32 and ties are frequent: NumPy and JAX must then agree exactly.
"""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meprop_jax
from meprop_jax._src import selection as _selection
from meprop_jax._src.selection import (
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
