"""meProp convolutions: an unchanged forward pass, a backward pass over ``k`` output channels.

The rule acts on output channels (meProp for CNNs, Wei et al. 2017). In the backward pass the
cotangent ``g = dL/dy`` keeps

* ``mode="unified"``: one set of ``k`` output channels for the whole batch, ranked by
  ``sum |g|`` over the batch and every spatial position;
* ``mode="per_example"``: every example's own ``k`` channels, ranked by ``sum |g|`` over its
  spatial positions;
* ``mode="random"``: every example's own ``k`` channels drawn uniformly at random.

The input and kernel gradients are convolutions over the selected channels only: the selected
channels of ``g`` and of the kernel are gathered and the ordinary convolution VJP runs on
those, so no backward convolution spans all output channels. In the per-example modes the
gather takes the union of the batch's selections, padded to the static size
``min(batch * k, out)`` with unselected channels (whose gradient is zero). With
``feature_group_count = G`` the output channels form ``G`` groups and ``k`` channels are kept
in each, so the gathered kernel keeps its group structure. The bias gradient is dense.

Channels are ranked, and non-finite gradients handled, exactly as :func:`meprop_jax.linear`
ranks and handles columns (see :mod:`meprop_jax._src.selection`): scores in float32, or in
the gradient's own dtype when it is wider; a channel holding a NaN or ±inf ranks first, a
channel of ``dkernel`` is non-finite exactly when that channel of ``g`` holds one (NaN
where the selection missed it), and in unified mode ``dx`` is NaN throughout once a group
holds more than ``k`` such channels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from meprop_jax._src import selection as _selection

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _ConvConfig:
    k: int
    mode: str
    window_strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...] | None
    rhs_dilation: tuple[int, ...] | None
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int
    precision: Any


def _convolve(cfg: _ConvConfig, x: Array, kernel: Array) -> Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        cfg.window_strides,
        cfg.padding,
        lhs_dilation=cfg.lhs_dilation,
        rhs_dilation=cfg.rhs_dilation,
        dimension_numbers=cfg.dimension_numbers,
        feature_group_count=cfg.feature_group_count,
        precision=cfg.precision,
    )


def _forward(cfg: _ConvConfig, x: Array, kernel: Array, bias: Array | None) -> Array:
    y = _convolve(cfg, x, kernel)
    if bias is not None:
        shape = [1] * y.ndim
        shape[cfg.dimension_numbers.out_spec[1]] = -1
        y += bias.reshape(shape)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _meprop_conv(cfg: _ConvConfig, x, kernel, bias, key):
    return _forward(cfg, x, kernel, bias)


def _meprop_conv_fwd(cfg: _ConvConfig, x, kernel, bias, key):
    return _forward(cfg, x, kernel, bias), (x, kernel, bias, key)


def _union_channels(mask: Array, groups: int, size: int) -> Array:
    """``[groups * size]`` distinct channels per group: the selected ones first, ascending.

    ``mask`` is ``[batch, out]``; slots beyond a group's selected channels hold unselected
    channels of the same group, whose (masked) gradient is zero.
    """
    width = mask.shape[-1] // groups
    used = jnp.any(mask, axis=0).reshape(groups, width)
    order = jnp.argsort(~used, axis=-1, stable=True)[:, :size]
    return (order + jnp.arange(groups)[:, None] * width).reshape(-1)


def _select(cfg: _ConvConfig, g: Array, key: Array | None, non_finite: Array):
    """The kept channels and the cotangent restricted to them (zero elsewhere).

    The rules of :mod:`meprop_jax._src.selection`, with the channels as columns: unified
    ranks ``column_scores`` over batch and space, the per-example rules rank each example's
    own ``column_scores`` over space, and channels holding a NaN or ±inf rank first.
    """
    batch_axis, feature_axis = cfg.dimension_numbers.out_spec[:2]
    groups = cfg.feature_group_count
    if cfg.mode == "unified":
        g_last = jnp.moveaxis(g, feature_axis, -1)
        return _selection.unified_columns(g_last, cfg.k, groups, non_finite=non_finite), g
    per_example = jnp.moveaxis(g, (batch_axis, feature_axis), (0, -1))
    scores = jax.vmap(_selection.column_scores)(per_example)  # [batch, out]
    if cfg.mode == "random":
        mask = _selection.random_mask(key, scores.shape, cfg.k, groups, g=scores)
    else:
        mask = _selection.per_example_mask(scores, cfg.k, groups)
    # As in meprop_jax.linear: an example keeps its non-finite channels past its k too.
    keep = mask | ~jnp.isfinite(scores)
    shape = [1] * g.ndim
    shape[batch_axis], shape[feature_axis] = mask.shape
    g = jnp.where(keep.reshape(shape), g, jnp.zeros((), g.dtype))
    size = min(mask.shape[0] * cfg.k, mask.shape[1] // groups)
    return _union_channels(mask, groups, size), g


def _meprop_conv_bwd(cfg: _ConvConfig, residuals, g: Array):
    x, kernel, bias, key = residuals
    feature_axis = cfg.dimension_numbers.out_spec[1]
    kernel_out_axis = cfg.dimension_numbers.rhs_spec[0]
    non_finite = _selection.non_finite_columns(jnp.moveaxis(g, feature_axis, -1))  # [out]
    channels, g_kept = _select(cfg, g, key, non_finite)
    g_cols = jnp.take(g_kept, channels, axis=feature_axis)
    if cfg.mode == "unified":
        # Non-finite channels past the k kept must not leave dx looking healthy.
        g_last = jnp.moveaxis(g_cols, feature_axis, -1)
        flagged = _selection.flag_dropped_non_finite(
            non_finite, g_last, cfg.k, cfg.feature_group_count
        )
        g_cols = jnp.moveaxis(flagged, -1, feature_axis)
    kernel_cols = jnp.take(kernel, channels, axis=kernel_out_axis)
    # Transposes, not jax.vjp: a vjp would also stage the (unused) narrow forward product.
    (dx,) = jax.linear_transpose(lambda x_: _convolve(cfg, x_, kernel_cols), x)(g_cols)
    (dkernel_cols,) = jax.linear_transpose(lambda w_: _convolve(cfg, x, w_), kernel_cols)(g_cols)
    # A non-finite channel that the selection missed is NaN, as dense backprop makes it.
    out_first = jnp.moveaxis(kernel, kernel_out_axis, 0)
    flag = non_finite.reshape((-1,) + (1,) * (out_first.ndim - 1))
    dkernel = jnp.where(flag, jnp.nan, jnp.zeros_like(out_first))
    dkernel = dkernel.at[channels].set(
        jnp.moveaxis(dkernel_cols, kernel_out_axis, 0), unique_indices=True
    )
    dkernel = jnp.moveaxis(dkernel, 0, kernel_out_axis)
    db = None
    if bias is not None:
        lead = tuple(a for a in range(g.ndim) if a != feature_axis)
        db = jnp.sum(g, axis=lead).astype(bias.dtype)
    return dx, dkernel, db, None


_meprop_conv.defvjp(_meprop_conv_fwd, _meprop_conv_bwd)


def _tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def conv(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    window_strides: Sequence[int] | int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: Sequence[int] | int | None = None,
    rhs_dilation: Sequence[int] | int | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: lax.PrecisionLike = None,
) -> Array:
    """``lax.conv_general_dilated(x, kernel, ...) + bias`` with a meProp backward pass.

    The forward pass is exactly the dense one. In the backward pass only ``k`` output
    channels of ``g = dL/dy`` are kept (per batch, per example or at random, see the module
    docstring) and ``dx`` and ``dkernel`` are convolutions over those channels alone. ``k = 0``
    or ``k * feature_group_count >= out`` is ordinary dense backprop.

    Args:
      x: input, laid out as ``dimension_numbers`` says (e.g. ``[batch, *spatial, in]``).
      kernel: weights (e.g. ``[*window, in / feature_group_count, out]``).
      bias: optional ``[out]``, added along the output's feature axis.
      k: output channels to keep (per group), a static non-negative int; ``0`` means dense.
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      key: PRNG key, required for ``mode="random"``.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision: as in ``lax.conv_general_dilated`` (an int stride or
        dilation applies to every spatial axis).

    Returns:
      The convolution plus bias, laid out as ``dimension_numbers`` says.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((2, 5, 5, 3))  # NHWC
      >>> w = jnp.ones((3, 3, 3, 8))  # HWIO
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> conv(x, w, k=2, dimension_numbers=dn).shape
      (2, 5, 5, 8)
    """
    k = _selection.check_k(k)
    mode = _selection.check_mode(mode)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
    rank = x.ndim - 2
    out = kernel.shape[dn.rhs_spec[0]]
    groups = feature_group_count
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out % groups:
        raise ValueError(
            f"feature_group_count must be a positive int dividing the {out} output channels, "
            f"got {groups!r}"
        )
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {bias.shape}")
    cfg = _ConvConfig(
        k,
        mode,
        _tuple(window_strides, rank),
        padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        _tuple(lhs_dilation, rank),
        _tuple(rhs_dilation, rank),
        dn,
        groups,
        precision,
    )
    if _selection.is_dense(k, out, groups):
        return _forward(cfg, x, kernel, bias)
    if mode == "random" and key is None:
        raise ValueError("mode='random' needs a PRNG key: pass key=jax.random.key(...)")
    return _meprop_conv(cfg, x, kernel, bias, key if mode == "random" else None)


def _padding(padding: Any, rank: int) -> str | list[tuple[int, int]]:
    """A stock ``Conv`` layer's ``padding`` in ``lax`` form (as Flax canonicalizes it)."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = [(p, p) if isinstance(p, int) else p for p in padding]
        if all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            return pairs
    raise ValueError(
        f"padding must be a str, an int or a sequence of {rank} ints or (low, high) pairs, "
        f"got {padding!r}"
    )


