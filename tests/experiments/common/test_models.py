"""Tests for experiments.common.models: the MLP's gradients against a NumPy meProp reference.

The reference backpropagates by hand in float64: at every hidden layer the output gradient
``g = dL/dy`` is the upstream gradient times ReLU'(y), its top-k entries are kept (per the
mode) and only they reach the kernel, the bias (dense, as in the authors' code) and the layer
below. The output layer is dense.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import models
from experiments.common.models import MLP

IN, HIDDEN, CLASSES, BATCH, K = 6, (16, 12), 4, 8, 3


def top_k_mask(g: np.ndarray, k: int, mode: str) -> np.ndarray:
    """``[batch, out]`` bool: the ``k`` largest ``|g|`` per row, or per batch by column sum.

    Ties go to the lower column index (a stable sort of the negated scores).
    """
    if mode == "unified":
        cols = np.argsort(-np.abs(g).sum(axis=0), kind="stable")[:k]
        mask = np.zeros(g.shape[1], bool)
        mask[cols] = True
        return np.broadcast_to(mask, g.shape)
    order = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :k]
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def reference_grads(
    params: dict, x: np.ndarray, upstream: np.ndarray, k: int, mode: str
) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """Gradients of ``sum(logits * upstream)`` with meProp on the hidden layers.

    Returns:
      The gradients (same tree as ``params``), and per hidden layer the mask used and the
      mask that selecting on the upstream gradient before ReLU' would have given.
    """
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    names = [f"hidden_{i}" for i in range(len(HIDDEN))]
    inputs, pre = [], []
    a = x.astype(np.float64)
    for name in names:
        inputs.append(a)
        y = a @ p[name]["kernel"] + p[name]["bias"]
        pre.append(y)
        a = np.maximum(y, 0.0)
    grads = {"output": {"kernel": a.T @ upstream, "bias": upstream.sum(axis=0)}}
    da = upstream @ p["output"]["kernel"].T
    masks, masks_before_relu = [], []
    for name, a_in, y in zip(reversed(names), reversed(inputs), reversed(pre), strict=True):
        g = da * (y > 0)  # dL/dy: the activation derivative comes first
        mask = top_k_mask(g, k, mode)
        masks.insert(0, mask)
        masks_before_relu.insert(0, top_k_mask(da, k, mode))
        kept = np.where(mask, g, 0.0)
        grads[name] = {"kernel": a_in.T @ kept, "bias": g.sum(axis=0)}
        da = kept @ p[name]["kernel"].T
    return grads, masks, masks_before_relu


@pytest.fixture(scope="module")
def problem() -> tuple[dict, np.ndarray, np.ndarray]:
    """Flax-default parameters, MNIST-like inputs in [0, 1) and a random upstream gradient."""
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, IN), dtype=np.float32)
    upstream = rng.normal(size=(BATCH, CLASSES)).astype(np.float32)
    params = MLP(HIDDEN, num_classes=CLASSES).init(jax.random.key(0), jnp.asarray(x), False)
    return params["params"], x, upstream


def model_grads(params: dict, x: np.ndarray, upstream: np.ndarray, **fields) -> dict:
    model = MLP(HIDDEN, num_classes=CLASSES, **fields)

    def loss(p: dict) -> jax.Array:
        return jnp.sum(model.apply({"params": p}, jnp.asarray(x), False) * upstream)

    return jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))


def nonzero_columns(kernel_grad: np.ndarray) -> list[int]:
    return np.flatnonzero(np.any(kernel_grad != 0, axis=0)).tolist()


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_hidden_gradients_match_top_k_after_relu_derivative(
    problem: tuple[dict, np.ndarray, np.ndarray], mode: str
) -> None:
    params, x, upstream = problem
    want, masks, masks_before_relu = reference_grads(params, x, upstream, K, mode)
    # The data must tell the two orders apart, or the comparison below proves nothing.
    assert any(not np.array_equal(m, b) for m, b in zip(masks, masks_before_relu, strict=True))
    got = model_grads(params, x, upstream, k=K, mode=mode)
    for name in want:
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(
                got[name][leaf], want[name][leaf], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{leaf}"
            )


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_every_hidden_layer_is_sparse(
    problem: tuple[dict, np.ndarray, np.ndarray], mode: str
) -> None:
    params, x, upstream = problem
    _, masks, _ = reference_grads(params, x, upstream, K, mode)
    got = model_grads(params, x, upstream, k=K, mode=mode)
    dense = model_grads(params, x, upstream)
    for i, mask in enumerate(masks):
        name = f"hidden_{i}"
        selected = np.flatnonzero(mask.any(axis=0)).tolist()
        if mode == "unified":
            assert len(selected) == K
        else:
            assert K < len(selected) <= min(BATCH * K, HIDDEN[i])
        # Exactly the selected columns carry gradient: the others are zero, not small.
        assert nonzero_columns(got[name]["kernel"]) == selected, name
        assert len(nonzero_columns(dense[name]["kernel"])) > len(selected), name


def test_output_layer_is_dense_and_equals_the_dense_models(
    problem: tuple[dict, np.ndarray, np.ndarray],
) -> None:
    params, x, upstream = problem
    sparse = model_grads(params, x, upstream, k=K)
    dense = model_grads(params, x, upstream)
    assert nonzero_columns(sparse["output"]["kernel"]) == list(range(CLASSES))
    assert np.count_nonzero(sparse["output"]["bias"]) == CLASSES
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(sparse["output"][leaf], dense["output"][leaf], rtol=1e-6)
    # The hidden layers did differ, so the equality above is not that of two dense models.
    assert not np.allclose(sparse["hidden_0"]["kernel"], dense["hidden_0"]["kernel"])


def test_k_output_sparsifies_the_output_layer_too(
    problem: tuple[dict, np.ndarray, np.ndarray],
) -> None:
    params, x, upstream = problem
    got = model_grads(params, x, upstream, k=K, k_output=2)
    want = top_k_mask(upstream, 2, "unified")[0]
    assert nonzero_columns(got["output"]["kernel"]) == np.flatnonzero(want).tolist()


def test_doctests() -> None:
    result = doctest.testmod(models, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
