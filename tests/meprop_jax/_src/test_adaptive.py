"""Adaptive k (meprop_jax._src.adaptive): the chosen k and the gradients against NumPy,
k_min = k_max as plain meProp bit for bit, jit, error feedback, the Flax layers and bad
arguments."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import AdaptiveK
from meprop_jax._src import feedback
from meprop_jax._src.selection import adaptive_columns

N, IN, OUT, K_MAX = 6, 7, 24, 10


def _problem(seed: int = 0):
    """Integer-valued gradients, so that every column sum and prefix sum is exact."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, IN)).astype(np.float32)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    b = rng.standard_normal(OUT).astype(np.float32)
    # Columns of very different mass, in shuffled order.
    scale = rng.permutation(np.geomspace(1, 64, OUT).round())
    c = (rng.integers(-3, 4, (N, OUT)) * scale).astype(np.float32)
    return x, w, b, c


def _reference_keep(g, k_max, k_min, mass, groups=1):
    """NumPy: the kept columns of each group, as ``[out]`` bool, and the mean chosen k."""
    out = g.shape[-1]
    keep = np.zeros(out, bool)
    counts = []
    for start in range(0, out, out // groups):
        scores = np.abs(g[:, start : start + out // groups]).sum(axis=0)
        order = np.argsort(-scores, kind="stable")
        prefix = np.cumsum(scores[order])
        # The smallest k whose top k hold the mass, clipped to [k_min, k_max].
        count = int(np.argmax(prefix >= mass * scores.sum())) + 1
        count = min(max(count, k_min), k_max)
        keep[start + order[:count]] = True
        counts.append(count)
    return keep, float(np.mean(counts))


@functools.partial(jax.jit, static_argnames=("k", "rule", "sparse_bias", "decay"))
def _grads(x, w, b, c, *, k, rule, sparse_bias=False, memory=None, decay=0.0):
    """Gradients of ``sum(linear(x, w, b) * c)`` for (w, b, x, tap, memory), jitted (one
    compile per configuration is cheaper than running the ops one by one)."""

    def loss(w, b, x, tap, memory):
        y = meprop_jax.linear(
            x,
            w,
            b,
            k=k,
            adaptive=rule,
            adaptive_tap=tap,
            sparse_bias=sparse_bias,
            memory=memory,
            decay=decay,
        )
        return jnp.sum(y * c)

    tap = None if rule is None else meprop_jax.adaptive_tap()
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(w, b, x, tap, memory)


@pytest.mark.parametrize(("k_min", "mass"), [(1, 0.5), (3, 0.2), (1, 0.9), (2, 1.0)])
def test_chosen_k_and_gradients_match_numpy(k_min, mass):
    x, w, b, c = _problem()
    keep, chosen = _reference_keep(c, K_MAX, k_min, mass)
    dw, db, dx, tap, _ = _grads(x, w, b, c, k=K_MAX, rule=AdaptiveK(mass, k_min), sparse_bias=True)
    kept = np.where(keep, c, 0.0)
    np.testing.assert_allclose(dw, x.T @ kept, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, kept @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(db, kept.sum(axis=0))
    assert (float(tap.kept), float(tap.calls)) == (chosen, 1.0)
    # Exactly the kept columns of dW are non-zero: the update touches chosen-k columns.
    assert np.count_nonzero(np.any(np.asarray(dw) != 0, axis=0)) == int(keep.sum())


def test_the_cases_cover_small_and_clipped_choices():
    _, _, _, c = _problem()
    chosen = {_reference_keep(c, K_MAX, 1, m)[1] for m in (0.2, 0.5, 1.0)}
    assert min(chosen) < 4 and max(chosen) == K_MAX  # a concentrated choice and the clip


def test_groups_choose_their_k_separately():
    x, w, b, c = _problem(1)
    rule = AdaptiveK(0.6, 1)
    keep, chosen = _reference_keep(c, 4, 1, 0.6, groups=4)
    cols, kept_mask = adaptive_columns(jnp.asarray(c), 4, rule, groups=4)
    got = np.zeros(OUT, bool)
    got[np.asarray(cols)[np.asarray(kept_mask)]] = True
    np.testing.assert_array_equal(got, keep)

    def loss(w, tap):
        y = meprop_jax.multi_linear((x,), (w,), b, k=4, groups=4, adaptive=rule, adaptive_tap=tap)
        return jnp.sum(y * c)

    dw, tap = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, meprop_jax.adaptive_tap())
    np.testing.assert_allclose(dw, x.T @ np.where(keep, c, 0.0), rtol=1e-5, atol=1e-4)
    assert float(tap.kept) == chosen


@pytest.mark.parametrize("sparse_bias", [False, True])
def test_k_min_equal_to_k_max_is_plain_meprop_bit_for_bit(sparse_bias):
    x, w, b, c = _problem(2)
    plain = _grads(x, w, b, c, k=K_MAX, rule=None, sparse_bias=sparse_bias)
    rule = AdaptiveK(mass=0.01, k_min=K_MAX)  # the mass alone would keep one column
    adaptive = _grads(x, w, b, c, k=K_MAX, rule=rule, sparse_bias=sparse_bias)
    for got, want in zip(adaptive[:3], plain[:3], strict=True):
        np.testing.assert_array_equal(got, want)
    assert float(adaptive[3].kept) == K_MAX


def test_jit_matches_eager_and_the_products_keep_width_k_max():
    x, w, b, c = _problem(3)
    rule = AdaptiveK(0.5, 2)
    jitted = _grads(x, w, b, c, k=K_MAX, rule=rule)
    with jax.disable_jit():
        eager = _grads(x, w, b, c, k=K_MAX, rule=rule)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    jaxpr = jax.make_jaxpr(lambda *a: _grads(*a, k=K_MAX, rule=rule))(x, w, b, c).jaxpr
    backward = [s for s in _dot_shapes(jaxpr) if s != ((N, IN), (IN, OUT), (N, OUT))]
    assert len(backward) == 2 and all(any(K_MAX in sh for sh in s[:2]) for s in backward)


def _dot_shapes(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.shape for v in (*eqn.invars, *eqn.outvars)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_shapes(sub)
    return found


def test_error_feedback_memorizes_the_columns_adaptive_k_drops():
    x, w, b, c = _problem(4)
    rule, decay = AdaptiveK(0.5, 1), 0.5
    memory = np.random.default_rng(4).standard_normal(OUT).astype(np.float32)
    g_fed = c + memory / N
    keep, _ = _reference_keep(g_fed, K_MAX, 1, 0.5)
    dw, db, dx, _, new_memory = _grads(
        x, w, b, c, k=K_MAX, rule=rule, memory=jnp.asarray(memory), decay=decay
    )
    kept = np.where(keep, g_fed, 0.0)
    np.testing.assert_allclose(dw, x.T @ kept, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, kept @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, c.sum(axis=0), rtol=1e-6)  # the bias gradient is never fed
    want = decay * np.where(keep, 0.0, g_fed.sum(axis=0))
    np.testing.assert_allclose(new_memory, want, rtol=1e-5, atol=1e-4)
    assert K_MAX > keep.sum()  # some of the k_max columns went to the memory


def test_a_non_finite_column_past_the_chosen_k_is_not_dropped():
    x, w, b, c = _problem(5)
    c = c.copy()
    weakest = int(np.argmin(np.abs(c).sum(axis=0)))
    c[0, weakest] = np.nan
    dw = _grads(x, w, b, c, k=K_MAX, rule=AdaptiveK(0.3, 1))[0]
    assert np.all(np.isnan(np.asarray(dw)[:, weakest]))


def test_dense_layer_keeps_the_chosen_k_tap_and_evaluates_without_it():
    x, _, _, c = _problem(6)
    layer = meprop_jax.Dense(OUT, k=K_MAX, adaptive=AdaptiveK(0.5, 1))
    variables = layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables["meprop_adaptive"]) == {"k": ((), ())}

    def loss(variables):
        return jnp.sum(layer.apply(variables, x) * c)

    tap = jax.jit(jax.grad(loss))(variables)["meprop_adaptive"]["k"]
    assert 1 <= float(tap.kept) < K_MAX and float(tap.calls) == 1.0
    y = layer.apply({"params": variables["params"]}, x)  # evaluation: no tap
    np.testing.assert_allclose(y, x @ variables["params"]["kernel"] + variables["params"]["bias"])
    # A dense layer has nothing to choose: no tap.
    dense = meprop_jax.Dense(OUT, k=0, adaptive=AdaptiveK(0.5, 1)).init(jax.random.key(0), x)
    assert "meprop_adaptive" not in dense


def test_lstm_cell_in_a_scan_counts_every_step_and_shares_one_memory():
    steps, hidden = 3, 6
    cell = meprop_jax.LSTMCell(
        hidden, k=3, feedback=1.0, feedback_steps=steps, adaptive=AdaptiveK(0.5, 1)
    )
    rnn = nn.RNN(cell, variable_broadcast=["params", "meprop_memory", "meprop_adaptive"])
    x = jax.random.normal(jax.random.key(1), (2, steps, 4))
    variables = jax.jit(rnn.init)(jax.random.key(0), x)
    memory = variables["meprop_memory"]["cell"]["memory"]
    assert memory.shape == (4 * hidden,)

    def loss(variables):
        return jnp.sum(rnn.apply(variables, x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables)
    tap = grads["meprop_adaptive"]["cell"]["k"]
    assert float(tap.calls) == steps and 1 <= float(tap.kept) / steps <= 3
    new_memory = grads["meprop_memory"]["cell"]["memory"]
    assert np.all(np.isfinite(new_memory)) and np.any(new_memory != 0)


def test_a_memory_shared_by_a_scan_re_enters_once():
    steps = 4
    x, w, b, _ = _problem(7)
    cs = np.random.default_rng(7).standard_normal((steps, N, OUT)).astype(np.float32)
    memory = np.random.default_rng(8).standard_normal(OUT).astype(np.float32)

    def loss(b, memory):
        def step(total, c):
            y = meprop_jax.multi_linear(
                (x,), (w,), b, k=3, sparse_bias=True, memory=memory, decay=1.0,
                adaptive=AdaptiveK(0.5, 1), feedback_steps=steps,
            )  # fmt: skip
            return total + jnp.sum(y * c), None

        return jax.lax.scan(step, jnp.zeros(()), jnp.asarray(cs))[0]

    db, new_memory = jax.jit(jax.grad(loss, argnums=(0, 1)))(b, jnp.asarray(memory))
    # With decay 1 nothing is lost: what the steps propagated (the sparse bias gradient) plus
    # what they left out (the next memory) is the gradient of every step plus the memory once.
    np.testing.assert_allclose(db + new_memory, cs.sum(axis=(0, 1)) + memory, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"adaptive": AdaptiveK(0.5, 1), "mode": "per_example"}, ValueError, "mode='unified'"),
        ({"adaptive": AdaptiveK(0.5, K_MAX + 1)}, ValueError, "k_min <= k_max"),
        ({"adaptive_tap": meprop_jax.adaptive_tap()}, ValueError, "needs adaptive"),
        ({"adaptive": 0.5}, TypeError, "AdaptiveK"),
        ({"adaptive": AdaptiveK(), "adaptive_tap": (1.0,)}, ValueError, "AdaptiveTap"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        meprop_jax.linear(jnp.ones((2, IN)), jnp.ones((IN, OUT)), k=K_MAX, **kwargs)


@pytest.mark.parametrize(("mass", "k_min"), [(0.0, 1), (1.5, 1), (0.5, 0), (0.5, 1.0)])
def test_bad_rules_are_refused(mass, k_min):
    with pytest.raises(ValueError, match="AdaptiveK"):
        AdaptiveK(mass, k_min)


def test_feedback_steps_must_be_positive():
    with pytest.raises(ValueError, match="feedback_steps"):
        feedback.check_steps(0)
