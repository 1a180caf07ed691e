"""The per-row modes' backward pass (``meprop_jax._src.rowwise``) and the ``"out_in"`` layout.

Gradients are checked against the NumPy reference of ``test_linear`` in both kernel layouts
and both weight-gradient forms (dense and compact), on both of the per-row code paths
(``N * k`` below ``out``: a block over the union of columns; at or above: the full product).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import meprop_jax
from meprop_jax import multi_linear
from meprop_jax._src import native, rowwise
from tests.meprop_jax._src.test_linear import (
    MODES,
    check_against_reference,
    fast_key,
    integer_gradient,
    ref_mask,
)


def vjp_in_layout(xs, ws, b, g, key, *, k, mode, groups, layout, compact=False):
    """``(dxs, dws, db)`` with every ``dW`` as ``[in, out]`` (a compact one made dense)."""
    stored = tuple(w if layout == "in_out" else w.T for w in ws)
    lead = g.shape[:-1]
    out = g.shape[-1]
    if compact:
        taps = tuple(
            meprop_jax.compact_tap(w.shape[0], out, k=k, mode=mode, groups=groups, batch_shape=lead)
            for w in ws
        )

        def f(xs, taps, b):
            return multi_linear(
                xs, stored, b, k=k, mode=mode, key=key, groups=groups, taps=taps,
                kernel_layout=layout,
            )  # fmt: skip

        dxs, tap_grads, db = jax.vjp(f, xs, taps, b)[1](g)
        dws = [dense_from_compact(t, w.shape[0], out) for t, w in zip(tap_grads, ws, strict=True)]
        return dxs, dws, db, tap_grads

    def f(xs, ws, b):
        return multi_linear(xs, ws, b, k=k, mode=mode, key=key, groups=groups, kernel_layout=layout)

    dxs, dws, db = jax.vjp(f, xs, stored, b)[1](g)
    dws = [np.asarray(d) if layout == "in_out" else np.asarray(d).T for d in dws]
    return dxs, dws, db, None


def two_input_problem(lead, out, k):
    """``(xs, ws, b, g, key)``: a two-input layer ``[*lead, 5], [*lead, 3] -> out`` with a tied
    integer gradient, seeded by ``out + k``."""
    rng = np.random.default_rng(out + k)
    xs = (
        rng.standard_normal((*lead, 5)).astype(np.float32),
        rng.standard_normal((*lead, 3)).astype(np.float32),
    )
    ws = tuple(rng.standard_normal((x.shape[-1], out)).astype(np.float32) for x in xs)
    b = rng.standard_normal(out).astype(np.float32)
    g = integer_gradient(rng, (*lead, out), "ties")
    key = fast_key(4)
    return xs, ws, b, g, key


def dense_from_compact(tap, n_in, out):
    cols = np.asarray(tap.cols).astype(int)
    block = np.asarray(tap.block)
    valid = cols < out
    assert len(set(cols.tolist())) == len(cols), "compact columns must be distinct"
    assert np.all(block[~valid] == 0), "padding rows must be zero"
    dense = np.zeros((n_in, out), block.dtype)
    dense[:, cols[valid]] = block[valid].T
    return dense


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("lead", "out", "k", "groups"),
    [
        ((2,), 12, 3, 1),  # N*k = 6 < 12: the union's block
        ((3, 2), 40, 2, 4),  # N*groups*k = 48 >= 40: the masked full product
        ((4,), 24, 1, 4),  # 16 < 24, with gates
    ],
)
def test_layouts_and_forms_match_reference(layout, compact, mode, lead, out, k, groups):
    xs, ws, b, g, key = two_input_problem(lead, out, k)
    dxs, dws, db, _ = vjp_in_layout(
        xs, ws, b, g, key, k=k, mode=mode, groups=groups, layout=layout, compact=compact
    )
    mask = ref_mask(g, k, mode, key, groups)
    check_against_reference((dxs, dws, db), list(xs), list(ws), g, mask, False, True)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_out_in_forward_is_the_same_layer(layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    stored = w if layout == "in_out" else w.T
    for k in (0, 2):
        y = meprop_jax.linear(x, stored, k=k, mode="per_example", kernel_layout=layout)
        np.testing.assert_allclose(y, x @ w, rtol=1e-6, atol=1e-6)


def test_kernel_layout_errors_name_the_argument():
    x, w = jnp.ones((2, 4)), jnp.ones((4, 6))
    with pytest.raises(ValueError, match="kernel_layout"):
        meprop_jax.linear(x, w, k=1, kernel_layout="transposed")
    with pytest.raises(ValueError, match=r"kernels\[0\] must be \[out, in\]"):
        meprop_jax.linear(x, w, k=1, kernel_layout="out_in")


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_past_a_rows_k_still_spoils_its_column(layout, compact, bad):
    """Row 1 holds two non-finite entries but keeps one (k=1): the other's column, which row 0
    selects, must come out non-finite in dW, as in dense backprop; dx of row 1 too."""
    rng = np.random.default_rng(1)
    n_in, out = 3, 10
    x = (rng.standard_normal((4, n_in)) + 3.0).astype(np.float32)
    w = rng.standard_normal((n_in, out)).astype(np.float32)
    b = np.zeros(out, np.float32)
    g = np.full((4, out), 0.5, np.float32)
    g[0, 7] = 9.0  # row 0 selects column 7
    g[1, 2] = bad
    g[1, 7] = bad  # row 1 keeps column 2 (lower index); column 7's bad entry is past its k
    dxs, dws, _, taps = vjp_in_layout(
        (x,), (w,), b, g, None, k=1, mode="per_example", groups=1, layout=layout,
        compact=compact,
    )  # fmt: skip
    dense = np.asarray(x).T @ g  # where dense backprop is non-finite
    bad_cols = ~np.all(np.isfinite(dense), axis=0)
    assert set(np.flatnonzero(bad_cols)) == {2, 7}
    dw = dws[0]
    if compact:
        tap = taps[0]
        cols = np.asarray(tap.cols).astype(int)
        finite_rows = np.all(np.isfinite(np.asarray(tap.block)), axis=1)
        for c, ok in zip(cols, finite_rows, strict=True):
            assert ok == (c >= out or not bad_cols[c]), c
    else:
        np.testing.assert_array_equal(np.all(np.isfinite(dw), axis=0), ~bad_cols)
    dx = np.asarray(dxs[0])
    np.testing.assert_array_equal(np.all(np.isfinite(dx), axis=1), [True, False, True, True])


def test_union_columns_are_distinct_with_distinct_padding():
    idx = jnp.array([[3, 1], [1, 4], [3, 0]], jnp.int32)
    mask = rowwise.selection_mask(idx, 6)
    cols = np.asarray(rowwise.union_columns(idx, mask))
    np.testing.assert_array_equal(cols, [3, 1, 6 + 2, 4, 6 + 4, 0])


def test_row_top_k_is_the_mask_selection():
    rng = np.random.default_rng(3)
    scores = jnp.asarray(rng.integers(0, 4, size=(5, 12)).astype(np.float32))
    scores = scores.at[2, 5].set(jnp.nan)
    for groups, k in ((1, 3), (4, 2)):
        idx = rowwise.row_top_k(scores, k, groups)
        got = np.asarray(rowwise.selection_mask(idx, 12))
        blocks = scores.reshape(5, groups, -1)
        want = np.asarray(meprop_jax.top_k_mask(blocks, k)).reshape(5, 12)
        np.testing.assert_array_equal(got, want)


def _selected_sets(idx) -> list[set[int]]:
    idx = np.asarray(idx)
    return [set(row.tolist()) for row in idx.reshape(-1, idx.shape[-1])]


def _seeded_scores() -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (scores, whether the seeded TopK call alone is exact)."""
    rng = np.random.default_rng(11)
    distinct = np.abs(rng.standard_normal((3, 4, 130))).astype(np.float32)
    relu = distinct[0] * (rng.random((4, 130)) < 0.04)  # about 5 positive per row, then zeros
    whole_tie = np.abs(rng.standard_normal((6, 130))).astype(np.float32)
    whole_tie[:, [7, 70, 128]] = 9.0  # all three kept
    split_tie = np.abs(rng.standard_normal((6, 130))).astype(np.float32) / 10
    split_tie[:, ::3] = 1.0  # 44 equal scores, 9 or 32 kept
    short = np.full((2, 130), -np.inf, np.float32)
    short[:, [5, 50]] = 1.0
    signed = rng.standard_normal((2, 130)).astype(np.float32)
    zeros = np.zeros((2, 130), np.float32)
    zeros[:, ::2] = -0.0  # ranks below 0.0 in lax.top_k
    zeros[:, 3] = np.inf
    return dict(
        distinct=(distinct, True),
        relu=(relu, True),
        whole_tie=(whole_tie, True),
        split_tie=(split_tie, False),
        short=(short, False),
        signed=(signed, False),
        zeros=(zeros, False),
    )


