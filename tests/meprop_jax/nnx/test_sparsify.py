"""``meprop_jax.nnx.sparsify``: meProp layers in a stock Flax NNX model.

A sparsified stock model against the same model built by hand from this package's layers:
the forward pass (the stock program, bit for bit), the gradients, the default layer set and
the selection errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meprop_jax import nnx as mnnx
from tests.helpers import forward_products


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


class NNXModel(nnx.Module):
    """A conv layer, an LSTM over the flattened rows, a hidden and an output layer."""

    def __init__(self, rngs, hand: bool = False, k: int = 0, mode: str = "unified"):
        extra = dict(k=k, mode=mode, rngs=rngs) if hand else dict(rngs=rngs)
        cell_extra = dict(extra, fused_gates=False) if hand else extra  # the stock products
        conv, linear, cell = (
            (mnnx.Conv, mnnx.Linear, mnnx.LSTMCell)
            if hand
            else (
                nnx.Conv,
                nnx.Linear,
                nnx.LSTMCell,
            )
        )
        self.conv = conv(2, 8, (3, 3), **extra)
        self.rnn = nnx.RNN(cell(6 * 8, 12, **cell_extra))
        self.hidden = linear(12, 16, **extra)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):  # [batch, 6, 6, 2]
        y = nnx.relu(self.conv(x))
        y = self.rnn(y.reshape((*y.shape[:2], -1)))  # time = image rows
        return self.out(nnx.relu(self.hidden(y[:, -1])))


def nnx_grads(model, x):
    def loss(m):
        return jnp.sum(jnp.sin(m(x)))

    return nnx.value_and_grad(loss)(model)


REPORT = [
    ("conv", 2, "sparsified"),
    ("rnn/cell", 2, "sparsified"),
    ("hidden", 2, "sparsified"),
    ("out", 0, "output layer"),
]


def products(model, x):
    """``forward_products`` of ``model(x)``, traced as a pure function of the model's state."""
    graphdef, state = nnx.split(model)
    return forward_products(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def rows_of(layers):
    return [(r.path, r.k, r.reason) for r in layers]


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_nnx_sparsify_matches_hand_built(mode):
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
    stock = NNXModel(nnx.Rngs(0))
    hand = NNXModel(nnx.Rngs(0), hand=True, k=2, mode=mode)
    y_stock = stock(x)
    _, stock_grads = nnx_grads(stock, x)
    sparse, layers = mnnx.sparsify(stock, k=2, mode=mode, example_args=(x,))
    assert rows_of(layers) == REPORT
    assert isinstance(sparse.conv, mnnx.Conv) and type(sparse.out) is nnx.Linear
    assert_trees_equal(nnx.state(sparse, nnx.Param), nnx.state(stock, nnx.Param))
    np.testing.assert_array_equal(sparse(x), y_stock)
    loss, grads = nnx_grads(sparse, x)
    hand_loss, hand_grads = nnx_grads(hand, x)
    assert loss == hand_loss
    assert_trees_equal(nnx.to_pure_dict(grads), nnx.to_pure_dict(hand_grads))
    dense = nnx.to_pure_dict(stock_grads)
    assert np.any(nnx.to_pure_dict(grads)["conv"]["kernel"] != dense["conv"]["kernel"])
    assert_trees_equal(nnx.to_pure_dict(grads)["out"], dense["out"])


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_nnx_sparsify_runs_the_stock_forward_program(mode):
    # Equal outputs on one CPU are not enough: products split another way (one [in, 4h]
    # product for the four gates instead of four [in, h] ones) round differently on others.
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
    stock = NNXModel(nnx.Rngs(0))
    before = products(stock, x)
    sparse, _ = mnnx.sparsify(stock, k=2, mode=mode, example_args=(x,))
    assert products(sparse, x) == before
    hand = NNXModel(nnx.Rngs(0), hand=True, k=2, mode=mode)
    assert products(hand, x) == before


def test_nnx_sparsify_leaves_the_model_and_its_graphdefs_alone():
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
    model = NNXModel(nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    _, dense_grads = nnx_grads(model, x)
    sparse, _ = mnnx.sparsify(model, k=2, example_args=(x,))
    # The model is still the dense model: its classes, its gradients, its graphdef.
    assert type(model.hidden) is nnx.Linear and type(model.rnn.cell) is nnx.LSTMCell
    assert_trees_equal(nnx.to_pure_dict(nnx_grads(model, x)[1]), nnx.to_pure_dict(dense_grads))
    assert nnx.split(model)[0] == graphdef
    # The sparsified model has its own graphdef, and a round trip through it stays sparse.
    sparse_graphdef, state = nnx.split(sparse)
    assert sparse_graphdef != graphdef
    again = nnx.merge(sparse_graphdef, state)
    assert isinstance(again.hidden, mnnx.Linear) and again.hidden.k == 2
    assert_trees_equal(
        nnx.to_pure_dict(nnx_grads(again, x)[1]), nnx.to_pure_dict(nnx_grads(sparse, x)[1])
    )


def test_nnx_sparsify_again_takes_the_new_k_and_reports_every_layer():
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2))
    stock = NNXModel(nnx.Rngs(0))
    first, _ = mnnx.sparsify(stock, k=2, example_args=(x,))
    second, layers = mnnx.sparsify(first, k=3, example_args=(x,))
    assert rows_of(layers) == [(p, 3 if k else 0, reason) for p, k, reason in REPORT]
    assert (second.conv.k, second.rnn.cell.k, second.hidden.k) == (3, 3, 3)
    assert first.hidden.k == 2  # the first copy keeps its k
    hand = NNXModel(nnx.Rngs(0), hand=True, k=3)
    assert_trees_equal(
        nnx.to_pure_dict(nnx_grads(second, x)[1]), nnx.to_pure_dict(nnx_grads(hand, x)[1])
    )
    # k = 0 makes every layer dense again: the stock gradients.
    dense, layers = mnnx.sparsify(second, k=0, example_args=(x,))
    assert [(r.path, r.k) for r in layers] == [(p, 0) for p, _, _ in REPORT]
    assert_trees_equal(
        nnx.to_pure_dict(nnx_grads(dense, x)[1]), nnx.to_pure_dict(nnx_grads(stock, x)[1])
    )


def test_nnx_sparsify_selection_and_errors():
    model = NNXModel(nnx.Rngs(0))
    with pytest.raises(ValueError, match="example_args"):
        mnnx.sparsify(model, k=2)
    with pytest.raises(ValueError, match="needs rngs"):
        mnnx.sparsify(model, k=2, mode="random", layers="hidden")
    with pytest.raises(ValueError, match="matches no layer"):
        mnnx.sparsify(model, k=2, layers="encoder/*")
    sparse, layers = mnnx.sparsify(model, k={"hid*": 4}, layers=["hidden", "conv"])
    assert {r.path: r.k for r in layers} == {"conv": 0, "hidden": 4, "out": 0, "rnn/cell": 0}
    assert isinstance(sparse.hidden, mnnx.Linear) and sparse.hidden.k == 4
    assert type(sparse.conv) is nnx.Conv
