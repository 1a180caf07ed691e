"""Factored per-row weight gradients (``FactoredGrad``, ``meprop_jax._src.factored``).

The factors are turned into a dense ``[in, out]`` gradient here in NumPy, independently of
the library, and checked against the NumPy reference of ``test_linear``; the optimizers must
take exactly the steps they take from the same gradient as a compact block.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meprop_jax
from meprop_jax import multi_linear, optim
from meprop_jax import nnx as mnnx
from meprop_jax._src import factored, native
from tests.meprop_jax._src.test_linear import (
    check_against_reference,
    integer_gradient,
    ref_mask,
)
from tests.meprop_jax._src.test_rowwise import (
    dense_from_compact,
    two_input_problem,
    vjp_in_layout,
)
from tests.meprop_jax.nnx.test_optimizer import (
    BATCH,
    IN,
    MLP,
    LinenMLP,
    batches,
    compact_step,
    linen_step,
    load_linen,
    params_of,
)

PATHS = {"native": contextlib.nullcontext, "xla": native.disabled}
needs_native = pytest.mark.skipif(
    native._compiler() is None, reason="no C++ compiler: only the fallback can run"
)


def dense_from_factors(tap, out):
    """``dW [in, out]`` of a factored gradient, summed in NumPy."""
    values, cols = np.asarray(tap.values), np.asarray(tap.cols)
    inputs = np.asarray(tap.inputs)
    assert np.all(cols == np.round(cols)) and float(tap.uses) == 1.0
    dense = np.zeros((inputs.shape[1], out), np.float64)
    for n, s in np.ndindex(values.shape):
        dense[:, int(cols[n, s])] += values[n, s] * inputs[n]
    return dense.astype(np.float32)


def factored_vjp(xs, ws, b, g, key, *, k, mode, groups, layout):
    stored = tuple(w if layout == "in_out" else w.T for w in ws)
    lead, out = g.shape[:-1], g.shape[-1]
    taps = tuple(
        meprop_jax.compact_tap(
            w.shape[0], out, k=k, mode=mode, groups=groups, batch_shape=lead, factored=True
        )
        for w in ws
    )

    def f(xs, taps, b):
        return multi_linear(
            xs, stored, b, k=k, mode=mode, key=key, groups=groups, taps=taps, kernel_layout=layout
        )

    return jax.jit(lambda xs, taps, b, g: jax.vjp(f, xs, taps, b)[1](g))(xs, taps, b, g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("mode", ["per_example", "random"])
@pytest.mark.parametrize(
    ("lead", "out", "k", "groups"),
    [((2,), 12, 3, 1), ((3, 2), 40, 2, 4), ((4,), 24, 1, 4)],  # below and above covering
)
def test_factored_gradients_match_reference(path, layout, mode, lead, out, k, groups):
    xs, ws, b, g, key = two_input_problem(lead, out, k)
    with PATHS[path]():
        dxs, taps, db = factored_vjp(
            xs, ws, b, g, key, k=k, mode=mode, groups=groups, layout=layout
        )
    for tap, x in zip(taps, xs, strict=True):
        assert tap.values.shape == (x.size // x.shape[-1], groups * k)
    dws = [dense_from_factors(t, out) for t in taps]
    mask = ref_mask(g, k, mode, key, groups)
    check_against_reference((dxs, dws, db), list(xs), list(ws), g, mask, False, True)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_factored_rows_are_the_compact_block(layout):
    rng = np.random.default_rng(5)
    lead, out, k = (6,), 30, 3
    x = rng.standard_normal((*lead, 7)).astype(np.float32)
    w = rng.standard_normal((7, out)).astype(np.float32)
    b = np.zeros(out, np.float32)
    g = integer_gradient(rng, (*lead, out), "ties")
    args = dict(k=k, mode="per_example", groups=1, layout=layout)
    *_, (compact,) = vjp_in_layout((x,), (w,), b, g, None, compact=True, **args)
    _, (tap,), _ = factored_vjp((x,), (w,), b, g, None, **args)
    block, cols = factored.factored_rows(tap.values, tap.cols.astype(jnp.int32), tap.inputs, out)
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(compact.cols).astype(int))
    np.testing.assert_allclose(block, compact.block, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        dense_from_compact(compact, 7, out), dense_from_factors(tap, out), rtol=1e-6, atol=1e-6
    )


def _train(form, opt, layout, steps=4, nan_at=None):
    """``steps`` of a one-layer regression with ``opt``; the kernel after them, ``[out, in]``."""
    rng = np.random.default_rng(11)
    n, d_in, out, k = 5, 9, 16, 2
    kernel = jnp.asarray(rng.standard_normal((d_in, out)) / 3, jnp.float32)
    name = "kernel" if layout == "in_out" else "kernel_t"
    params = {name: kernel if layout == "in_out" else kernel.T, "bias": jnp.zeros((out,))}
    tap = meprop_jax.compact_tap(
        d_in, out, k=k, mode="per_example", batch_shape=(n,), factored=form == "factored"
    )
    taps = {name: tap}
    target = jnp.asarray(rng.standard_normal((n, out)), jnp.float32)

    def loss(p, t, x):
        y = meprop_jax.linear(
            x, p[name], p["bias"], k=k, mode="per_example", tap=t[name], kernel_layout=layout
        )
        return jnp.sum((y - target) ** 2)

    @jax.jit
    def step(p, s, t, x):
        _, (grads, tap_grads) = optim.value_and_compact_grad(loss)(p, t, x)
        return opt.update(grads, s, p, tap_grads)

    state = opt.init(params, taps)
    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
        params, state = step(params, state, taps, x)
    return np.asarray(params[name] if layout == "out_in" else params[name].T)


OPTIMIZERS = {
    "lazy_adam": lambda: optim.sparse_adam(1e-2),
    "authors_adam_clip": lambda: optim.sparse_adam(1e-2, lazy=False, clip=0.5),
    "multi_steps_sgd": lambda: optim.compact(optax.MultiSteps(optax.sgd(0.1), 2)),
    "adagrad": lambda: optim.sparse_adagrad(0.1),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_step_from_factors_as_from_the_block(path, layout, name):
    with PATHS[path]():
        want = _train("block", OPTIMIZERS[name](), layout)
        got = _train("factored", OPTIMIZERS[name](), layout)
    start = _train("block", OPTIMIZERS[name](), layout, steps=0)
    assert np.all(np.isfinite(got)) and not np.allclose(got, start)
    if path == "native" and layout == "out_in" and "adam" in name and native.enabled():
        # The fused pass sums each row in the block's slot order: the same bits.
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7)


@needs_native
def test_fused_adam_from_factors_is_called_and_builds_no_block():
    n, d_in, out, k = 10, 64, 50, 4
    params = {"kernel_t": jnp.zeros((out, d_in)), "bias": jnp.zeros((out,))}
    taps = {
        "kernel_t": meprop_jax.compact_tap(
            d_in, out, k=k, mode="per_example", batch_shape=(n,), factored=True
        )
    }
    opt = optim.sparse_adam(1e-3)

    def step(p, s, t, x):
        def loss(p, t):
            y = meprop_jax.linear(
                x, p["kernel_t"], p["bias"], k=k, mode="per_example", tap=t["kernel_t"],
                kernel_layout="out_in",
            )  # fmt: skip
            return jnp.sum(y**2)

        _, (grads, tap_grads) = optim.value_and_compact_grad(loss)(p, t)
        return opt.update(grads, s, p, tap_grads)

    args = (params, opt.init(params, taps), taps, jnp.ones((n, d_in)))
    text = jax.jit(step).lower(*args).compile().as_text()
    assert "meprop_adam_factored" in text and "meprop_adam_rows" not in text
    # No [n * k, in] block and no weight-gradient product; x is data, so no dx either: the
    # backward pass is the selection alone.
    assert f"f32[{n * k},{d_in}]" not in text
    assert "meprop_select" in text and "meprop_products" not in text


def test_bad_factors_poison_the_kernel_or_raise():
    """A tap used twice sums two passes' factors (uses = 2): meaningless, so NaN or an error."""
    n, d_in, out, k = 3, 4, 8, 2
    params = {"kernel": jnp.ones((d_in, out)) / 4}
    taps = {
        "kernel": meprop_jax.compact_tap(
            d_in, out, k=k, mode="per_example", batch_shape=(n,), factored=True
        )
    }
    x = jnp.arange(n * d_in, dtype=jnp.float32).reshape(n, d_in) / 7

    def loss(p, t):
        y = meprop_jax.linear(x, p["kernel"], k=k, mode="per_example", tap=t["kernel"])
        y2 = meprop_jax.linear(x * 2, p["kernel"], k=k, mode="per_example", tap=t["kernel"])
        return jnp.sum(y**2) + jnp.sum(y2**3)

    _, (grads, tap_grads) = optim.value_and_compact_grad(loss)(params, taps)
    assert float(tap_grads["kernel"].uses) == 2.0
    for lazy in (True, False):
        opt = optim.sparse_adam(1e-2, lazy=lazy)
        new, _ = opt.update(grads, opt.init(params, taps), params, tap_grads)
        assert np.isnan(np.asarray(new["kernel"])).any()
    opt = optim.compact(optax.sgd(0.1), bad_taps="raise")
    with pytest.raises(Exception, match="meaningless"):
        new, _ = opt.update(grads, opt.init(params, taps), params, tap_grads)
        jax.block_until_ready(new)