@pytest.mark.parametrize("case", sorted(_seeded_scores()))
def test_seeded_top_k_keeps_what_top_k_keeps(case):
    scores, exact = _seeded_scores()[case]
    scores = jnp.asarray(scores)
    for k in (9, 32):  # 130 is not a multiple of the blocks: the last block is padded
        want = jax.lax.top_k(scores, k)[1]
        idx, seeded_exact = jax.jit(rowwise.seeded_selection, static_argnums=1)(scores, k)
        assert bool(seeded_exact) == exact
        if exact:
            assert _selected_sets(idx) == _selected_sets(want)
        got = jax.jit(rowwise._seeded_top_k, static_argnums=1)(scores, k)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _selected_sets(got) == _selected_sets(want)


def test_seeded_top_k_serves_row_top_k_on_cpu():
    scores = jnp.asarray(_seeded_scores()["distinct"][0])
    hlo = jax.jit(lambda s: rowwise.row_top_k(s, 9, 2)).lower(scores).compile().as_text()
    if jax.default_backend() == "cpu":
        # The seeded call and, in the tie branch, the plain one; neither became a sort.
        assert hlo.count('custom_call_target="TopK"') == 2
        assert " sort(" not in hlo
    mask = np.asarray(rowwise.selection_mask(rowwise.row_top_k(scores, 9, 2), 130))
    want = np.asarray(meprop_jax.top_k_mask(scores.reshape(3, 4, 2, 65), 9)).reshape(mask.shape)
    np.testing.assert_array_equal(mask, want)