def _channels_last(ndim: int) -> lax.ConvDimensionNumbers:
    """The stock ``Conv`` layers' layout: ``[batch, *spatial, in]``, ``[*window, in, out]``."""
    spatial = tuple(range(1, ndim - 1))
    lhs = (0, ndim - 1, *spatial)
    return lax.ConvDimensionNumbers(lhs, (ndim - 1, ndim - 2, *range(ndim - 2)), lhs)


def layer_geometry(module: Any, inputs: Array) -> tuple[Array, tuple[int, ...] | None, dict]:
    """The stock Flax ``Conv`` layers' preprocessing (Linen and NNX share it).

    ``module`` is read for its fields only (``kernel_size``, ``strides``, ``padding``,
    ``input_dilation``, ``kernel_dilation``, ``feature_group_count``, ``precision``).

    Flattens the batch axes to one, applies ``CIRCULAR``/``REFLECT``/``CAUSAL`` padding to
    the input, and broadcasts strides and dilations, as ``flax.linen.Conv`` and
    ``flax.nnx.Conv`` do.

    Returns:
      ``(inputs, batch_shape, conv_kwargs)``: ``batch_shape`` is None when the input had one
      batch axis; ``conv_kwargs`` holds the window, padding, dilation and layout arguments of
      :func:`conv`.
    """
    kernel_size = module.kernel_size
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    rank = len(kernel_size)

    def broadcast(value):
        return (1,) * rank if value is None else _tuple(value, rank)

    n_batch = inputs.ndim - (rank + 1)
    batch_shape = None
    if n_batch != 1:
        batch_shape = inputs.shape[:n_batch]
        inputs = jnp.reshape(inputs, (-1, *inputs.shape[n_batch:]))
    kernel_dilation = broadcast(module.kernel_dilation)
    padding = _padding(module.padding, rank)
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(s - 1) * d + 1 for s, d in zip(kernel_size, kernel_dilation, strict=True)]
        pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in dilated] + [(0, 0)]
        inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        if rank != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    kwargs = dict(
        window_strides=broadcast(module.strides),
        padding=padding,
        lhs_dilation=broadcast(module.input_dilation),
        rhs_dilation=kernel_dilation,
        dimension_numbers=_channels_last(inputs.ndim),
        feature_group_count=module.feature_group_count,
        precision=module.precision,
    )
    return inputs, batch_shape, kwargs
