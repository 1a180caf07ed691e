"""``meprop_jax.linear`` under JAX's transformations (``jit``, ``vmap``, ``lax.scan``,
``jax.checkpoint``, higher-order reverse mode, sharding over a device mesh) against eager
calls, unrolled loops and the NumPy reference of :mod:`tests.meprop_jax._src.test_linear`, and
the backward's jaxpr: no product at the full output size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from meprop_jax import linear, multi_linear
from meprop_jax._src import native
from tests.meprop_jax._src.test_linear import (
    F32_RTOL,
    MODES,
    SPARSE_MODES,
    assert_close,
    check_against_reference,
    dense_forward,
    fast_key,
    grad_fn,
    ref_grads,
    ref_mask,
    small_problem,
)


@pytest.mark.parametrize("mode", MODES)
def test_jit_matches_eager(mode):
    x, w, b, g = small_problem(0)
    key = fast_key(1)
    eager = grad_fn(mode, 3, key)(x, w, b, g)
    jitted = jax.jit(grad_fn(mode, 3, key))(x, w, b, g)
    for a, e in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    check_against_reference(
        ([eager[0]], [eager[1]], eager[2]), [x], [w], g, ref_mask(g, 3, mode, key), False, True
    )


@pytest.mark.parametrize("mode", MODES)
def test_vmap_selects_per_slice(mode):
    x, w, b, g = small_problem(1, lead=(3, 4))
    # Make the per-slice selections differ from a selection over all 12 rows.
    g[0, :, 0] = 100.0
    g[1, :, 1] = 100.0
    g[2, :, 2] = 100.0
    k = 2
    keys = jax.random.split(jax.random.key(2), 3)

    def per_slice(x, g, key):
        return grad_fn(mode, k, key)(x, w, b, g)

    batched = jax.jit(jax.vmap(per_slice))(x, g, keys)
    looped_fn = jax.jit(per_slice)
    for v in range(3):
        looped = looped_fn(x[v], g[v], keys[v])
        for a, e in zip(batched, looped, strict=True):
            # Batched and looped products may sum in different orders, and an entry that
            # cancels keeps the rounding of its larger terms: tolerance from the largest entry.
            np.testing.assert_allclose(a[v], e, rtol=1e-6, atol=1e-6 * float(np.abs(e).max()))
        if mode == "random":
            continue  # the loop is the reference (random vs NumPy is checked elsewhere)
        mask = ref_mask(g[v], k, mode, keys[v])
        check_against_reference(
            ([batched[0][v]], [batched[1][v]], batched[2][v]), [x[v]], [w], g[v], mask, False, True
        )
    if mode == "unified":  # the vmapped selection is not the joint one
        joint = grad_fn(mode, k)(x, w, b, g)
        assert not np.allclose(joint[1], np.sum(batched[1], axis=0))


@pytest.mark.parametrize("mode", MODES)
def test_scan_over_time_steps(mode):
    x, w, b, g = small_problem(2, lead=(5, 3))  # [T, B, ...]
    k = 2
    keys = jax.random.split(fast_key(3), 5)

    def loss(x, w, b):
        def step(total, inputs):
            x_t, g_t, key_t = inputs
            return total + jnp.sum(linear(x_t, w, b, k=k, mode=mode, key=key_t) * g_t), None

        return lax.scan(step, jnp.zeros((), jnp.float32), (x, g, keys))[0]

    dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
    dw_ref = (np.zeros(w.shape), np.zeros(w.shape))
    db_ref = (np.zeros(b.shape), np.zeros(b.shape))
    for t in range(5):
        mask = ref_mask(g[t], k, mode, keys[t])
        (dx_t,), (dw_t,), db_t = ref_grads([x[t]], [w], g[t], mask, False)
        assert_close(dx[t], dx_t, F32_RTOL, "dx_t")
        dw_ref = (dw_ref[0] + dw_t[0], dw_ref[1] + dw_t[1])
        db_ref = (db_ref[0] + db_t[0], db_ref[1] + db_t[1])
    assert_close(dw, dw_ref, F32_RTOL, "dW")
    assert_close(db, db_ref, F32_RTOL, "db")


@pytest.mark.parametrize("mode", MODES)
def test_recurrent_scan_matches_unrolled_loop(mode):
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((4, 2, 3)).astype(np.float32)
    wx = (rng.standard_normal((3, 8)) * 0.5).astype(np.float32)
    wh = (rng.standard_normal((8, 8)) * 0.5).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    keys = jax.random.split(fast_key(4), 4)

    def cell(h, x, key, wx, wh, b):
        return jnp.tanh(multi_linear((x, h), (wx, wh), b, k=2, mode=mode, key=key, groups=2))

    def scanned(wx, wh, b):
        def step(h, inputs):
            return cell(h, *inputs, wx, wh, b), None

        h, _ = lax.scan(step, jnp.zeros((2, 8), jnp.float32), (xs, keys))
        return jnp.sum(h**2)

    def unrolled(wx, wh, b):
        h = jnp.zeros((2, 8), jnp.float32)
        for t in range(4):
            h = cell(h, xs[t], keys[t], wx, wh, b)
        return jnp.sum(h**2)

    got = jax.jit(jax.grad(scanned, argnums=(0, 1, 2)))(wx, wh, b)
    want = jax.jit(jax.grad(unrolled, argnums=(0, 1, 2)))(wx, wh, b)
    for a, e in zip(got, want, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(a))


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_matches_plain(mode):
    x, w, b, g = small_problem(3, lead=(2, 3))
    key = fast_key(5)

    def loss(x, w, b):
        return jnp.sum(jnp.tanh(linear(x, w, b, k=3, mode=mode, key=key)) * g)

    plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(x, w, b)
    for a, e in zip(remat, plain, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_hessian_uses_the_fixed_selection(mode):
    """Second derivative through the sparse backward: ``W diag(mask * -sin(y)) W^T``."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    w = rng.standard_normal((4, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    k = 3

    def loss(x):
        return jnp.sum(jnp.sin(linear(x, w, b, k=k, mode=mode)))

    hess = np.asarray(jax.jit(jax.hessian(loss))(x)).reshape(4, 4)
    y = x.astype(np.float64) @ w + b
    mask = ref_mask(np.cos(y), k, mode)[0]
    want = (w * (mask * -np.sin(y[0]))) @ w.T.astype(np.float64)
    np.testing.assert_allclose(hess, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_grad_of_grad_norm_is_finite(mode):
    x, w, b, _ = small_problem(10, lead=(3, 2))
    key = fast_key(6)

    def grad_norm(w):
        dx = jax.grad(lambda x: jnp.sum(jnp.tanh(linear(x, w, b, k=2, mode=mode, key=key))))(x)
        return jnp.sum(dx**2)

    value, dw = jax.jit(jax.value_and_grad(grad_norm))(w)
    assert np.isfinite(value) and value > 0
    assert dw.shape == w.shape and np.all(np.isfinite(dw)) and np.any(dw != 0)


def test_jvp_of_sparsified_call_raises():
    x, w, b, _ = small_problem(11)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: linear(x, w, b, k=2), (x,), (jnp.ones_like(x),))
    # A dense call (k=0) is plain JAX and supports forward mode.
    y, t = jax.jvp(lambda x: linear(x, w, b, k=0), (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(y, dense_forward(x, w, b))
    np.testing.assert_array_equal(t, dense_forward(jnp.ones_like(x), w))


# --------------------------------------------------------------------------- cost: jaxpr


def _dot_generals(jaxpr):
    """Every ``dot_general`` equation of a jaxpr, recursing into sub-jaxprs."""
    found = []

    def visit(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found


def _touching(eqns, size):
    def dims(eqn):
        avals = [v.aval for v in eqn.invars] + [v.aval for v in eqn.outvars]
        return {d for a in avals for d in a.shape}

    return [e for e in eqns if size in dims(e)]


@pytest.mark.parametrize("wrap", ["vjp", "jit_grad"])
@pytest.mark.parametrize(
    ("mode", "k", "n_inputs", "products", "expected"),
    [
        ("unified", 3, 1, 3, 1),  # only the forward product spans out
        ("unified", 3, 2, 6, 2),  # one forward product per input
        # N*k = 6 < 11: dx sums gathered kernel rows (no product), dW over the union
        ("per_example", 1, 1, 2, 1),
        ("random", 1, 1, 2, 1),
        ("per_example", 2, 1, 3, 3),  # N*k = 12 >= 11: masked dense products
        ("unified", 0, 1, 3, 3),  # dense backprop: forward, dx and dW all span out
        ("unified", 0, 2, 6, 6),
    ],
)
def test_backward_products_avoid_full_output_size(wrap, mode, k, n_inputs, products, expected):
    batch, n_in, out = 6, 5, 11
    xs = tuple(jnp.ones((batch, n_in), jnp.float32) for _ in range(n_inputs))
    ws = tuple(jnp.ones((n_in, out), jnp.float32) for _ in range(n_inputs))
    b = jnp.ones(out, jnp.float32)
    g = jnp.ones((batch, out), jnp.float32)
    key = jax.random.key(0)
    f = lambda xs, ws, b: multi_linear(xs, ws, b, k=k, mode=mode, key=key)
    if wrap == "vjp":

        def fn(xs, ws, b, g):
            y, vjp = jax.vjp(f, xs, ws, b)
            return y, vjp(g)

    else:
        fn = jax.jit(jax.grad(lambda xs, ws, b, g: jnp.sum(f(xs, ws, b) * g), argnums=(0, 1, 2)))
    with native.disabled():  # the XLA products (the native kernels replace them altogether)
        dots = _dot_generals(jax.make_jaxpr(fn)(xs, ws, b, g))
    assert len(dots) == products
    assert len(_touching(dots, out)) == expected


# --------------------------------------------------------------------------- data parallel


@pytest.mark.parametrize(
    ("mode", "lead", "out", "k"),
    [
        ("unified", (16,), 10, 2),
        ("unified", (8, 3), 10, 2),
        ("per_example", (16,), 10, 2),  # N*k >= out: masked dense products
        ("per_example", (16,), 40, 2),  # N*k < out: products over the union of columns
        ("random", (16,), 10, 2),
    ],
)
def test_data_parallel_matches_single_device(mode, lead, out, k):
    assert len(jax.devices()) == 8
    x, w, b, g = small_problem(16, lead=lead, n_in=4, out=out)
    # Make the global unified top-k differ from the top-k of any single shard.
    g[: lead[0] // 2, ..., 7] = 3.0
    key = jax.random.key(8)
    fn = jax.jit(grad_fn(mode, k, key))
    single = fn(x, w, b, g)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("data"))
        gs = jax.device_put(g, P("data"))
        assert jax.typeof(xs).sharding.spec[0] == "data"
        sharded = fn(xs, jnp.asarray(w), jnp.asarray(b), gs)
    for a, e in zip(sharded, single, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
    if mode != "random":  # (random vs NumPy is checked elsewhere)
        mask = ref_mask(g, k, mode, key)
        check_against_reference(
            ([sharded[0]], [sharded[1]], sharded[2]), [x], [w], g, mask, False, True
        )
    if mode == "unified":  # a per-shard selection would give a different weight gradient
        shard = lead[0] // 8
        per_shard = sum(
            np.asarray(grad_fn(mode, k)(x[i : i + shard], w, b, g[i : i + shard])[1])
            for i in range(0, lead[0], shard)
        )
        assert not np.allclose(per_shard, single[1])