def test_other_backends_keep_the_plain_top_k():
    # Exported for GPU and TPU (no device needed): no seeding, so no row is rebuilt.
    select = jax.jit(lambda s: rowwise.row_top_k(s, 9))
    scores = jax.ShapeDtypeStruct((4, 130), jnp.float32)
    for platform in ("cuda", "tpu"):
        module = jax.export.export(select, platforms=[platform])(scores).mlir_module()
        assert "top_k" in module and "concatenate" not in module
    assert "concatenate" in jax.export.export(select, platforms=["cpu"])(scores).mlir_module()


def test_seeded_top_k_on_rows_sharded_over_devices():
    assert len(jax.devices()) == 8
    scores = np.concatenate([_seeded_scores()[name][0] for name in ("relu", "whole_tie")])[:8]
    select = jax.jit(lambda s: rowwise.row_top_k(s, 9, 2))
    single = select(jnp.asarray(scores))
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        sharded = select(jax.device_put(jnp.asarray(scores), P("data")))
        assert jax.typeof(sharded).sharding.spec[0] == "data"
    assert _selected_sets(sharded) == _selected_sets(single)


@pytest.mark.parametrize("layout", rowwise.KERNEL_LAYOUTS)
@pytest.mark.parametrize("slots", [3, 70])  # summed slot by slot; past UNROLLED_SLOTS, einsum
def test_gathered_input_grad_is_the_sum_of_kernel_rows(layout, slots):
    assert (slots <= rowwise.UNROLLED_SLOTS) == (slots == 3)
    rng = np.random.default_rng(5)
    n, n_in, out = 4, 6, 90
    w = rng.standard_normal((n_in, out)).astype(np.float32)
    idx = np.stack([rng.choice(out, slots, replace=False) for _ in range(n)]).astype(np.int32)
    g_kept = rng.standard_normal((n, slots)).astype(np.float32)
    want = np.einsum("ns,nsi->ni", g_kept, w.T[idx])
    stored = w if layout == "in_out" else w.T.copy()
    got = rowwise.gathered_input_grad(
        jnp.asarray(g_kept), jnp.asarray(idx), jnp.asarray(stored), layout, None, jnp.float32
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's TopK call")
def test_per_row_selection_stays_one_top_k_call():
    # Slicing top_k's indices slot by slot once made XLA:CPU sort every row in full.
    x = jnp.ones((10, 30), jnp.float32)
    w = jnp.ones((30, 50), jnp.float32)
    g = jnp.asarray(np.random.default_rng(0).standard_normal((10, 50)), jnp.float32)

    def dx(x, w, g):
        f = lambda x: multi_linear((x,), (w,), None, k=4, mode="per_example")
        return jax.vjp(f, x)[1](g)

    with native.disabled():
        hlo = jax.jit(dx).lower(x, w, g).compile().as_text()
    assert 'custom_call_target="TopK"' in hlo
    assert " sort(" not in hlo
