"""``meprop_jax.optim.compact``: optax transformations lifted to compact kernel gradients.

With every column selected the lifted step must be the stock optimizer on the dense gradient;
with a few columns selected, SGD and AdaGrad (and a global-norm clip before them) must be the
stock optimizer on the masked dense gradient, and every rule must leave unselected columns
alone. Sums and means of compact gradients must be exact when their columns agree and stop
the program when they do not. ``optax.MultiSteps`` accumulates by columns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meprop_jax import optim
from meprop_jax._src import taps as _taps
from meprop_jax._src.taps import CompactGrad, compact_tap

IN, OUT, N_OUT = 5, 12, 3


def params_of(rng):
    return {
        "hidden": {
            "kernel": jnp.asarray(rng.standard_normal((IN, OUT)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(OUT), jnp.float32),
        },
        "out": {"kernel": jnp.asarray(rng.standard_normal((OUT, N_OUT)), jnp.float32)},
    }


def tap_grad(block, cols) -> CompactGrad:
    """One backward pass's compact gradient of ``cols`` (entries ``>= OUT`` are padding)."""
    cols = np.asarray(cols)
    block = np.asarray(block, np.float32).copy()
    block[cols >= OUT] = 0
    selected = np.zeros(OUT, np.float32)
    selected[cols[cols < OUT]] = 1
    return CompactGrad(jnp.asarray(block), jnp.asarray(cols, jnp.float32), jnp.asarray(selected))


def dense_of(tap: CompactGrad) -> np.ndarray:
    """The masked ``[in, out]`` gradient a compact one stands for."""
    dense = np.zeros((IN, OUT), np.float32)
    cols = np.asarray(tap.cols).astype(int)
    dense[:, cols[cols < OUT]] = np.asarray(tap.block)[cols < OUT].T
    return dense


def random_step(rng, width):
    """Dense grads of the other leaves and a tap of ``width`` random columns (OUT: all)."""
    cols = rng.permutation(OUT)[:width]
    if width < OUT:
        cols[-1] = OUT + width - 1  # one padding slot
    tap = tap_grad(2 * rng.standard_normal((width, IN)), cols)
    grads = {
        "hidden": {"kernel": None, "bias": jnp.asarray(rng.standard_normal(OUT), jnp.float32)},
        "out": {"kernel": jnp.asarray(rng.standard_normal((OUT, N_OUT)), jnp.float32)},
    }
    dense = {**grads, "hidden": {**grads["hidden"], "kernel": jnp.asarray(dense_of(tap))}}
    return grads, {"hidden": {"kernel": tap}}, dense


def stock_run(tx, params, dense_steps):
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        for dense in dense_steps:
            updates, state = tx.update(dense, state, params)
            params = optax.apply_updates(params, updates)
    return params


def compact_run(tx, params, steps, transposed=True):
    opt = optim.compact(tx)
    taps = {"hidden": {"kernel": compact_tap(IN, OUT, k=4)}}
    state = opt.init(params, taps if transposed else None)
    update = jax.jit(opt.update)
    for grads, tap_grads, _ in steps:
        params, state = update(grads, state, params, tap_grads)
    return params, state


def assert_trees_close(got, want, rtol=2e-6, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


ALL_RULES = {
    "adam": lambda: optax.adam(0.05),
    "adamw": lambda: optax.adamw(0.05, weight_decay=0.1),
    "adagrad": lambda: optax.adagrad(0.1),
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optax.rmsprop(0.01),
    "clip+adam": lambda: optax.chain(optax.clip(0.5), optax.adam(0.05)),
    "global_norm+adamw": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)
    ),
    "schedule": lambda: optax.adam(optax.linear_schedule(0.1, 0.01, 3)),
}


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_every_column_selected_is_the_stock_optimizer(rule, transposed):
    rng = np.random.default_rng(0)
    params = params_of(rng)
    steps = [random_step(rng, OUT) for _ in range(4)]
    got, _ = compact_run(ALL_RULES[rule](), params, steps, transposed)
    assert_trees_close(got, stock_run(ALL_RULES[rule](), params, [s[2] for s in steps]))


MASKED_EQUAL = {
    "sgd": lambda: optax.sgd(0.1),
    "adagrad": lambda: optax.adagrad(0.1),
    "global_norm+sgd": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    "clip+adagrad+schedule": lambda: optax.chain(
        optax.clip(0.5), optax.adagrad(optax.exponential_decay(0.1, 1, 0.5))
    ),
}


