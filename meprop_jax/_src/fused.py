"""Lazy Adam fused into one native pass per kernel, for :func:`meprop_jax.optim.sparse_adam`.

The lifted step of :mod:`meprop_jax._src.compact` gathers a kernel's selected rows and those
of Adam's two moments, lets ``optax.adam`` update them and scatters all three back. In the
paper's CPU setting (minibatches of 10, ``k = 20``) the rows are a third of the kernel, and
those gathers and scatters move about as many bytes as dense Adam. For a kernel stored
``[out, in]`` (``kernel_layout="out_in"``), float32, on a CPU with the native kernels built,
``sparse_adam`` instead runs ``meprop_adam_rows`` (:mod:`meprop_jax._src.native`): it reads
and writes each selected row of the weights and moments once, in place. The state is still
``optax.adam``'s (``ScaleByAdamState``): ``optax.adam`` updates it as usual, given no rows of
such a kernel, which advances the step count; the native pass then updates the rows with that
count, by optax's arithmetic (``scale_by_adam``, then ``scale_by_learning_rate``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from meprop_jax._src import native
from meprop_jax._src.factored import Factors

Array = jax.Array
PyTree = Any


class AdamRule(NamedTuple):
    """The hyperparameters of ``sparse_adam``'s ``optax.adam`` (and its optional clip)."""

    learning_rate: optax.ScalarOrSchedule
    b1: float
    b2: float
    eps: float
    clip: float | None


def fusable(rule: AdamRule | None, row_major: bool, param: Array, *grads: Array) -> bool:
    """Whether the kernel's update takes the native pass (``grads``: its gradient's arrays)."""
    return rule is not None and row_major and native.runs(param, *grads)


def _is_adam(node: Any) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def adam_node(state: PyTree) -> optax.ScaleByAdamState:
    """The one ``ScaleByAdamState`` in ``optax.adam``'s (possibly chained) state."""
    nodes = [n for n in jax.tree.leaves(state, is_leaf=_is_adam) if _is_adam(n)]
    if len(nodes) != 1:
        raise ValueError(f"expected one ScaleByAdamState in the state, found {len(nodes)}")
    return nodes[0]


def replace_adam_node(state: PyTree, node: optax.ScaleByAdamState) -> PyTree:
    return jax.tree.map(lambda n: node if _is_adam(n) else n, state, is_leaf=_is_adam)


def update_rows(
    rule: AdamRule,
    count: Array,
    p: Array,
    mu: Array,
    nu: Array,
    grad,
    lazy: bool = True,
) -> tuple[Array, Array, Array]:
    """The native pass: ``(p, mu, nu)`` after lazy Adam on the gradient's rows or, with
    ``lazy=False``, after Adam on every row with a zero gradient outside them.

    Args:
      rule: the hyperparameters.
      count: int32, the step count after this step's increment (``ScaleByAdamState.count``).
      p, mu, nu: ``[out, in]`` float32 kernel and moments.
      grad: ``(block [K, in], cols [K])``, the compact gradient of the rows ``cols`` (int32,
        ``>= out`` is padding); or ``(values [N, S], cols [N, S], inputs [N, in])``, a factored
        one (:class:`meprop_jax.FactoredGrad`, columns checked), summed row by row natively.
    """
    if isinstance(grad, Factors):
        values, cols, inputs = grad
        clip = jnp.inf if rule.clip is None else rule.clip
        hyper = jnp.append(_hyper(rule, count), jnp.float32(clip))
        return native.adam_factored(p, mu, nu, values, cols, inputs, hyper, lazy)
    block, cols = grad
    if rule.clip is not None:
        block = jnp.clip(block, -rule.clip, rule.clip)  # optax.clip
    return native.adam_rows(p, mu, nu, cols, block, _hyper(rule, count), lazy)


def _hyper(rule: AdamRule, count: Array) -> Array:
    """``[b1, b2, 1 - b1^t, 1 - b2^t, learning rate, eps]`` for the native kernels."""
    lr = rule.learning_rate
    # optax.adam's schedule sees its own count, which is the step count before the increment.
    lr = lr(count - 1) if callable(lr) else lr
    # The bias corrections by optax's own expression (a Python float to an int32 power), so
    # that they round as optax's do.
    with jax.numpy_dtype_promotion("standard"):
        c1, c2 = 1 - rule.b1**count, 1 - rule.b2**count
    return jnp.stack(
        [
            jnp.float32(rule.b1),
            jnp.float32(rule.b2),
            jnp.asarray(c1, jnp.float32),
            jnp.asarray(c2, jnp.float32),
            jnp.asarray(lr, jnp.float32),
            jnp.float32(rule.eps),
        ]
    )
