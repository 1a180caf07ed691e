"""The LSTM cell step of every meProp LSTM cell: Linen, NNX and :func:`meprop_jax.sparsify`.

The gate pre-activations are computed as a stock Flax cell computes them, so the forward pass
is that cell's bit for bit: one product per gate and input (``flax.linen.LSTMCell``,
``flax.nnx.LSTMCell``) or one product per input over the joined kernels
(``flax.linen.OptimizedLSTMCell``, fewer and larger products). Their backward pass keeps ``k``
columns per gate (see :func:`meprop_jax.multi_linear`, ``groups=4``). With
``kernel_layout="out_in"`` the kernels are stored transposed, ``[hidden, in]``, and the same
products contract their second axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from meprop_jax._src import rowwise
from meprop_jax._src.projection import project

Array = jax.Array

#: ``promote(arrays) -> arrays``: a framework's dtype promotion of ``(inputs, kernel, bias)``,
#: as the stock cell's gate layers apply it.
Promote = Callable[[tuple[Array | None, ...]], tuple[Array | None, ...]]


def _per_gate(xs, kernels, biases, w_axis: int = 0) -> Array:
    """flax's ``LSTMCell`` (Linen and NNX): one Dense per gate and input, summed per gate.

    ``w_axis`` is the kernels' input axis: 0 for ``[in, hidden]``, 1 for ``[hidden, in]``.
    """
    x, h = xs
    dims = (((x.ndim - 1,), (w_axis,)), ((), ()))
    gates = []
    for w_i, w_h, b in zip(*kernels, biases, strict=True):
        z_h = jax.lax.dot_general(h, w_h, dims)
        z_h += jnp.reshape(b, (1,) * (z_h.ndim - 1) + (-1,))
        gates.append(jax.lax.dot_general(x, w_i, dims) + z_h)
    return jnp.concatenate(gates, axis=-1)


def _concatenated(xs, kernels, biases) -> Array:
    """``flax.linen.OptimizedLSTMCell``: one product per input over the joined kernels."""
    (x, h), (w_i, w_h) = xs, kernels
    z_h = jnp.dot(h, jnp.concatenate(w_h, axis=-1))
    z_h += jnp.reshape(jnp.concatenate(biases, axis=-1), (1,) * (z_h.ndim - 1) + (-1,))
    return z_h + jnp.dot(x, jnp.concatenate(w_i, axis=-1))


def _concatenated_t(xs, kernels, biases) -> Array:
    """``_concatenated`` for ``[hidden, in]`` kernels: joined ``[4 * hidden, in]``."""
    (x, h), (w_i, w_h) = xs, kernels
    product = lambda a, w: jax.lax.dot_general(a, w, (((a.ndim - 1,), (1,)), ((), ())))
    z_h = product(h, jnp.concatenate(w_h, axis=0))
    z_h += jnp.reshape(jnp.concatenate(biases, axis=-1), (1,) * (z_h.ndim - 1) + (-1,))
    return z_h + product(x, jnp.concatenate(w_i, axis=0))


# The stock cells' gate pre-activations, by (fused, kernel_layout).
_FORWARDS = {
    (False, "in_out"): _per_gate,
    (True, "in_out"): _concatenated,
    (False, "out_in"): functools.partial(_per_gate, w_axis=1),
    (True, "out_in"): _concatenated_t,
}


def lstm_step(
    carry: tuple[Array, Array],
    inputs: Array,
    input_kernels: Sequence[Array],
    recurrent_kernels: Sequence[Array],
    biases: Sequence[Array],
    *,
    promote: Promote,
    gate_fn: Callable[..., Any],
    activation_fn: Callable[..., Any],
    fused: bool = False,
    mask: Array | None = None,
    kernel_layout: str = "in_out",
    **meprop: Any,
) -> tuple[tuple[Array, Array], Array]:
    """One step of an LSTM cell whose gate pre-activation gradient keeps ``k`` per gate.

    Args:
      carry: ``(c, h)``, each ``[batch, hidden]``.
      inputs: ``[batch, in]``.
      input_kernels: the gates' ``[in, hidden]`` input kernels, in order i, f, g, o
        (``[hidden, in]`` with ``kernel_layout="out_in"``).
      recurrent_kernels: their ``[hidden, hidden]`` recurrent kernels (transposed with
        ``"out_in"``).
      biases: their ``[hidden]`` biases (the recurrent layers' in the stock cells).
      promote: the framework's dtype promotion, applied per gate layer as the stock cell does.
      gate_fn, activation_fn: as in the stock cells.
      fused: compute the forward pass as ``flax.linen.OptimizedLSTMCell`` does, rather than
        as ``flax.linen.LSTMCell`` and ``flax.nnx.LSTMCell`` do.
      mask: optional ``[hidden]`` meSimp mask that multiplies the new ``c`` and ``h``.
      kernel_layout: ``"in_out"`` (the stock kernels) or ``"out_in"`` (stored transposed, so
        the per-row backward pass gathers contiguous kernel rows; see
        :func:`meprop_jax.multi_linear`).
      **meprop: the keyword arguments of :func:`meprop_jax._src.projection.project` (``k``,
        ``mode``, ``key``, ``sparse_bias``, ``record``, ``memory``, ...).

    Returns:
      ``((c', h'), h')``.
    """
    c, h = carry
    x = promote((inputs, input_kernels[0], None))[0]
    w_i = tuple(promote((inputs, w, None))[1] for w in input_kernels)
    promoted = [promote((h, w, b)) for w, b in zip(recurrent_kernels, biases, strict=True)]
    h_in = promoted[0][0]
    w_h = tuple(w for _, w, _ in promoted)
    b = tuple(b for _, _, b in promoted)
    kernel_layout = rowwise.check_kernel_layout(kernel_layout)
    forward = _FORWARDS[bool(fused), kernel_layout]
    z = project(forward, (x, h_in), (w_i, w_h), b, groups=4, kernel_layout=kernel_layout, **meprop)
    new_c, new_h = lstm_update(z, c, gate_fn, activation_fn)
    if mask is not None:
        new_c, new_h = new_c * mask.astype(new_c.dtype), new_h * mask.astype(new_h.dtype)
    return (new_c, new_h), new_h


def lstm_update(
    z: Array, c: Array, gate_fn: Callable[..., Any], activation_fn: Callable[..., Any]
) -> tuple[Array, Array]:
    """The new ``(c, h)`` from the gates' pre-activation ``z`` and the old cell state ``c``.

    ``z`` is ``[..., 4 * hidden]`` with gates i, f, g, o along the last axis (block j is gate j).
    """
    z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
    i = gate_fn(z_i)
    f = gate_fn(z_f)
    g = activation_fn(z_g)
    o = gate_fn(z_o)
    new_c = f * c + i * g
    new_h = o * activation_fn(new_c)
    return new_c, new_h