def test_non_finite_entries_a_row_cannot_keep_poison_the_factors():
    x = jnp.ones((2, 3))
    w = jnp.ones((3, 6))
    g = jnp.zeros((2, 6)).at[1, :3].set(jnp.nan)  # three NaN in a row that keeps two
    tap = meprop_jax.compact_tap(3, 6, k=2, mode="per_example", batch_shape=(2,), factored=True)
    f = lambda x, t: meprop_jax.linear(x, w, k=2, mode="per_example", tap=t)
    _, tap_grad = jax.vjp(f, x, tap)[1](g)
    assert np.isnan(float(tap_grad.uses))
    g_ok = g.at[1, 2].set(0.0)  # two NaN: both kept, the factors hold them
    _, tap_grad = jax.vjp(f, x, tap)[1](g_ok)
    assert float(tap_grad.uses) == 1.0


def test_misuse_raises_clear_errors():
    x, w = jnp.ones((4, 3)), jnp.ones((3, 8))
    with pytest.raises(ValueError, match="per-row mode"):
        meprop_jax.compact_tap(3, 8, k=2, mode="unified", batch_shape=(4,), factored=True)
    with pytest.raises(ValueError, match="batch_shape"):
        meprop_jax.compact_tap(3, 8, k=2, mode="per_example", factored=True)
    tap = meprop_jax.compact_tap(3, 8, k=2, mode="per_example", batch_shape=(4,), factored=True)
    with pytest.raises(ValueError, match="mode='unified'"):
        meprop_jax.linear(x, w, k=2, mode="unified", tap=tap)
    with pytest.raises(ValueError, match=r"taps\[0\] must be FactoredGrad\(values float32\[2, 2\]"):
        meprop_jax.linear(x[:2], w, k=2, mode="per_example", tap=tap)
    block_tap = meprop_jax.compact_tap(3, 8, k=2, mode="per_example", batch_shape=(4,))
    with pytest.raises(ValueError, match=r"taps\[1\] must be a FactoredGrad like the other"):
        multi_linear((x, x), (w, w), k=2, mode="per_example", taps=(tap, block_tap))


