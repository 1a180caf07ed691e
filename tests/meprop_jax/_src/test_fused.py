"""``optim.sparse_adam``'s fused native pass on ``[out, in]`` kernels equals the lifted
``optax.adam`` (``compact(optax.adam(...))``): parameters and state, clip and schedules
included; it is the program's path where it applies, and nowhere else."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import optim
from meprop_jax._src import native
from meprop_jax.linen import TRANSPOSED_KERNEL

needs_native = pytest.mark.skipif(not native.enabled(), reason="native kernels not built")


class MLP(nn.Module):
    layout: str = "out_in"
    features: int = 40  # per-example k = 3 of 40 at batch 5: some columns are never selected
    sparse_update: bool = True  # False: the masked dense kernel gradient

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = meprop_jax.Dense(
                self.features,
                k=3,
                mode="per_example",
                sparse_update=self.sparse_update,
                kernel_layout=self.layout,
                name=f"hidden_{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(4, name="output")(x)


def _train(tx, layout="out_in", steps=5):
    model = MLP(layout)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    variables = model.init(jax.random.key(0), x0)
    state = meprop_jax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        taps=variables[optim.TAP_COLLECTION],
        tx=tx,
    )

    def step(state, x, y):
        def loss_fn(variables):
            logits = state.apply_fn(variables, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        _, grads = state.value_and_grad(loss_fn)
        return state.apply_gradients(grads=grads)

    compiled = jax.jit(step, donate_argnums=0)
    text = compiled.lower(state, x0, jnp.zeros(5, jnp.int32)).as_text()
    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((5, 7)) * 3, jnp.float32)
        y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
        state = compiled(state, x, y)
    return state, text


def _close(a, b, atol=2e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=atol), a, b)


@needs_native
@pytest.mark.parametrize(
    ("lr", "clip"),
    [(0.05, None), (optax.linear_schedule(0.1, 0.01, 4), 0.3)],
    ids=["constant", "schedule+clip"],
)
def test_fused_sparse_adam_equals_lifted_optax_adam(lr, clip):
    fused, text = _train(optim.sparse_adam(lr, clip=clip))
    assert "meprop_adam_rows" in text
    adam = optax.adam(lr)
    lifted, lifted_text = _train(
        optim.compact(adam if clip is None else optax.chain(optax.clip(clip), adam))
    )
    assert "meprop_adam_rows" not in lifted_text
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        fused.params,
        _train(optim.sparse_adam(lr, clip=clip), steps=0)[0].params,
    )
    assert moved["hidden_0"][TRANSPOSED_KERNEL]  # the steps did train the kernel
    _close(fused.params, lifted.params)
    _close(fused.opt_state, lifted.opt_state)


@needs_native
def test_fused_pass_only_where_it_applies():
    # The stock [in, out] layout (strided columns) and a disabled native path use optax.
    _, text = _train(optim.sparse_adam(0.05), layout="in_out", steps=0)
    assert "meprop_adam_rows" not in text
    with native.disabled():
        _, text = _train(optim.sparse_adam(0.05), steps=0)
    assert "meprop_adam_rows" not in text


def test_sparse_adam_trains_alike_in_both_layouts():
    transposed, _ = _train(optim.sparse_adam(0.05), steps=4)
    stock, _ = _train(optim.sparse_adam(0.05), layout="in_out", steps=4)
    _close(meprop_jax.to_kernel_layout(transposed.params, "in_out"), stock.params)


def _train_masked(tx, layout="out_in", steps=5):
    """``_train``'s steps with the masked dense gradients and a stock optax ``tx``."""
    model = MLP(layout, sparse_update=False)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    params = model.init(jax.random.key(0), x0)["params"]
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and int32 counts
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((5, 7)) * 3, jnp.float32)
        y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
        params, opt_state = step(params, opt_state, x, y)
    return params, opt_state


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "xla"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize(
    ("lr", "clip"),
    [(0.05, None), (optax.linear_schedule(0.1, 0.01, 4), 0.3)],
    ids=["constant", "schedule+clip"],
)
def test_non_lazy_sparse_adam_is_adam_on_the_masked_gradient(native_on, layout, lr, clip):
    if native_on and not native.enabled():
        pytest.skip("native kernels not built")
    adam = optax.adam(lr)
    stock = adam if clip is None else optax.chain(optax.clip(clip), adam)
    expected, expected_state = _train_masked(stock, layout)
    with contextlib.nullcontext() if native_on else native.disabled():
        got, text = _train(optim.sparse_adam(lr, clip=clip, lazy=False), layout)
    fused = native_on and layout == "out_in"
    assert ("meprop_adam_rows" in text) == fused
    # The compact and the masked dense dW sum in different orders, and Adam divides a
    # near-zero moment by its root: a few weights land 4e-6 apart after 5 steps of 0.05.
    _close(got.params, expected, atol=1e-5)
    plain, _ = optim.param_layout(got.opt_state.inner)
    _close(plain, expected_state, atol=1e-5)
    # Not the lazy rule: with momentum, rows unselected in the last step moved too.
    lazy, _ = _train(optim.sparse_adam(lr, clip=clip), layout)
    differ = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), got.params, lazy.params)
    assert differ["hidden_1"][TRANSPOSED_KERNEL if layout == "out_in" else "kernel"]


