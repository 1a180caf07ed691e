"""Kernel layouts of the NNX layers: stock ``kernel [in, out]`` or ``kernel_t [out, in]``.

``meprop_jax.nnx.Linear(..., kernel_layout="out_in")`` and ``meprop_jax.nnx.LSTMCell(...,
kernel_layout="out_in")`` store each kernel transposed, as the parameter ``kernel_t`` (the
name Linen's ``Dense`` uses, :data:`meprop_jax.linen.TRANSPOSED_KERNEL`), so that the columns
the per-row backward pass selects are contiguous rows. The kernel is drawn by the stock
initializer at ``[in, out]`` and then transposed: the same ``rngs`` give the same values in
both layouts. :func:`to_kernel_layout` converts NNX states (stock ``nnx.Linear`` and
``nnx.LSTMCell`` ones included) between the layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meprop_jax._src import layout as _layout
from meprop_jax._src import rowwise
from meprop_jax._src.collections import TRANSPOSED_KERNEL

Array = jax.Array

# Variable metadata naming one mesh axis per kernel axis: reversed with the kernel.
_AXIS_METADATA = ("out_sharding", "sharding_names", "sharding")


def transpose_variable(variable: nnx.Variable) -> nnx.Variable:
    """A copy of a 2-D ``variable`` holding its transpose, its per-axis sharding reversed."""
    metadata = variable.get_metadata()
    axes = {
        name: tuple(metadata[name])[::-1]
        for name in _AXIS_METADATA
        if isinstance(metadata.get(name), (tuple, list)) and len(metadata[name]) == 2
    }
    return variable.replace(jnp.transpose(variable[...]), **axes)


def store_kernel(layer: nnx.Module, kernel_layout: str) -> None:
    """Keeps a freshly built layer's ``kernel [in, out]`` in ``kernel_layout``, in place.

    ``"out_in"`` replaces the attribute ``kernel`` by ``kernel_t``, its transpose ``[out, in]``
    (same values, same metadata with the axes reversed); ``"in_out"`` keeps it. The layout is
    recorded as ``layer.kernel_layout``.
    """
    layer.kernel_layout = kernel_layout
    if kernel_layout == "out_in":
        kernel = layer.kernel
        del layer.kernel
        setattr(layer, TRANSPOSED_KERNEL, transpose_variable(kernel))


def stored_kernel(layer: nnx.Module) -> Array:
    """The kernel array as stored: ``[in, out]`` or, with ``"out_in"``, ``[out, in]``."""
    return getattr(layer, kernel_name(layer))[...]


def kernel_name(layer: nnx.Module) -> str:
    """The attribute (and state key) of ``layer``'s kernel: ``"kernel"`` or ``"kernel_t"``."""
    layout = getattr(layer, "kernel_layout", "in_out")
    return TRANSPOSED_KERNEL if layout == "out_in" else "kernel"


def _transpose_leaf(leaf: Any) -> Any:
    if isinstance(leaf, nnx.Variable):
        return transpose_variable(leaf)
    return jnp.asarray(leaf).T


def to_kernel_layout(
    state: Any, kernel_layout: str, *, where: Callable[[tuple], bool] | None = None
) -> Any:
    """An NNX state with its ``Linear`` and ``LSTMCell`` kernels in ``kernel_layout``.

    ``"out_in"`` turns every 2-D ``kernel [in, out]`` into ``kernel_t [out, in]`` (its
    transpose), the state of ``Linear(kernel_layout="out_in")`` and
    ``LSTMCell(kernel_layout="out_in")`` (whose gate kernels are such leaves); ``"in_out"``
    turns every ``kernel_t`` back into ``kernel``, so the state of a stock ``nnx.Linear`` or
    ``nnx.LSTMCell`` loads into the transposed layer (``nnx.update(model, converted)``) and
    back. Other leaves are kept as they are.

    Args:
      state: an ``nnx.State`` (e.g. ``nnx.state(model, nnx.Param)``) or a pure dict of it
        (``nnx.to_pure_dict``, a restored checkpoint).
      kernel_layout: ``"out_in"`` or ``"in_out"``.
      where: optional ``where(path) -> bool`` on the module path (a tuple of keys, e.g.
        ``("layers", 0)``) of each kernel, to convert some layers only.

    Returns:
      An ``nnx.State`` for an ``nnx.State`` (each converted ``nnx.Variable`` keeps its type and
      metadata, per-axis sharding reversed), else plain dicts of arrays.

    Raises:
      ValueError: for a ``kernel_layout`` other than ``"in_out"`` and ``"out_in"``.

    Example:
      >>> from flax import nnx
      >>> state = nnx.state(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.Param)
      >>> converted = to_kernel_layout(state, "out_in")
      >>> sorted(converted), converted["kernel_t"].shape
      (['bias', 'kernel_t'], (4, 5))
    """
    layout = rowwise.check_kernel_layout(kernel_layout)
    converted = _layout.convert_kernels(state, layout, _transpose_leaf, where)
    return nnx.State(converted) if isinstance(state, nnx.State) else converted
