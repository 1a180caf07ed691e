"""``meprop_jax.train_state.TrainState``: compact, column-sparse steps without handling taps.

The state's step must equal the low-level ``optim.value_and_compact_grad`` + ``update`` path
bit for bit, and really be compact (unselected kernel columns untouched by lazy Adam).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import meprop_jax
from meprop_jax import linen as mlinen
from meprop_jax import optim, train_state


class MLP(nn.Module):
    k: int
    mode: str

    @nn.compact
    def __call__(self, x):
        for features in (32, 24):
            x = nn.relu(mlinen.Dense(features, k=self.k, mode=self.mode, sparse_update=True)(x))
        return nn.Dense(5)(x)


def batches(n):
    keys = jax.random.split(jax.random.key(3), n)
    return [(jax.random.normal(k, (6, 10)), jax.random.randint(k, (6,), 0, 5)) for k in keys]


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_step_equals_low_level_path(mode):
    model = MLP(k=3, mode=mode)
    variables = model.init(jax.random.key(0), jnp.ones((6, 10)))
    tx = optim.sparse_adam(1e-2)

    @jax.jit
    def state_step(state, x, y):
        loss, grads = state.value_and_grad(lambda v: xent(state.apply_fn(v, x), y))
        return state.apply_gradients(grads=grads), loss

    @jax.jit
    def low_level_step(params, opt_state, taps, x, y):
        def loss_fn(params, taps):
            return xent(model.apply({"params": params, optim.TAP_COLLECTION: taps}, x), y)

        loss, (grads, tap_grads) = optim.value_and_compact_grad(loss_fn)(params, taps)
        params, opt_state = tx.update(grads, opt_state, params, tap_grads)
        return params, opt_state, loss

    state = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=tx)
    params, taps = variables["params"], variables[optim.TAP_COLLECTION]
    opt_state = tx.init(params, taps)
    first_kernel = params["Dense_0"]["kernel"]
    for x, y in batches(3):
        state, loss = state_step(state, x, y)
        params, opt_state, low_loss = low_level_step(params, opt_state, taps, x, y)
        assert loss == low_loss
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt_state)
    assert int(state.step) == 3
    if mode == "unified":  # lazy Adam: at most 3 steps x 3 columns of 32 moved
        moved = np.any(np.asarray(state.params["Dense_0"]["kernel"]) != first_kernel, axis=0)
        assert 0 < moved.sum() <= 9


def test_create_accepts_params_and_taps_separately():
    model = MLP(k=3, mode="unified")
    variables = model.init(jax.random.key(0), jnp.ones((6, 10)))
    tx = optim.sparse_sgd(0.1)
    a = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=tx)
    b = train_state.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        taps=variables[optim.TAP_COLLECTION],
        tx=tx,
    )
    assert jax.tree.structure(a) == jax.tree.structure(b)
    # A plain optax transformation is lifted; anything else is refused.
    c = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=optax.sgd(0.1))
    fields = lambda s: (s.params, s.taps, s.opt_state, s.collections)
    assert jax.tree.structure(fields(c)) == jax.tree.structure(fields(a))
    with pytest.raises(TypeError, match="GradientTransformation"):
        train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=0.1)
    with pytest.raises(TypeError, match="taps given twice"):
        train_state.TrainState.create(
            apply_fn=model.apply, params=variables, taps=variables[optim.TAP_COLLECTION], tx=tx
        )


class StockMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (32, 24):
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(5)(x)


def test_sparsified_stock_model_steps_like_hand_built_compact_layers():
    stock, hand = StockMLP(), MLP(k=3, mode="unified")
    x0 = jnp.ones((6, 10))
    params = stock.init(jax.random.key(0), x0)["params"]
    sparse_apply = meprop_jax.sparsify(stock.apply, k=3, sparse_update=True)
    _, created = sparse_apply({"params": params}, x0, mutable=[optim.TAP_COLLECTION])
    hand_taps = hand.init(jax.random.key(0), x0)[optim.TAP_COLLECTION]
    assert jax.tree.map(jnp.shape, created[optim.TAP_COLLECTION]) == jax.tree.map(
        jnp.shape, hand_taps
    )
    tx = optim.sparse_adam(1e-2)
    state = train_state.TrainState.create(
        apply_fn=sparse_apply, params=params, taps=created[optim.TAP_COLLECTION], tx=tx
    )
    hand_state = train_state.TrainState.create(
        apply_fn=hand.apply, params=params, taps=hand_taps, tx=tx
    )

    @jax.jit
    def step(state, x, y):
        loss, grads = state.value_and_grad(lambda v: xent(state.apply_fn(v, x), y))
        assert grads[0]["Dense_0"]["kernel"] is None  # compact: never differentiated
        return state.apply_gradients(grads=grads), loss

    for x, y in batches(2):
        state, loss = step(state, x, y)
        hand_state, hand_loss = step(hand_state, x, y)
        assert loss == hand_loss
    jax.tree.map(np.testing.assert_array_equal, state.params, hand_state.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, hand_state.opt_state)
