"""meProp for a general linear layer: Flax's ``DenseGeneral`` / ``LinearGeneral`` products.

A ``DenseGeneral`` contracts the input axes ``axis`` with the kernel's leading axes and keeps
several feature axes: ``kernel [*in, *features]``, ``y [*rest, *features]`` where ``rest`` are
the input's other axes in order. ``nn.MultiHeadDotProductAttention`` and
``nnx.MultiHeadAttention`` use two of them: the query, key and value projections
(``features = (heads, head_dim)``) and the output projection (``axis = (-2, -1)``, contracting
``(heads, head_dim)``).

What ``k`` means: the layer is the linear map ``[..., prod(in)] -> [..., prod(features)]``
it is once its contracting axes and its feature axes are flattened (row-major, as
``jnp.reshape`` flattens), and ``k`` counts entries of that flattened output gradient, exactly
as for a ``Dense`` layer: ``k`` of ``heads * head_dim`` for a query projection, per batch
(``"unified"``) or per row (``"per_example"``, a row being one position of one example).
With ``groups`` (``heads`` for ``per_head``) the flattened features are ``groups`` equal
contiguous blocks, one per head, and ``k`` entries are kept in each.

The forward pass is the stock expression, ``lax.dot_general`` over the same operands with the
same dimension numbers and the bias added after, so it is the stock layer's bit for bit; the
backward pass is :func:`meprop_jax.multi_linear`'s on the flattened input and kernel (through
:func:`meprop_jax._src.projection.project`), and autodiff reshapes its gradients back.

The kernel gradient is an ordinary (masked, dense-shaped) array: the compact updates of
:mod:`meprop_jax.optim` need an ``[in, out]`` kernel, so ``sparsify(..., sparse_update=True)``
refuses a sparsified ``DenseGeneral`` / ``LinearGeneral`` by name. Batch axes (Linen
``batch_dims``, NNX ``batch_axis``) are not supported: ``sparsify`` leaves such layers dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from meprop_jax._src.projection import project

Array = jax.Array


def normalize_axes(axis: int | Sequence[int], ndim: int, *, name: str = "axis") -> tuple:
    """``axis`` as sorted non-negative axes of an ``ndim``-dimensional input.

    Sorted as Flax sorts them: a ``DenseGeneral``'s kernel has its contracted axes in the
    input's axis order, whatever order ``axis`` lists them in.
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an input with {ndim} axes")
    axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}={axis!r} names an axis twice")
    return axes


def flat_features(features: Sequence[int], per_head: bool) -> tuple[int, int]:
    """``(width, groups)`` the selection ranks: ``groups`` blocks of ``width`` features each.

    ``per_head`` with several feature axes (``[heads, head_dim]``): one group per index of the
    leading axes, ``k`` of the last axis in each; otherwise one group over all features.
    """
    features = tuple(features)
    if per_head and len(features) > 1:
        return features[-1], math.prod(features[:-1])
    return math.prod(features), 1


def dense_general(
    inputs: Array,
    kernel: Array,
    bias: Array | None,
    *,
    axis: int | Sequence[int] = -1,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    groups: int = 1,
    sparse_bias: bool = False,
    precision: lax.PrecisionLike = None,
) -> Array:
    """A ``DenseGeneral`` product whose backward pass keeps ``k`` output-gradient entries.

    The layer is taken as the map ``[..., prod(in)] -> [..., prod(features)]`` (contracted
    axes and feature axes flattened row-major), and ``k`` entries of each row's flattened
    output gradient are kept as for :func:`meprop_jax.linear` (``k`` per head with ``groups =
    heads`` when ``features = (heads, head_dim)``); the forward pass is Flax's, bit for bit.

    Args:
      inputs: ``[...]``, any rank; the axes ``axis`` are contracted.
      kernel: ``[*in, *features]``, ``in`` the sizes of ``inputs``' axes ``axis`` (Flax's
        layout; no batch axes).
      bias: ``[*features]`` or None.
      axis: the contracted axes of ``inputs`` (an int or a sequence; negative counts from the
        end; the kernel's leading axes follow the input's axis order, as in Flax).
      k: entries kept per group of the flattened ``prod(features)`` output gradient.
      mode, key, sparse_bias, precision: as in :func:`meprop_jax.linear`.
      groups: equal contiguous blocks of the flattened features, ``k`` kept in each.

    Returns:
      ``[*rest, *features]``, bit for bit what Flax's ``DenseGeneral`` computes.

    Raises:
      ValueError: if ``axis`` is out of range or ``kernel``'s leading axes do not match
        ``inputs``' contracted axes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import meprop_jax
      >>> x = jnp.ones((2, 5, 4, 8))  # [batch, length, heads, head_dim]
      >>> kernel = jnp.ones((4, 8, 32))  # an attention output projection
      >>> meprop_jax.dense_general(x, kernel, None, axis=(-2, -1), k=4).shape
      (2, 5, 32)
    """
    axis = normalize_axes(axis, inputs.ndim)
    ndim, n_in = inputs.ndim, len(axis)
    in_shape = tuple(inputs.shape[a] for a in axis)
    if tuple(kernel.shape[:n_in]) != in_shape:
        raise ValueError(
            f"kernel {tuple(kernel.shape)} does not contract input axes {axis} of shape "
            f"{in_shape}; the kernel must be [*in, *features]"
        )
    features = tuple(kernel.shape[n_in:])
    rest = tuple(a for a in range(ndim) if a not in axis)
    # The contracted axes last, in `axis` order: a plain transpose (no arithmetic), skipped
    # when they already are (the attention projections).
    order = (*rest, *axis)
    moved = inputs if order == tuple(range(ndim)) else jnp.transpose(inputs, order)
    x_flat = moved.reshape((*moved.shape[: len(rest)], math.prod(in_shape)))
    w_flat = kernel.reshape((math.prod(in_shape), *features))
    undo = tuple(order.index(a) for a in range(ndim))
    contract = (axis, tuple(range(n_in)))

    def forward(xs, kernels, biases):
        # flax's DenseGeneral (no batch axes): one dot_general on the stock operands.
        (x,), ((w,),) = xs, kernels
        x = x.reshape(moved.shape)
        x = x if order == tuple(range(ndim)) else jnp.transpose(x, undo)
        y = lax.dot_general(x, w.reshape(kernel.shape), (contract, ((), ())), precision=precision)
        if biases:
            y += jnp.reshape(biases[0], (1,) * len(rest) + features)
        return y

    return project(
        forward,
        (x_flat,),
        ((w_flat,),),
        (bias,) if bias is not None else (),
        k=k,
        mode=mode,
        key=key,
        groups=groups,
        feature_ndim=len(features),
        sparse_bias=sparse_bias,
        precision=precision,
    )


def as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    """An int or a sequence of ints (Flax's ``features``, ``axis``, ``batch_dims``) as a tuple."""
    return (value,) if isinstance(value, int) else tuple(value)