@pytest.mark.parametrize("rule", sorted(MASKED_EQUAL))
def test_sgd_and_adagrad_equal_stock_on_the_masked_gradient(rule):
    """A zero gradient moves nothing under these rules, so lazy and dense agree."""
    rng = np.random.default_rng(1)
    params = params_of(rng)
    steps = [random_step(rng, 4) for _ in range(4)]
    got, _ = compact_run(MASKED_EQUAL[rule](), params, steps)
    assert_trees_close(got, stock_run(MASKED_EQUAL[rule](), params, [s[2] for s in steps]))


@pytest.mark.parametrize("rule", ["adam", "adamw", "momentum", "rmsprop", "global_norm+adamw"])
def test_lazy_rules_move_only_the_selected_columns(rule):
    rng = np.random.default_rng(2)
    params = params_of(rng)
    opt = optim.compact(ALL_RULES[rule]())
    state = opt.init(params, {"hidden": {"kernel": compact_tap(IN, OUT, k=4)}})
    update = jax.jit(opt.update)
    for _ in range(3):
        grads, taps, _ = random_step(rng, 4)
        old_kernel = np.asarray(params["hidden"]["kernel"])
        old_state = optim.param_layout(state.inner)[0]
        params, state = update(grads, state, params, taps)
        cols = np.asarray(taps["hidden"]["kernel"].cols).astype(int)
        cols = cols[cols < OUT]
        rest = np.setdiff1d(np.arange(OUT), cols)
        kernel = np.asarray(params["hidden"]["kernel"])
        np.testing.assert_array_equal(kernel[:, rest], old_kernel[:, rest])
        assert np.all(np.any(kernel[:, cols] != old_kernel[:, cols], axis=0))
        new_state = optim.param_layout(state.inner)[0]
        for old, new in zip(jax.tree.leaves(old_state), jax.tree.leaves(new_state), strict=True):
            if np.shape(old) == (IN, OUT):
                np.testing.assert_array_equal(np.asarray(new)[:, rest], np.asarray(old)[:, rest])


def test_global_norm_of_the_blocks_is_the_masked_gradients():
    """The claim that lets clip_by_global_norm lift: padding rows are zero, so the norms agree."""
    rng = np.random.default_rng(3)
    grads, taps, dense = random_step(rng, 4)
    compact = {**grads, "hidden": {**grads["hidden"], "kernel": taps["hidden"]["kernel"].block}}
    np.testing.assert_allclose(optax.tree.norm(compact), optax.tree.norm(dense), rtol=1e-6)


def test_transforms_that_cannot_be_lifted_are_refused():
    params = params_of(np.random.default_rng(4))
    taps = {"hidden": {"kernel": compact_tap(IN, OUT, k=4)}}
    with pytest.raises(ValueError, match=r"neither a scalar nor part of a subtree shaped"):
        optim.compact(optax.adafactor(0.1)).init(params, taps)
    steps = optax.MultiSteps(optax.sgd(0.1), 2)
    with pytest.raises(ValueError, match=r"Pass the MultiSteps object itself"):
        optim.compact(steps.gradient_transformation()).init(params, taps)
    with pytest.raises(ValueError, match=r"Pass the MultiSteps object itself"):
        optim.compact(optax.chain(optax.clip(1.0), steps.gradient_transformation())).init(
            params, taps
        )
    with pytest.raises(ValueError, match="int every_k_schedule"):
        optim.compact(optax.MultiSteps(optax.sgd(0.1), lambda step: jnp.asarray(2)))
    with pytest.raises(TypeError, match="GradientTransformation"):
        optim.compact(optax.sgd)
    with pytest.raises(ValueError, match="match no parameter"):
        optim.compact(optax.sgd(0.1)).init(params, {"nope": {"kernel": taps["hidden"]["kernel"]}})


@pytest.mark.parametrize("mean", [True, False])
def test_multi_steps_accumulates_columns_like_stock_multi_steps(mean):
    """SGD: the lifted accumulation equals optax.MultiSteps on the masked dense gradients."""
    rng = np.random.default_rng(5)
    params = params_of(rng)
    steps = [random_step(rng, 4) for _ in range(7)]
    make = lambda: optax.MultiSteps(optax.sgd(0.1), 3, use_grad_mean=mean)
    got, state = compact_run(make(), params, steps)
    want = stock_run(make().gradient_transformation(), params, [s[2] for s in steps])
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    acc = state.inner
    assert int(acc.mini_step) == 1 and int(acc.gradient_step) == 2
    # The seventh step's columns are the only ones accumulated now.
    cols = np.asarray(steps[-1][1]["hidden"]["kernel"].cols).astype(int)
    np.testing.assert_array_equal(
        np.flatnonzero(acc.touched["hidden/kernel"]), np.sort(cols[cols < OUT])
    )