def test_linen_and_nnx_layers_step_alike_with_factored_gradients():
    """Linen TrainState and the NNX Optimizer, both with factored taps, take the same steps as
    the Linen model with block taps."""

    linen_model = LinenMLP("per_example")
    variables = linen_model.init(jax.random.key(0), jnp.ones((BATCH, IN)))
    factored_model = LinenMLP("per_example", factored=True)
    factored_vars = factored_model.init(jax.random.key(0), jnp.ones((BATCH, IN)))
    assert isinstance(
        factored_vars[optim.TAP_COLLECTION]["Dense_0"]["kernel"], meprop_jax.FactoredGrad
    )
    tx = optim.sparse_adam(1e-2)
    states = [
        meprop_jax.train_state.TrainState.create(apply_fn=m.apply, params=v, tx=tx)
        for m, v in ((linen_model, variables), (factored_model, factored_vars))
    ]
    model = MLP(nnx.Rngs(1), "per_example", factored=True)
    load_linen(model, variables["params"])
    optimizer = mnnx.Optimizer(model, tx)

    for x, y in batches(3):
        states = [linen_step(s, x, y)[0] for s in states]
        compact_step(model, optimizer, x, y)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, states[0].params, states[1].params)
    expected = params_of(model)
    load_linen(model, states[1].params)
    jax.tree.map(close, expected, params_of(model))


