"""``meprop_jax.nnx.Optimizer``: compact, column-sparse NNX steps from a loss alone.

The NNX step must equal the Linen ``TrainState`` step on the same model and data, equal the
dense-gradient step with the masked gradient where the optimizer is SGD, really be compact
(lazy Adam leaves unselected kernel columns untouched), and refuse misuse clearly.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from meprop_jax import linen as mlinen
from meprop_jax import nnx as mnnx
from meprop_jax import optim, train_state

IN, HIDDEN, OUT, BATCH, K = 10, (32, 24), 5, 6, 3


def batches(n):
    keys = jax.random.split(jax.random.key(3), n)
    return [
        (jax.random.normal(k, (BATCH, IN)), jax.random.randint(k, (BATCH,), 0, OUT)) for k in keys
    ]


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class LinenMLP(nn.Module):
    mode: str
    factored: bool = False

    @nn.compact
    def __call__(self, x):
        for features in HIDDEN:
            layer = mlinen.Dense(
                features, k=K, mode=self.mode, sparse_update=True, factored_grad=self.factored
            )
            x = nn.relu(layer(x))
        return nn.Dense(OUT)(x)


class MLP(nnx.Module):
    """The NNX twin of ``LinenMLP`` (``hidden`` is a list of ``sparse_update`` layers)."""

    def __init__(self, rngs, mode="unified", sparse_update=True, stock=False, factored=False):
        sizes = (IN, *HIDDEN)

        def layer(i, o):
            if stock:
                return nnx.Linear(i, o, rngs=rngs)
            return mnnx.Linear(
                i, o, k=K, mode=mode, sparse_update=sparse_update, factored_grad=factored, rngs=rngs
            )

        self.hidden = nnx.List([layer(i, o) for i, o in itertools.pairwise(sizes)])
        self.out = nnx.Linear(HIDDEN[-1], OUT, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.out(x)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_linen(model, linen_params):
    """Copies ``LinenMLP`` parameters (``Dense_0``, ``Dense_1``, ``Dense_2``) into ``MLP``."""
    state = nnx.state(model, nnx.Param)
    names = [f"Dense_{i}" for i in range(len(HIDDEN) + 1)]
    pure = {"hidden": {i: linen_params[n] for i, n in enumerate(names[:-1])}}
    nnx.replace_by_pure_dict(state, {**pure, "out": linen_params[names[-1]]})
    nnx.update(model, state)


@nnx.jit
def compact_step(model, optimizer, x, y):
    loss, grads = optimizer.value_and_grad(model, lambda m: xent(m(x), y))
    optimizer.update(model, grads)
    return loss


@jax.jit
def linen_step(state, x, y):
    loss, grads = state.value_and_grad(lambda v: xent(state.apply_fn(v, x), y))
    return state.apply_gradients(grads=grads), loss


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_nnx_step_equals_linen_train_state(mode):
    linen_model = LinenMLP(mode)
    variables = linen_model.init(jax.random.key(0), jnp.ones((BATCH, IN)))
    tx = optim.sparse_adam(1e-2)
    state = train_state.TrainState.create(apply_fn=linen_model.apply, params=variables, tx=tx)
    model = MLP(nnx.Rngs(1), mode)
    load_linen(model, variables["params"])
    optimizer = mnnx.Optimizer(model, tx)
    first = np.asarray(model.hidden[0].kernel[...])
    for x, y in batches(3):
        state, linen_loss = linen_step(state, x, y)
        loss = compact_step(model, optimizer, x, y)
        np.testing.assert_allclose(loss, linen_loss, rtol=1e-6)
    expected = params_of(model)
    load_linen(model, state.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        expected,
        params_of(model),
    )
    adam = optimizer.opt_state.inner[0]
    assert int(optimizer.step[...]) == 3 and int(adam.count[...]) == 3
    # Compact state: the tapped kernels' moments are stored [out, in].
    for moment in (adam.mu, adam.nu):
        stored = moment["hidden"][0]["kernel"]
        assert isinstance(stored, optim.Transposed) and stored.t.shape == (32, IN)
    moved = np.any(expected["hidden"][0]["kernel"] != first, axis=0)
    assert 0 < moved.sum() <= (3 * K if mode == "unified" else 32)
    if mode == "unified":  # lazy Adam: at most 3 steps x K columns of 32 moved
        assert moved.sum() < 32


@pytest.mark.parametrize("mode", ["unified", "random"])
def test_compact_sgd_equals_dense_masked_gradient_sgd(mode):
    compact = MLP(nnx.Rngs(0, meprop=7), mode)
    dense = MLP(nnx.Rngs(0, meprop=7), mode, sparse_update=False)  # same params and stream
    optimizer = mnnx.Optimizer(compact, optim.sparse_sgd(0.1))
    dense_optimizer = nnx.Optimizer(dense, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def dense_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    for x, y in batches(3):
        loss = compact_step(compact, optimizer, x, y)
        np.testing.assert_allclose(loss, dense_step(dense, dense_optimizer, x, y), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        params_of(compact),
        params_of(dense),
    )


def test_gradients_are_compact_outside_jit_too():
    model = MLP(nnx.Rngs(0))
    optimizer = mnnx.Optimizer(model, optim.sparse_adam(1e-2))
    (x, y), *_ = batches(1)
    loss, grads = optimizer.value_and_grad(model, lambda m: xent(m(x), y))
    np.testing.assert_allclose(loss, xent(model(x), y), rtol=1e-6)
    pure = nnx.to_pure_dict(grads.params)
    assert "kernel" not in pure["hidden"][0] and "kernel" in pure["out"]  # never differentiated
    assert sorted(grads.taps) == ["hidden/0", "hidden/1"]
    block, cols, selected = grads.taps["hidden/0"]
    assert selected.shape == (32,) and int(selected.sum()) == K
    assert block.shape == (K, IN) and cols.shape == (K,)
    assert len(set(np.asarray(cols).tolist())) == K  # K distinct selected columns
    assert np.any(np.asarray(block) != 0)


def test_sparsified_stock_model_steps_like_hand_built_layers():
    x0 = jnp.ones((BATCH, IN))
    stock, hand = MLP(nnx.Rngs(0), stock=True), MLP(nnx.Rngs(0))
    stock, rows = mnnx.sparsify(stock, k=K, sparse_update=True, example_args=(x0,))
    assert [(r.path, r.k) for r in rows] == [("hidden/0", K), ("hidden/1", K), ("out", 0)]
    assert stock.hidden[0].sparse_update and not hasattr(stock.out, "sparse_update")
    tx = optim.sparse_adam(1e-2)
    stock_opt, hand_opt = mnnx.Optimizer(stock, tx), mnnx.Optimizer(hand, tx)
    for x, y in batches(2):
        assert compact_step(stock, stock_opt, x, y) == compact_step(hand, hand_opt, x, y)
    jax.tree.map(np.testing.assert_array_equal, params_of(stock), params_of(hand))


def test_outside_the_optimizer_a_sparse_update_layer_is_plain_meprop():
    compact, plain = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0), sparse_update=False)
    (x, y), *_ = batches(1)
    grads = nnx.grad(lambda m: xent(m(x), y))(compact)
    plain_grads = nnx.grad(lambda m: xent(m(x), y))(plain)
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(grads), nnx.to_pure_dict(plain_grads)
    )
    # A plain gradient is not a compact one.
    with pytest.raises(TypeError, match="value_and_grad"):
        mnnx.Optimizer(compact, optim.sparse_sgd(0.1)).update(compact, grads)


class Shared(nnx.Module):
    def __init__(self, rngs, twice=False, skip=False):
        self.layer = mnnx.Linear(8, 8, k=2, sparse_update=True, rngs=rngs)
        self.twice, self.skip = twice, skip

    def __call__(self, x):
        if self.skip:
            return x
        y = self.layer(x)
        return self.layer(y) if self.twice else y


def test_misuse_raises_clear_errors():
    x = jnp.ones((4, 8))
    loss = lambda m: jnp.sum(m(x) ** 2)
    model = Shared(nnx.Rngs(0))
    with pytest.raises(TypeError, match="GradientTransformation"):
        mnnx.Optimizer(model, "sgd")
    with pytest.raises(ValueError, match=r"must include the kernels.*'layer'"):
        mnnx.Optimizer(
            model, optim.sparse_sgd(0.1), wrt=nnx.All(nnx.Param, nnx.PathContains("bias"))
        )
    optimizer = mnnx.Optimizer(model, optim.sparse_sgd(0.1))
    model.twice = True
    with pytest.raises(ValueError, match=r"'layer'.*applied twice"):
        optimizer.value_and_grad(model, loss)
    model.twice, model.skip = False, True
    with pytest.raises(ValueError, match=r"does not apply the sparse_update layers \['layer'\]"):
        optimizer.value_and_grad(model, loss)
    other = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="not those it was built with"):
        optimizer.value_and_grad(other, lambda m: jnp.sum(m(jnp.ones((2, IN)))))
    model.skip = False
    _, grads = optimizer.value_and_grad(model, loss)
    with pytest.raises(ValueError, match="not those it was built with"):
        optimizer.update(other, grads)
    optimizer.update(model, grads)
    assert int(optimizer.step[...]) == 1
    with pytest.raises(ValueError, match=r"compact gradients for \[\], expected \['layer'\]"):
        optimizer.update(model, grads._replace(taps={}))
