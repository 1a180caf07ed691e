"""The native CPU kernels of the per-row backward (``meprop_jax._src.native``) and their
fallback: both paths give the NumPy reference's gradients, the kernels are really called when
built, and without a compiler everything still works, with one log line."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meprop_jax
from meprop_jax import multi_linear
from meprop_jax._src import native
from tests.meprop_jax._src.test_linear import check_against_reference, fast_key, ref_mask
from tests.meprop_jax._src.test_rowwise import vjp_in_layout

needs_compiler = pytest.mark.skipif(
    native._compiler() is None, reason="no C++ compiler: only the fallback can run"
)


def _problem(seed, lead, out, n_ins=(5,), bad=None):
    rng = np.random.default_rng(seed)
    xs = tuple(rng.standard_normal((*lead, n)).astype(np.float32) for n in n_ins)
    ws = tuple(rng.standard_normal((n, out)).astype(np.float32) for n in n_ins)
    b = rng.standard_normal(out).astype(np.float32)
    g = (rng.integers(-40, 41, size=(*lead, out)) / 8.0).astype(np.float32)
    if bad is not None:
        g.reshape(-1, out)[1, :3] = bad  # more non-finite entries than k=2 in one row
        g.reshape(-1, out)[0, 2] = 99.0  # row 0 selects column 2, which row 1 drops
    return xs, ws, b, g


def _lowered_text(xs, ws, b, g, *, k, mode, groups, layout, compact):
    """The compiled program of the backward pass (dense ``dW``; ``compact`` is the same
    path), as text."""
    del compact
    stored = tuple(w if layout == "in_out" else w.T for w in ws)

    def fn(xs, ws, b, g):
        f = lambda xs, ws, b: multi_linear(
            xs, ws, b, k=k, mode=mode, key=fast_key(1), groups=groups, kernel_layout=layout
        )
        return jax.vjp(f, xs, ws, b)[1](g)

    return jax.jit(fn).lower(xs, stored, b, g).as_text()


@needs_compiler
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("mode", ["per_example", "random"])
@pytest.mark.parametrize(
    ("lead", "out", "groups", "n_ins"),
    # "covering": 6 rows of k = 2 cover the 8 columns, so the kernels compute dx alone. The
    # "-threads" cases are large enough for the kernels to split rows and slots into chunks
    # that XLA's thread pool runs side by side.
    [
        ((3,), 20, 1, (5,)),
        ((2, 2), 24, 4, (5, 3)),
        ((6,), 8, 1, (5,)),
        ((40,), 200, 1, (600,)),
        ((120,), 200, 1, (600,)),
    ],
    ids=["union", "groups", "covering", "union-threads", "covering-threads"],
)
def test_native_and_fallback_match_the_reference(layout, compact, mode, lead, out, groups, n_ins):
    xs, ws, b, g = _problem(out, lead, out, n_ins)
    kw = dict(k=1 if groups > 1 else 2, mode=mode, groups=groups, layout=layout, compact=compact)
    key = fast_key(1)
    assert native.enabled()
    # Covering rows take the kernels for [out, in] kernels only (contiguous rows for dx).
    native_path = out > int(np.prod(lead)) * kw["k"] * groups or layout == "out_in"
    assert ("meprop_products" in _lowered_text(xs, ws, b, g, **kw)) == native_path
    with_native = vjp_in_layout(xs, ws, b, g, key, **kw)
    with native.disabled():
        assert "meprop_products" not in _lowered_text(xs, ws, b, g, **kw)
        fallback = vjp_in_layout(xs, ws, b, g, key, **kw)
    mask = ref_mask(g, kw["k"], mode, key, groups)
    for grads in (with_native, fallback):
        check_against_reference(grads[:3], list(xs), list(ws), g, mask, False, True)
    if compact:  # the same compact gradient, column order and padding included
        for a, e in zip(with_native[3], fallback[3], strict=True):
            np.testing.assert_array_equal(a.cols, e.cols)
            np.testing.assert_allclose(a.block, e.block, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize(
    ("rows", "compact"), [(4, False), (4, True), (8, False)], ids=["union", "compact", "covering"]
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_native_non_finite_rule(rows, compact, bad):
    """Row 1 keeps 2 of its 3 non-finite entries; the dropped one's column 2, selected by row
    0, must be non-finite in dW as in dense backprop, on both paths alike: in the union's
    block, and in the dense dW that 8 rows covering the 12 columns sum natively."""
    xs, ws, b, g = _problem(3, (rows,), 12, bad=bad)
    xs = (xs[0] + 5.0,)  # no zero inputs: inf * 0 would hide nothing but make NaN
    kw = dict(k=2, mode="per_example", groups=1, layout="out_in", compact=compact)
    assert "meprop_products" in _lowered_text(xs, ws, b, g, **kw)
    results = [vjp_in_layout(xs, ws, b, g, None, **kw)]
    with native.disabled():
        results.append(vjp_in_layout(xs, ws, b, g, None, **kw))
    dense_bad = ~np.all(np.isfinite(xs[0].T @ g), axis=0)
    assert dense_bad[2]
    for dxs, dws, _, taps in results:
        np.testing.assert_array_equal(np.isfinite(dxs[0]).all(1), np.arange(rows) != 1)
        if compact:
            cols = np.asarray(taps[0].cols).astype(int)
            finite = np.isfinite(np.asarray(taps[0].block)).all(1)
            np.testing.assert_array_equal(finite, [c >= 12 or not dense_bad[c] for c in cols])
        else:
            np.testing.assert_array_equal(np.isfinite(dws[0]).all(0), ~dense_bad)


def test_no_compiler_falls_back_with_one_log_line(tmp_path):
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        import meprop_jax
        from meprop_jax._src import native
        x = jnp.arange(12.0).reshape(3, 4)
        w = jnp.ones((4, 20))
        g = jnp.arange(60.0).reshape(3, 20)
        f = lambda x, w: meprop_jax.linear(x, w, k=2, mode="per_example")
        for _ in range(3):  # three traces, one log line
            dx, dw = jax.vjp(f, x, w)[1](g)
        assert not native.enabled()
        mask = np.zeros((3, 20)); mask[:, 18:] = 1
        np.testing.assert_allclose(dw, np.asarray(x).T @ (np.asarray(g) * mask))
        print("ok")
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "MEPROP_JAX_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr.count("native CPU kernels unavailable") == 1, done.stderr
    assert not list(tmp_path.glob("*.so"))


@needs_compiler
def test_build_goes_to_the_cache_directory(tmp_path):
    env = {**os.environ, "MEPROP_JAX_CACHE": str(tmp_path / "cache")}
    script = (
        "from meprop_jax._src import native; assert native.enabled(); print(native.cache_dir())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cache").glob("meprop_rowwise-*.so"))) == 1
    assert shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX")


@needs_compiler
@pytest.mark.parametrize("width", [7, 500, 3000])
def test_select_is_lax_top_k(width):
    """The native row selection returns lax.top_k's indices in its order: ties (many zeros,
    -0.0 beside +0.0, repeated values), negative scores, +inf and widths above its histogram."""
    rng = np.random.default_rng(width)
    k = min(5, width)
    rows = [
        rng.standard_normal(width),
        np.abs(rng.standard_normal(width)) * (rng.random(width) < 0.3),  # mostly zeros
        np.round(rng.standard_normal(width) * 2) / 2,  # few distinct values
        -np.abs(rng.standard_normal(width)),
        np.where(rng.random(width) < 0.5, -0.0, 0.0),
    ]
    spiked = rng.standard_normal(width)
    spiked[[0, width // 2, width - 1]] = np.inf
    scores = jnp.asarray(np.stack([*rows, spiked]), jnp.float32)
    if not native.enabled():
        pytest.fail("the native kernels did not build")
    np.testing.assert_array_equal(native.select(scores, k, 1), jax.lax.top_k(scores, k)[1])


@needs_compiler
def test_native_paths_run_under_a_one_device_mesh():
    """A data-parallel loop on one CPU puts its batch on a one-device ``jax.make_mesh``: the
    native kernels (selection, products and sparse_adam's fused pass) still run there, with
    their results typed like their inputs, and give the XLA path's numbers."""
    from meprop_jax import optim

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    w_t = jnp.asarray(rng.standard_normal((40, 9)), jnp.float32)
    params = {"kernel_t": w_t}
    tap = {"kernel_t": meprop_jax.compact_tap(9, 40, k=2, mode="per_example", batch_shape=(6,))}
    opt = optim.sparse_adam(0.1)

    def step(params, state, x, g):
        f = lambda x, t: meprop_jax.linear(
            x, params["kernel_t"], None, k=2, mode="per_example", tap=t, kernel_layout="out_in"
        )
        dx, tap_grad = jax.vjp(f, x, tap["kernel_t"])[1](g)
        return (dx, *opt.update({"kernel_t": None}, state, params, {"kernel_t": tap_grad}))

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        xs, gs = jax.device_put(x, batch), jax.device_put(g, batch)
        compiled = jax.jit(step)
        text = compiled.lower(params, opt.init(params, tap), xs, gs).as_text()
        native_out = compiled(params, opt.init(params, tap), xs, gs)
        with native.disabled():
            xla_out = jax.jit(step)(params, opt.init(params, tap), xs, gs)
    for target in ("meprop_select", "meprop_products", "meprop_adam_rows"):
        assert target in text
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), native_out, xla_out
    )


