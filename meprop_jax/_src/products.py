"""The products of a meProp linear layer, for a kernel stored ``[in, out]`` or ``[out, in]``.

``cfg`` is the layer's static configuration (``meprop_jax._linear._Config``): ``precision``,
``preferred_element_type``, ``compact`` and ``kernel_layout`` are read here. ``"in_out"`` is
``flax.linen.Dense``'s layout; ``"out_in"`` stores ``W.T``, whose rows are the columns the
backward pass selects (contiguous to gather, and a weight gradient in the compact block's
orientation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def transposed(cfg) -> bool:
    """True when the kernels are stored ``[out, in]``."""
    return cfg.kernel_layout == "out_in"


def apply_kernel(x: Array, kernel: Array, cfg) -> Array:
    """``x @ W``, ``[..., in] -> [..., out]``."""
    # Same contraction as flax.linen.Dense, so k=0 outputs are bit-identical to the stock layer.
    return lax.dot_general(
        x,
        kernel,
        (((x.ndim - 1,), (1 if transposed(cfg) else 0,)), ((), ())),
        precision=cfg.precision,
        preferred_element_type=cfg.preferred_element_type,
    )


def explicit_out_sharding(x: Array, kernel: Array, rows: bool, in_axis: int = 0):
    """Output sharding for a product that contracts over ``x``'s (possibly sharded) batch.

    Under explicit mesh axes (the ``jax.make_mesh`` default) JAX refuses to guess how to shard
    the result of a contraction over a sharded axis; the weight gradient is laid out like the
    kernel's input axis (``in_axis`` of the kernel) and replicated along the selected columns
    (``rows``: the transposed ``[n_cols, in]`` gradient).
    """
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None or mesh.empty or not any(s is not None for s in spec[:-1]):
        return None
    kernel_spec = (*(getattr(jax.typeof(kernel).sharding, "spec", None) or ()), None, None)
    spec = (None, kernel_spec[in_axis]) if rows else (kernel_spec[in_axis], None)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def weight_grad(x: Array, g_cols: Array, kernel: Array, cfg) -> Array:
    """``x^T g_cols`` contracted over every leading axis: ``[in, n_cols]``.

    With ``cfg.compact`` or an ``[out, in]`` kernel, the transpose ``g_cols^T x``,
    ``[n_cols, in]`` (see ``CompactGrad``).
    """
    lead = tuple(range(x.ndim - 1))
    rows = cfg.compact or transposed(cfg)
    if rows:
        # [K, ...] materialized first: XLA:CPU runs g^T x several times slower from [..., K].
        g_t = lax.optimization_barrier(jnp.moveaxis(g_cols, -1, 0))
        operands, dims = (g_t, x), (tuple(range(1, x.ndim)), lead)
    else:
        operands, dims = (x, g_cols), (lead, lead)
    return lax.dot_general(
        *operands,
        (dims, ((), ())),
        precision=cfg.precision,
        preferred_element_type=jnp.float32 if kernel.dtype == jnp.bfloat16 else None,
        out_sharding=explicit_out_sharding(x, kernel, rows, 1 if transposed(cfg) else 0),
    ).astype(kernel.dtype)


def input_grad(g_cols: Array, kernel_cols: Array, x: Array, cfg) -> Array:
    """``g_cols kernel_cols^T``: ``[..., n_cols] x [in, n_cols] -> [..., in]`` (the kernel's
    columns ``[n_cols, in]`` for an ``[out, in]`` kernel)."""
    axis = 0 if transposed(cfg) else 1
    return lax.dot_general(
        g_cols, kernel_cols, (((g_cols.ndim - 1,), (axis,)), ((), ())), precision=cfg.precision
    ).astype(x.dtype)


def column_products(cfg, xs, kernels, g_cols: Array, cols: Array):
    """``dx_j`` and the weight-gradient blocks of the columns ``cols`` (see ``weight_grad``).

    Out-of-range entries of ``cols`` (padding) gather zero kernel columns. The barriers keep
    the gathered ``[in, K]`` kernel columns and ``[..., K]`` gradient columns in their sources'
    row-major order: left to itself, XLA:CPU gathers them straight into the transposed layouts
    its products prefer, a strided walk down the kernel's columns that costs several times
    more, and then runs ``dx`` as a slow transposed product. An ``[out, in]`` kernel's columns
    are its rows, a contiguous gather.
    """
    axis = 0 if transposed(cfg) else 1
    g_cols = lax.optimization_barrier(g_cols)
    dxs = tuple(
        input_grad(
            g_cols,
            lax.optimization_barrier(jnp.take(w, cols, axis=axis, mode="fill", fill_value=0)),
            x,
            cfg,
        )
        for x, w in zip(xs, kernels, strict=True)
    )
    blocks = tuple(weight_grad(x, g_cols, w, cfg) for x, w in zip(xs, kernels, strict=True))
    return dxs, blocks


def scatter_columns(kernel: Array, block: Array, cols: Array, non_finite: Array, cfg) -> Array:
    """The dense gradient in the kernel's layout, zero outside ``cols``; padding is dropped.

    ``block`` is ``weight_grad``'s (``[in, K]``, or ``[K, in]`` for an ``[out, in]`` kernel).
    A column flagged in ``non_finite`` (``[out]`` bool: ``g`` holds a NaN or ±inf there) that
    ``cols`` misses is NaN, as dense backprop would make it, rather than a healthy-looking zero.
    """
    if transposed(cfg):
        base = jnp.where(non_finite[:, None], jnp.nan, jnp.zeros_like(kernel))
        return base.at[cols].set(block, mode="drop", unique_indices=True)
    base = jnp.where(non_finite, jnp.nan, jnp.zeros_like(kernel))
    return base.at[:, cols].set(block, mode="drop", unique_indices=True)
