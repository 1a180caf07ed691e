"""Error feedback (meprop_jax.feedback): the memory update against NumPy, decay 0, Flax, jaxpr."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import meprop_jax
from meprop_jax import feedback

N, IN, OUT, K = 6, 11, 37, 4


def _problem(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, N, IN)).astype(np.float32)
    cs = rng.standard_normal((steps, N, OUT)).astype(np.float32)  # cs[t] = dL/dy at step t
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    b = rng.standard_normal(OUT).astype(np.float32)
    return xs, cs, w, b


def _grads(x, c, w, b, memory, *, decay, k=K, sparse_bias=False, mode="unified"):
    def loss(w, b, x, memory):
        y = meprop_jax.linear(
            x, w, b, k=k, mode=mode, sparse_bias=sparse_bias, memory=memory, decay=decay
        )
        return jnp.sum(y * c)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(w, b, x, memory)


def _reference_step(x, g, w, memory, *, decay, k, sparse_bias):
    """NumPy: one step of the documented update. Returns (dw, db, dx, new memory)."""
    g_fed = g + memory / g.shape[0]
    scores = np.abs(g_fed).sum(axis=0)
    cols = np.argsort(-scores, kind="stable")[:k]
    kept = np.zeros_like(g_fed)
    kept[:, cols] = g_fed[:, cols]
    dw = x.T @ kept
    dx = kept @ w.T
    db = kept.sum(axis=0) if sparse_bias else g.sum(axis=0)
    left_out = g_fed.sum(axis=0)
    left_out[cols] = 0.0
    return dw, db, dx, decay * left_out


@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_memory_update_matches_numpy_over_several_steps(decay, sparse_bias):
    xs, cs, w, b = _problem(steps=5)
    memory, ref_memory = feedback.init_memory(OUT), np.zeros(OUT, np.float32)
    for t in range(5):
        dw, db, dx, memory = _grads(
            xs[t], cs[t], w, b, memory, decay=decay, sparse_bias=sparse_bias
        )
        ref = _reference_step(
            xs[t], cs[t], w, ref_memory, decay=decay, k=K, sparse_bias=sparse_bias
        )
        ref_memory = ref[3]
        for got, want in zip((dw, db, dx, memory), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # The memory really fed back: by now it holds several steps of left-out columns.
    assert np.count_nonzero(ref_memory) == OUT - K
    plain = _grads(xs[4], cs[4], w, b, feedback.init_memory(OUT), decay=0.0)
    assert not np.allclose(plain[0], dw)


def test_decay_zero_is_plain_meprop_bit_for_bit():
    xs, cs, w, b = _problem(steps=1)
    memory = jnp.asarray(np.random.default_rng(1).standard_normal(OUT).astype(np.float32))

    def plain(w, b, x):
        return jnp.sum(meprop_jax.linear(x, w, b, k=K) * cs[0])

    want = jax.grad(plain, argnums=(0, 1, 2))(w, b, xs[0])
    dw, db, dx, new_memory = _grads(xs[0], cs[0], w, b, memory, decay=0.0)
    for got, ref in zip((dw, db, dx), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(new_memory, np.zeros(OUT, np.float32))


def test_first_step_from_empty_memory_propagates_what_plain_meprop_does():
    xs, cs, w, b = _problem(steps=1)
    want = _grads(xs[0], cs[0], w, b, feedback.init_memory(OUT), decay=0.0)
    got = _grads(xs[0], cs[0], w, b, feedback.init_memory(OUT), decay=0.7)
    for a, ref in zip(got[:3], want[:3], strict=True):
        np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(np.asarray(got[3])) == OUT - K


def test_scan_under_jit_matches_python_loop():
    xs, cs, w, b = _problem(steps=4)

    def step(memory, xc):
        x, c = xc
        dw, _, _, memory = _grads(x, c, w, b, memory, decay=0.9)
        return memory, dw

    memory, dws = jax.jit(lambda m: lax.scan(step, m, (xs, cs)))(feedback.init_memory(OUT))
    loop_memory = feedback.init_memory(OUT)
    for t in range(4):
        loop_memory, dw = step(loop_memory, (xs[t], cs[t]))
        np.testing.assert_allclose(dws[t], dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(memory, loop_memory, rtol=1e-5, atol=1e-5)


def _dot_shapes(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
    """Operand and result shapes of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.shape for v in (*eqn.invars, *eqn.outvars)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_shapes(sub)
    return found