def test_multi_steps_with_every_column_is_stock_multi_steps_adam():
    rng = np.random.default_rng(6)
    params = params_of(rng)
    steps = [random_step(rng, OUT) for _ in range(4)]
    make = lambda: optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05)), 2
    )
    got, _ = compact_run(make(), params, steps)
    want = stock_run(make().gradient_transformation(), params, [s[2] for s in steps])
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_multi_steps_changes_parameters_only_when_it_emits():
    rng = np.random.default_rng(7)
    params = params_of(rng)
    opt = optim.compact(optax.MultiSteps(optax.adam(0.05), 2))
    state = opt.init(params, {"hidden": {"kernel": compact_tap(IN, OUT, k=4)}})
    grads, taps, _ = random_step(rng, 4)
    first, state = opt.update(grads, state, params, taps)
    assert_trees_close(first, params, rtol=0, atol=0)
    grads, taps, _ = random_step(rng, 4)
    second, state = opt.update(grads, state, params, taps)
    assert not np.array_equal(second["hidden"]["kernel"], params["hidden"]["kernel"])
    assert not np.any(state.inner.touched["hidden/kernel"])
    assert not np.any(optim.param_layout(state.inner.acc)[0]["hidden"]["kernel"])
    with pytest.raises(ValueError, match="same taps to init and update"):
        opt.update(grads, state, params)


# ------------------------------------------------------- sums and means of compact gradients


def test_a_sum_of_gradients_with_the_same_columns_is_exact():
    rng = np.random.default_rng(8)
    params = params_of(rng)
    grads, taps, dense = random_step(rng, 4)
    tap = taps["hidden"]["kernel"]
    other = tap_grad(rng.standard_normal((4, IN)), np.asarray(tap.cols).astype(int))
    total = jax.tree.map(jnp.add, tap, other)
    cols, ok = _taps.decode_columns(total, OUT)
    assert bool(ok)
    np.testing.assert_array_equal(cols, np.asarray(tap.cols).astype(int))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, tap, other)
    assert bool(_taps.decode_columns(mean, OUT)[1])
    got, _ = compact_run(optax.sgd(0.1), params, [(grads, {"hidden": {"kernel": total}}, None)])
    dense["hidden"]["kernel"] = jnp.asarray(dense_of(tap) + dense_of(other))
    assert_trees_close(got, stock_run(optax.sgd(0.1), params, [dense]))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1, 3], [3, 1]),  # same set, other slots: the mean [2, 2] names column 2
        ([0, 1, 2], [2, 1, 0]),  # the mean [1, 1, 1] is a selected column
        ([4, 5], [4, 6]),  # one slot differs
        ([7, 8], [9, OUT + 1]),  # a padding slot against a column
    ],
)
def test_sums_and_means_of_different_columns_are_detected(a, b):
    rng = np.random.default_rng(9)
    ta = tap_grad(rng.standard_normal((len(a), IN)), a)
    tb = tap_grad(rng.standard_normal((len(b), IN)), b)
    assert bool(_taps.decode_columns(ta, OUT)[1]) and bool(_taps.decode_columns(tb, OUT)[1])
    assert not bool(_taps.decode_columns(jax.tree.map(jnp.add, ta, tb), OUT)[1])
    mean = jax.tree.map(lambda x, y: (x + y) / 2, ta, tb)
    assert not bool(_taps.decode_columns(mean, OUT)[1])


def test_a_sum_of_different_columns_stops_the_program_or_gives_nan():
    """Microbatch gradient accumulation by adding tap gradients: an error naming the kernel."""
    rng = np.random.default_rng(10)
    params = params_of(rng)
    grads, taps, _ = random_step(rng, 4)
    _, other, _ = random_step(rng, 4)
    total = jax.tree.map(jnp.add, taps, other)
    opt = optim.compact(optax.sgd(0.1), bad_taps="raise")
    state = opt.init(params, taps)
    with pytest.raises(Exception, match=r"hidden/kernel.*sum or mean of compact gradients"):
        jax.block_until_ready(jax.jit(opt.update)(grads, state, params, total))
    # By default the kernel's first K columns become NaN instead; the rest is untouched.
    opt = optim.sparse_sgd(0.1)
    new, _ = jax.jit(opt.update)(grads, opt.init(params, taps), params, total)
    kernel = np.asarray(new["hidden"]["kernel"])
    assert np.all(np.isnan(kernel[:, :4])) and not np.any(np.isnan(kernel[:, 4:]))
    np.testing.assert_array_equal(kernel[:, 4:], np.asarray(params["hidden"]["kernel"])[:, 4:])
    with pytest.raises(ValueError, match="bad_taps must be one of"):
        optim.compact(optax.sgd(0.1), bad_taps="ignore")