def test_non_lazy_compact_multi_steps_is_multi_steps_on_the_masked_gradient():
    inner = optax.adamw(0.05, weight_decay=0.1)
    expected, _ = _train_masked(optax.MultiSteps(inner, every_k_schedule=2), steps=6)
    got, _ = _train(optim.compact(optax.MultiSteps(inner, every_k_schedule=2), lazy=False), steps=6)
    _close(got.params, expected)


@needs_native
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "dense"])
@pytest.mark.parametrize("count", [3, 200, 20_000])
def test_adam_rows_split_over_threads_is_optax_adam(lazy, count):
    """On a kernel large enough for the native pass to split its rows over XLA's thread pool
    (300 x 600), the update is optax.adam's on the masked dense gradient: on every row (not
    lazy), or on the selected rows with the others untouched (lazy). Padding is skipped. By
    step 200 the first bias correction has rounded to 1, by step 20000 both (the kernel then
    skips dividing by them)."""
    rng = np.random.default_rng(0)
    out, d_in, lr = 300, 600, 0.01
    p = rng.standard_normal((out, d_in)).astype(np.float32)
    mu = (0.1 * rng.standard_normal((out, d_in))).astype(np.float32)
    nu = (0.01 * np.abs(rng.standard_normal((out, d_in)))).astype(np.float32)
    cols = np.concatenate([out + np.arange(8), rng.permutation(out)[:120]]).astype(np.int32)
    g = rng.standard_normal((cols.size, d_in)).astype(np.float32)
    t = count + 1
    hyper = np.array([0.9, 0.999, 1 - 0.9**t, 1 - 0.999**t, lr, 1e-8], np.float32)
    assert list(hyper[2:4] == 1) == [count > 3, count > 200]
    got = native.adam_rows(*map(jnp.asarray, (p, mu, nu, cols, g, hyper)), lazy=lazy)

    dense_g = np.zeros((out, d_in), np.float32)
    dense_g[cols[cols < out]] = g[cols < out]
    state = optax.ScaleByAdamState(jnp.asarray(count, jnp.int32), jnp.asarray(mu), jnp.asarray(nu))
    with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and int32 counts
        updates, (adam_state, _) = optax.adam(lr).update(
            jnp.asarray(dense_g), (state, optax.EmptyState())
        )
    expected = [np.array(a) for a in (p + updates, adam_state.mu, adam_state.nu)]
    if lazy:
        untouched = np.setdiff1d(np.arange(out), cols)
        for e, before in zip(expected, (p, mu, nu), strict=True):
            e[untouched] = before[untouched]
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=2e-6)


def _moments_across_float32():
    """Moments of every kind the update can meet, for both signs of the first: ordinary
    values, then those outside the range in which the native pass divides by a bias correction
    through its reciprocal (zeros, tiny, huge, inf, NaN). No subnormals: XLA's threads flush
    them to zero, and NumPy does not."""
    rng = np.random.default_rng(1)
    ordinary = np.abs(rng.standard_normal(4000)).astype(np.float32) * np.float32(1e-3)
    edges = np.array(
        [
            0.0,
            -0.0,
            2.0**-79,
            2.0**-81,
            2.0**-100,
            2.0**-120,
            2.0**99,
            2.0**101,
            1e35,
            2.0**125,
            np.inf,
        ],
        np.float32,
    )
    values = np.concatenate([ordinary, np.tile(edges, 4), [np.nan]]).astype(np.float32)
    mu = values * np.where(np.arange(values.size) % 2 == 0, 1, -1).astype(np.float32)
    nu = rng.permutation(np.abs(values))
    return mu.reshape(1, -1), nu.reshape(1, -1)


@needs_native
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize(
    "corrections",
    [(1 - 0.9**3, 1 - 0.999**3), (1.0, 1 - 0.999**200), (2.0**-22, 0.5), (1.0, 1.0)],
    ids=["both", "second", "divided", "none"],
)
def test_bias_corrections_divide_exactly(corrections, eps):
    """Each moment divided by its bias correction is the correctly rounded quotient, as
    ``m / c`` in float32 gives it, for every kind of moment: the native pass takes it through
    the correction's reciprocal and two FMAs where that is exact, and divides elsewhere.
    Zero gradients and a learning rate of 1 leave no multiply-add whose fusing could change a
    result, so the weights must match the float32 formula bit for bit."""
    mu, nu = _moments_across_float32()
    p = np.full_like(mu, 0.25)
    c1, c2 = (np.float32(c) for c in corrections)
    b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(eps)
    hyper = np.array([b1, b2, c1, c2, 1.0, eps], np.float32)
    cols, g = np.array([1], np.int32), np.zeros((1, mu.shape[1]), np.float32)  # padding only
    got = native.adam_rows(*map(jnp.asarray, (p, mu, nu, cols, g, hyper)), lazy=False)

    with np.errstate(all="ignore"):
        m, v = b1 * mu, b2 * nu
        stepped = p - (m / c1) / (np.sqrt(v / c2) + eps)
    for a, e in zip(got, (stepped, m, v), strict=True):
        np.testing.assert_array_equal(np.asarray(a), e)