def test_backward_with_feedback_runs_no_full_width_product():
    xs, cs, w, b = _problem(steps=1)
    jaxpr = jax.make_jaxpr(lambda *a: _grads(*a, decay=0.9))(
        xs[0], cs[0], w, b, feedback.init_memory(OUT)
    ).jaxpr
    shapes = _dot_shapes(jaxpr)
    full = [s for s in shapes if any(OUT in shape for shape in s)]
    # Only the forward product x @ w touches all OUT columns; the backward's run at width K.
    assert full == [((N, IN), (IN, OUT), (N, OUT))]
    assert len(shapes) == 3
    assert all(any(K in shape for shape in s[:2]) for s in shapes if s not in full)


def test_memory_is_global_under_data_parallelism():
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((2, 16, IN)).astype(np.float32)
    cs = rng.standard_normal((2, 16, OUT)).astype(np.float32)
    cs[:, :8, 5] = 3.0  # a column the first half of the batch favours
    _, _, w, b = _problem(steps=1)
    fn = jax.jit(lambda x, c, m: _grads(x, c, w, b, m, decay=0.8))
    single, sharded = feedback.init_memory(OUT), feedback.init_memory(OUT)
    mesh = jax.make_mesh((8,), ("data",))
    for t in range(2):
        want = fn(xs[t], cs[t], single)
        single = want[3]
        with jax.set_mesh(mesh):
            x, c = jax.device_put(xs[t], P("data")), jax.device_put(cs[t], P("data"))
            got = fn(x, c, sharded)
        sharded = got[3]
        for a, e in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(np.asarray(sharded)) == OUT - K


def test_linen_dense_keeps_its_memory_in_a_collection():
    xs, cs, _, _ = _problem(steps=3)
    layer = meprop_jax.Dense(OUT, k=K, feedback=0.5)
    variables = layer.init(jax.random.key(0), xs[0])
    assert jax.tree.map(jnp.shape, variables[feedback.MEMORY_COLLECTION]) == {"memory": (OUT,)}
    params = variables["params"]
    ref_memory = np.zeros(OUT, np.float32)
    for t in range(3):

        def loss(v, t=t):
            return jnp.sum(layer.apply(v, xs[t]) * cs[t])

        grads = jax.grad(loss)(variables)
        _, _, _, ref_memory = _reference_step(
            xs[t], cs[t], params["kernel"], ref_memory, decay=0.5, k=K, sparse_bias=False
        )
        rest, memory = feedback.split_memory(grads)
        np.testing.assert_allclose(memory["memory"], ref_memory, rtol=1e-5, atol=1e-5)
        variables = feedback.merge_memory(variables, memory)
    assert set(rest) == {"params"}
    # Evaluation: no memory collection, plain forward.
    y = layer.apply({"params": params}, xs[0])
    np.testing.assert_allclose(y, xs[0] @ params["kernel"] + params["bias"], rtol=1e-5, atol=1e-5)


def test_linen_dense_without_feedback_has_no_memory():
    x = jnp.ones((2, 5))
    assert feedback.MEMORY_COLLECTION not in meprop_jax.Dense(8, k=2).init(jax.random.key(0), x)
    # A dense layer has nothing to memorize.
    dense = meprop_jax.Dense(8, k=0, feedback=0.5).init(jax.random.key(0), x)
    assert feedback.MEMORY_COLLECTION not in dense


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "per_example", "memory": jnp.zeros(OUT), "decay": 0.5}, "mode='unified'"),
        ({"memory": jnp.zeros(OUT), "decay": 1.5}, r"\[0, 1\]"),
        ({"decay": 0.5}, "needs a memory"),
        ({"memory": jnp.zeros(OUT + 1), "decay": 0.5}, "float32\\[37\\]"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        meprop_jax.linear(jnp.ones((2, IN)), jnp.ones((IN, OUT)), k=K, **kwargs)


def test_nnx_linear_memory_is_a_variable_updated_by_its_gradient():
    from flax import nnx

    from meprop_jax.nnx import FeedbackMemory, Linear

    xs, cs, _, _ = _problem(steps=3)
    layer = Linear(IN, OUT, k=K, feedback=0.5, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.kernel[...])
    assert layer.meprop_memory[...].shape == (OUT,)
    assert Linear(IN, OUT, k=K, rngs=nnx.Rngs(0)).meprop_memory is None
    ref_memory = np.zeros(OUT, np.float32)
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, FeedbackMemory))
    for t in range(3):
        grads = nnx.grad(lambda m, t=t: jnp.sum(m(xs[t]) * cs[t]), argnums=wrt)(layer)
        ref_dw, _, _, ref_memory = _reference_step(
            xs[t], cs[t], kernel, ref_memory, decay=0.5, k=K, sparse_bias=False
        )
        np.testing.assert_allclose(grads["kernel"][...], ref_dw, rtol=2e-5, atol=2e-5)
        nnx.update(layer, nnx.filter_state(grads, FeedbackMemory))
        np.testing.assert_allclose(layer.meprop_memory[...], ref_memory, rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(ref_memory) == OUT - K
