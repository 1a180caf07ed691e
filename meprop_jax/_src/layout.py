"""Converting parameter trees between the kernel layouts ``[in, out]`` and ``[out, in]``.

The walk shared by :func:`meprop_jax.to_kernel_layout` (Linen trees) and
:func:`meprop_jax.nnx.to_kernel_layout` (NNX states): each face supplies how a leaf is
transposed (a plain array, or an ``nnx.Variable`` with its metadata).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from meprop_jax._src import rowwise
from meprop_jax._src.collections import TRANSPOSED_KERNEL

PyTree = Any


def kernel_names(kernel_layout: str) -> tuple[str, str]:
    """``(source, destination)`` leaf names of a conversion to ``kernel_layout``."""
    layout = rowwise.check_kernel_layout(kernel_layout)
    return ("kernel", TRANSPOSED_KERNEL) if layout == "out_in" else (TRANSPOSED_KERNEL, "kernel")


def convert_kernels(
    tree: PyTree,
    kernel_layout: str,
    transpose: Callable[[Any], Any],
    where: Callable[[tuple], bool] | None = None,
) -> dict:
    """``tree`` with every 2-D kernel leaf renamed and transposed into ``kernel_layout``.

    Args:
      tree: a nested mapping (anything with ``items()``) of parameters.
      kernel_layout: ``"out_in"`` (``kernel`` -> ``kernel_t``) or ``"in_out"`` (back).
      transpose: ``transpose(leaf)`` -> the leaf stored the other way round.
      where: optional ``where(path) -> bool`` on the module path (a tuple of keys) of each
        kernel; kernels where it is False are kept.

    Returns:
      A new tree of plain dicts; leaves other than the converted kernels are kept as they are.

    Raises:
      ValueError: for a ``kernel_layout`` other than ``"in_out"`` and ``"out_in"``.
    """
    src, dst = kernel_names(kernel_layout)

    def convert(node, path):
        if not hasattr(node, "items"):
            return node
        out = {}
        for name, value in node.items():
            leaf = not hasattr(value, "items")
            if name == src and leaf and jnp.ndim(value) == 2 and (where is None or where(path)):
                out[dst] = transpose(value)
            else:
                out[name] = convert(value, (*path, name))
        return out

    return convert(tree, ())
