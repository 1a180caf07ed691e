"""Compact updates on whole models: the ways a user can go wrong, and training with optax.

A Linen CNN with BatchNorm (``TrainState``) and an NNX MLP (``nnx.Optimizer``) train under
``optax.MultiSteps(optax.chain(optax.clip_by_global_norm(...), optax.adamw(...)))``. A layer
applied twice, gradients averaged over devices, a model applied without differentiating its
taps, meSimp's shrink of a compact state and an update without taps all give correct results
or one clear error. Under ``shard_map`` and ``pmap`` each device selects its own columns;
under ``jit`` with a sharded batch the selection is global.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meprop_jax
from meprop_jax import mesimp, optim
from meprop_jax import nnx as mnnx
from meprop_jax._src.taps import compact_tap

K = 3


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def tx_under_test(every=2):
    return optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.02, weight_decay=1e-3)), every
    )


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(meprop_jax.Dense(16, k=K, sparse_update=True)(x))
        return nn.Dense(3)(x)


def test_linen_cnn_with_batch_norm_trains_under_multi_steps_clip_adamw():
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
    y = jnp.arange(8) % 3
    model = CNN()
    state = meprop_jax.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(1), x), tx=tx_under_test()
    )
    assert set(state.collections) == {"batch_stats"}  # kept, not dropped

    @jax.jit
    def step(state):
        def loss_fn(variables):
            logits, updates = state.apply_fn(variables, x, mutable=["batch_stats"])
            return xent(logits, y), updates

        (_, updates), grads = state.value_and_grad(loss_fn, has_aux=True)
        return state.apply_gradients(grads=grads, collections={**state.collections, **updates})

    mean = lambda s: np.asarray(s.collections["batch_stats"]["BatchNorm_0"]["mean"])
    first = step(state)
    second = step(first)
    # The statistics carry over: two steps on one batch give 0.1 m + 0.09 m = 1.9 x one step.
    np.testing.assert_allclose(mean(second), 1.9 * mean(first), rtol=1e-5, atol=1e-7)
    kernel = np.asarray(state.params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(first.params["Dense_0"]["kernel"], kernel)  # accumulating
    moved = np.any(np.asarray(second.params["Dense_0"]["kernel"]) != kernel, axis=0)
    assert 0 < moved.sum() <= 2 * K  # the union of two steps' columns
    losses = []
    for _ in range(20):
        state = step(state)
        logits = model.apply({"params": state.params, **state.collections}, x, train=False)
        losses.append(float(xent(logits, y)))
    assert losses[-1] < 0.7 * losses[0]


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = mnnx.Linear(6, 24, k=K, sparse_update=True, rngs=rngs)
        self.out = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_nnx_mlp_trains_under_multi_steps_clip_adamw():
    x = jax.random.normal(jax.random.key(2), (12, 6))
    y = jnp.arange(12) % 3
    model = NnxMLP(nnx.Rngs(0))
    optimizer = mnnx.Optimizer(model, tx_under_test())

    @nnx.jit
    def step(model, optimizer):
        loss, grads = optimizer.value_and_grad(model, lambda m: xent(m(x), y))
        optimizer.update(model, grads)
        return loss

    kernel = np.asarray(model.hidden.kernel[...])
    losses = [float(step(model, optimizer))]
    np.testing.assert_array_equal(model.hidden.kernel[...], kernel)  # accumulating
    losses += [float(step(model, optimizer)) for _ in range(29)]
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------------------ misuse


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = meprop_jax.Dense(8, k=2, sparse_update=True)
        return layer(nn.tanh(layer(x)))


class Once(nn.Module):
    @nn.compact
    def __call__(self, x):
        return meprop_jax.Dense(8, k=2, sparse_update=True)(x)


def test_a_linen_tapped_layer_applied_twice_is_refused_at_trace_time():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"'Dense_0'.*applied twice"):
        Shared().init(jax.random.key(0), x)
    variables = Once().init(jax.random.key(0), x)  # the same variables, one call
    with pytest.raises(ValueError, match="applied twice"):
        jax.grad(lambda v: jnp.sum(Shared().apply(v, x)))(variables)
    # Without the taps (evaluation) sharing is plain meProp.
    assert Shared().apply({"params": variables["params"]}, x).shape == (4, 8)


class MLP(nn.Module):
    sparse_update: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(meprop_jax.Dense(16, k=K, sparse_update=self.sparse_update)(x))
        return nn.Dense(3)(x)


def test_differentiating_the_kernels_and_not_the_taps_trains_them():
    """``{"params": p, **rest}`` with ``jax.grad`` over ``p``: the masked dense gradient."""
    x = jax.random.normal(jax.random.key(3), (10, 6))
    y = jnp.arange(10) % 3
    variables = MLP().init(jax.random.key(4), x)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    assert optim.TAP_COLLECTION in rest
    loss = lambda p, m: xent(m.apply({"params": p, **rest}, x), y)
    grads = jax.grad(loss)(params, MLP())
    want = jax.grad(loss)(params, MLP(sparse_update=False))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, grads, want)  # the compact path computes dW as (g^T x)^T
    assert np.sum(np.any(np.asarray(grads["Dense_0"]["kernel"]) != 0, axis=0)) == K
    tx = optax.adam(0.05)
    opt_state = tx.init(params)
    kernel = params["Dense_0"]["kernel"]
    for _ in range(5):
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(jax.grad(loss)(params, MLP()), opt_state, params)
        params = optax.apply_updates(params, updates)
    assert not np.array_equal(params["Dense_0"]["kernel"], kernel)


def test_shrink_gathers_the_compact_state_and_an_update_without_taps_works():
    rng = np.random.default_rng(5)
    params = {
        "hidden": {
            "kernel": jnp.asarray(rng.standard_normal((5, 32)), jnp.float32),
            "bias": jnp.zeros(32),
        },
        "output": {"kernel": jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)},
    }
    taps = {"hidden": {"kernel": compact_tap(5, 32, k=4)}}
    opt = optim.sparse_adam(0.1)
    tapped, plain = opt.init(params, taps), opt.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    # An update with dense gradients and no taps after init with taps: the same step.
    p1, tapped = opt.update(grads, tapped, params)
    p2, plain = opt.update(grads, plain, params)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert isinstance(tapped.inner[0].mu["hidden"]["kernel"], optim.Transposed)
    keep = {"hidden": np.arange(32) % 3 == 0}  # 11 survivors, padded to 16
    got = mesimp.shrink(p1, tapped, keep, ["hidden", "output"])
    want = mesimp.shrink(p2, plain, keep, ["hidden", "output"])
    mu = got.opt_state.inner[0].mu["hidden"]["kernel"]
    assert isinstance(mu, optim.Transposed) and mu.t.shape == (16, 5)
    assert got.params["hidden"]["kernel"].shape == (5, 16)
    jax.tree.map(
        np.testing.assert_array_equal,
        optim.param_layout(got.opt_state)[0],
        want.opt_state,
    )


def varying(tree):
    """Replicated values made per-device, as a custom_vjp needs them beside a sharded batch.

    Transposing the cast sums the cotangents over the devices: a gradient with respect to
    the replicated value is the ``psum`` of the per-device ones.
    """
    return jax.lax.pcast(tree, ("data",), to="varying")


def two_device_step(k_cols):
    """Per-device masked and compact gradients of one meProp layer, summed by ``shard_map``."""
    mesh = jax.make_mesh((2,), ("data",))
    w = jax.random.normal(jax.random.key(6), (4, 12))
    x = jax.random.normal(jax.random.key(7), (8, 4))
    g = jax.random.normal(jax.random.key(8), (8, 12))

    def grads(x, g, w, tap):
        def loss(w, tap):
            w, tap = varying((w, tap))
            return jnp.sum(meprop_jax.linear(x, w, k=k_cols, tap=tap) * g)

        return jax.grad(loss, argnums=(0, 1))(w, tap)

    fn = jax.shard_map(grads, mesh=mesh, in_specs=SPECS, out_specs=(P(), P()))
    return fn(*placed(mesh, x, g, w, compact_tap(4, 12, k=k_cols))), (x, g, w, mesh)


SPECS = (P("data"), P("data"), P(), P())


def placed(mesh, *args):
    """``args`` laid out as ``SPECS`` says: the batch split over the devices."""
    shardings = tuple(NamedSharding(mesh, spec) for spec in SPECS)
    return jax.device_put(args, shardings)


def test_shard_map_selects_per_device_and_a_sum_of_compact_gradients_stops():
    (dw, tap_grad), (x, g, w, mesh) = two_device_step(K)
    columns = np.flatnonzero(np.any(np.asarray(dw) != 0, axis=0))
    assert K < columns.size <= 2 * K  # each device kept its own K columns
    # The same layer under jit with the batch sharded selects K columns for the whole batch.
    with jax.set_mesh(mesh):
        xs, gs = jax.device_put(x, P("data")), jax.device_put(g, P("data"))
        loss = lambda w: jnp.sum(meprop_jax.linear(xs, w, k=K) * gs)
        global_dw = jax.jit(jax.grad(loss))(jax.device_put(w, P()))
    assert np.sum(np.any(np.asarray(global_dw) != 0, axis=0)) == K
    # The summed compact gradients name no columns: the optimizer stops.
    params = {"kernel": w}
    opt = optim.compact(optax.sgd(0.1), bad_taps="raise")
    state = opt.init(params, {"kernel": compact_tap(4, 12, k=K)})
    with pytest.raises(Exception, match=r"kernel.*lax.pmean/psum over devices"):
        jax.block_until_ready(
            jax.jit(opt.update)({"kernel": None}, state, params, {"kernel": tap_grad})
        )


def test_pmean_is_exact_where_the_devices_select_the_same_columns():
    mesh = jax.make_mesh((2,), ("data",))
    w = jax.random.normal(jax.random.key(6), (4, 12))
    x = jnp.tile(jax.random.normal(jax.random.key(7), (4, 4)), (2, 1))  # one batch per device
    g = jnp.tile(jax.random.normal(jax.random.key(8), (4, 12)), (2, 1))

    def grads(x, g, w, tap):
        loss = lambda tap: jnp.sum(meprop_jax.linear(x, varying(w), k=K, tap=tap) * g)
        return jax.lax.pmean(jax.grad(loss)(varying(tap)), "data")

    fn = jax.shard_map(grads, mesh=mesh, in_specs=SPECS, out_specs=P())
    tap_grad = fn(*placed(mesh, x, g, w, compact_tap(4, 12, k=K)))
    params = {"kernel": w}
    opt = optim.sparse_sgd(0.1)
    state = opt.init(params, {"kernel": compact_tap(4, 12, k=K)})
    got, _ = jax.jit(opt.update)({"kernel": None}, state, params, {"kernel": tap_grad})
    masked = jax.grad(lambda w: jnp.sum(meprop_jax.linear(x[:4], w, k=K) * g[:4]))(w)
    np.testing.assert_allclose(got["kernel"], w - 0.1 * masked, rtol=1e-6, atol=1e-6)


def test_pmap_selects_per_device():
    w = jax.random.normal(jax.random.key(6), (4, 12))
    x = jax.random.normal(jax.random.key(7), (2, 4, 4))  # [devices, batch, in]
    g = jax.random.normal(jax.random.key(8), (2, 4, 12))

    def grad(x, g, w):
        dw = jax.grad(lambda w: jnp.sum(meprop_jax.linear(x, w, k=K) * g))(w)
        return jax.lax.psum(dw, "i")

    dw = jax.pmap(grad, axis_name="i", in_axes=(0, 0, None), devices=jax.devices()[:2])(x, g, w)
    columns = np.flatnonzero(np.any(np.asarray(dw[0]) != 0, axis=0))
    assert K < columns.size <= 2 * K
    whole = jax.grad(
        lambda w: jnp.sum(meprop_jax.linear(x.reshape(8, 4), w, k=K) * g.reshape(8, 12))
    )(w)
    assert np.sum(np.any(np.asarray(whole) != 0, axis=0)) == K