@pytest.mark.parametrize("devices", [1, 8])
def test_batch_sharded_over_a_mesh_steps_as_on_one_device(devices):
    """Under a mesh the factors' rows follow the batch's sharding; their cotangents come back
    replicated, as the taps were made, and the step is the unsharded one (one device: the
    native kernels; eight: the XLA path)."""
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(7)
    n, d_in, out, k = 16, 12, 20, 3
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((n, out)), jnp.float32)
    params = {
        "kernel_t": jnp.asarray(rng.standard_normal((out, d_in)), jnp.float32),
        "bias": jnp.zeros((out,)),
    }
    taps = {
        "kernel_t": meprop_jax.compact_tap(
            d_in, out, k=k, mode="per_example", batch_shape=(n,), factored=True
        )
    }
    opt = optim.sparse_adam(0.05, lazy=False)

    @jax.jit
    def step(p, s, t, x, target):
        def loss(p, t):
            y = meprop_jax.linear(
                x, p["kernel_t"], p["bias"], k=k, mode="per_example", tap=t["kernel_t"],
                kernel_layout="out_in",
            )  # fmt: skip
            return jnp.sum((y - target) ** 2)

        _, (grads, tap_grads) = optim.value_and_compact_grad(loss)(p, t)
        return opt.update(grads, s, p, tap_grads)

    copy = lambda tree: jax.tree.map(jnp.array, tree)
    single, _ = step(copy(params), opt.init(params, taps), taps, x, target)
    with jax.set_mesh(jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])):
        xs, ts = jax.device_put((x, target), P("data"))
        assert jax.typeof(xs).sharding.spec[0] == "data"
        params_r, taps_r = jax.device_put((copy(params), taps), P())
        sharded, _ = step(params_r, opt.init(params_r, taps_r), taps_r, xs, ts)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("lost_row", [None, 37])
def test_native_selection_of_factors_matches_xla_over_threads(lost_row):
    """40 rows of 200 split over the pool: indices, values and ``uses`` as the XLA path gives
    them, ties and non-finite entries included; a row that cannot keep its non-finite entries
    is seen from whichever thread holds it."""
    rng = np.random.default_rng(9)
    g = integer_gradient(rng, (40, 200), "ties")
    g[3, :2] = [np.nan, -np.inf]  # kept: k = 4 per group
    if lost_row is not None:
        g[lost_row, :6] = np.inf  # 6 non-finite in one group of 100 that keeps 4
    g = jnp.asarray(g)
    if not native.enabled():
        pytest.skip("native kernels switched off (MEPROP_JAX_NATIVE=0) or failed to build")
    idx, values, uses = native.select_factors(g, 4, 2)
    want_idx = meprop_jax._src.rowwise.row_top_k(jnp.abs(g), 4, 2)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(values, jnp.take_along_axis(g, want_idx, axis=-1))
    np.testing.assert_array_equal(uses, factored._uses(g, values))
    assert np.isnan(float(uses)) == (lost_row is not None)


def test_second_order_through_factored_gradients_agrees_on_both_paths():
    """Differentiating the backward pass (dx and the factors) differentiates the XLA path,
    whichever path ran the first derivative."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((9, 6)), jnp.float32)
    tap = meprop_jax.compact_tap(6, 9, k=2, mode="per_example", batch_shape=(4,), factored=True)

    def gradient_norm(x):
        def loss(x, t):
            y = meprop_jax.linear(x, w, k=2, mode="per_example", tap=t, kernel_layout="out_in")
            return jnp.sum(jnp.tanh(y) ** 2)

        dx, tap_grad = jax.grad(loss, argnums=(0, 1))(x, tap)
        return jnp.sum(dx**2) + jnp.sum(tap_grad.values**2)

    native_path = jax.grad(gradient_norm)(x)
    with native.disabled():
        xla_path = jax.jit(jax.grad(gradient_norm))(x)
    assert float(jnp.abs(xla_path).max()) > 1.0
    np.testing.assert_allclose(native_path, xla_path, rtol=1e-5, atol=1e-5)