@needs_compiler
@pytest.mark.parametrize(("lead", "out"), [((3,), 20), ((6,), 8)], ids=["union", "covering"])
@pytest.mark.parametrize("compact", [False, True])
def test_an_input_autodiff_does_not_differentiate_gets_no_dx(lead, out, compact):
    """A network's first input is data: the kernels skip its ``dx`` (an empty ``[0, in]``
    result) and the other gradients are the ones of the full backward, bit for bit."""
    xs, ws, b, g = _problem(out, lead, out, (5, 3))
    ws_t = tuple(w.T for w in ws)
    taps = tuple(
        meprop_jax.compact_tap(n, out, k=2, mode="per_example", batch_shape=lead) for n in (5, 3)
    )

    kw = dict(k=2, mode="per_example", kernel_layout="out_in")

    def layer(xs, ws, b, taps):
        return multi_linear(xs, ws, b, taps=taps if compact else None, **kw)

    def grads_but_x0(x0, x1, ws, b, taps):
        return jax.vjp(lambda x1, *rest: layer((x0, x1), *rest), x1, ws, b, taps)[1](g)

    text = jax.jit(grads_but_x0).lower(*xs, ws_t, b, taps).as_text()
    calls = [line for line in text.splitlines() if "@meprop_products" in line]
    assert len(calls) == 2
    assert sum("-> (tensor<0x5xf32>" in line for line in calls) == 1  # x0: no dx
    assert sum(f"-> (tensor<{lead[0]}x3xf32>" in line for line in calls) == 1  # x1: its dx
    some = jax.jit(grads_but_x0)(*xs, ws_t, b, taps)
    every = jax.jit(lambda *a: jax.vjp(layer, *a)[1](g))(xs, ws_t, b, taps)
    np.testing.assert_array_equal(some[0], every[0][1])
    for a, e in zip(jax.tree.leaves(some[1:]), jax.tree.leaves(every[1:]), strict=True):
        np.testing.assert_array_equal(a, e)
