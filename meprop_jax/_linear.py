"""The meProp linear transform: an unchanged forward pass and a top-k sparsified backward pass.

``multi_linear`` computes ``y = sum_j xs[j] @ kernels[j] + bias`` (a plain linear layer has one
input; an LSTM cell has two, the input and the recurrent state). Its backward pass selects
columns of ``g = dL/dy`` once (see ``_selection``) and computes every ``dx_j`` and ``dW_j`` from
the selected columns only: the products it runs are ``[N, k] x [k, in]`` and ``[in, N] x [N, k]``
rather than ``[N, out] x [out, in]`` and ``[in, N] x [N, out]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from meprop_jax import _selection

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    k: int
    mode: str
    groups: int
    sparse_bias: bool
    precision: lax.PrecisionLike
    preferred_element_type: jnp.dtype | None


def _apply_kernel(x: Array, kernel: Array, cfg: _Config) -> Array:
    # Same contraction as flax.linen.Dense, so k=0 outputs are bit-identical to the stock layer.
    return lax.dot_general(
        x,
        kernel,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=cfg.precision,
        preferred_element_type=cfg.preferred_element_type,
    )


def _forward(cfg: _Config, xs, kernels, bias) -> Array:
    y = functools.reduce(
        jnp.add, [_apply_kernel(x, w, cfg) for x, w in zip(xs, kernels, strict=True)]
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _explicit_out_sharding(x: Array, kernel: Array):
    """Output sharding for a product that contracts over ``x``'s (possibly sharded) batch.

    Under explicit mesh axes (the ``jax.make_mesh`` default) JAX refuses to guess how to shard
    the result of a contraction over a sharded axis; the weight gradient is laid out like the
    kernel's input axis and replicated along the selected columns.
    """
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None or mesh.empty or not any(s is not None for s in spec[:-1]):
        return None
    kernel_spec = getattr(jax.typeof(kernel).sharding, "spec", None) or (None,)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(kernel_spec[0], None))


def _weight_grad(x: Array, g_cols: Array, kernel: Array, cfg: _Config) -> Array:
    """``x^T g_cols`` contracted over every leading axis: ``[in, n_cols]``."""
    lead = tuple(range(x.ndim - 1))
    return lax.dot_general(
        x,
        g_cols,
        ((lead, lead), ((), ())),
        precision=cfg.precision,
        preferred_element_type=jnp.float32 if kernel.dtype == jnp.bfloat16 else None,
        out_sharding=_explicit_out_sharding(x, kernel),
    ).astype(kernel.dtype)


def _input_grad(g_cols: Array, kernel_cols: Array, x: Array, cfg: _Config) -> Array:
    """``g_cols kernel_cols^T``: ``[..., n_cols] x [in, n_cols] -> [..., in]``."""
    return lax.dot_general(
        g_cols, kernel_cols, (((g_cols.ndim - 1,), (1,)), ((), ())), precision=cfg.precision
    ).astype(x.dtype)


def _unified_backward(cfg: _Config, xs, kernels, g: Array):
    """Gathers the ``k`` shared columns; every product is small and dense."""
    cols = _selection.unified_columns(g, cfg.k, cfg.groups)
    g_cols = jnp.take(g, cols, axis=-1)
    dxs = tuple(
        _input_grad(g_cols, jnp.take(w, cols, axis=1), x, cfg)
        for x, w in zip(xs, kernels, strict=True)
    )
    dws = tuple(
        jnp.zeros_like(w).at[:, cols].set(_weight_grad(x, g_cols, w, cfg), unique_indices=True)
        for x, w in zip(xs, kernels, strict=True)
    )
    return dxs, dws, g_cols, cols


def _rowwise_backward(cfg: _Config, xs, kernels, g: Array, key: Array | None):
    """Per-row selections. Smaller products only when the rows' union of columns is small.

    With ``N`` rows each keeping ``k`` columns the union has at most ``N * k`` columns. When
    that is below ``out`` the products run over the union, padded to ``N * k`` columns (a
    static size); otherwise they run over all ``out`` columns of the masked gradient and cost
    what dense backprop costs.
    """
    if cfg.mode == "random":
        mask = _selection.random_mask(key, g.shape, cfg.k, cfg.groups)
    else:
        mask = _selection.per_example_mask(g, cfg.k, cfg.groups)
    g_sparse = jnp.where(mask, g, jnp.zeros((), g.dtype))
    out = g.shape[-1]
    n_rows = g.size // out
    union_size = n_rows * cfg.k * cfg.groups
    if union_size >= out:
        dxs = tuple(_input_grad(g_sparse, w, x, cfg) for x, w in zip(xs, kernels, strict=True))
        dws = tuple(_weight_grad(x, g_sparse, w, cfg) for x, w in zip(xs, kernels, strict=True))
        return dxs, dws, g_sparse
    used = jnp.any(mask, axis=tuple(range(g.ndim - 1)))
    (cols,) = jnp.nonzero(used, size=union_size, fill_value=0)
    # Padding repeats column 0 with an all-zero gradient; scatter-add makes it harmless.
    valid = jnp.arange(union_size) < jnp.sum(used, dtype=jnp.int32)
    g_cols = jnp.where(valid, jnp.take(g_sparse, cols, axis=-1), jnp.zeros((), g.dtype))
    dxs = tuple(
        _input_grad(g_cols, jnp.take(w, cols, axis=1), x, cfg)
        for x, w in zip(xs, kernels, strict=True)
    )
    dws = tuple(
        jnp.zeros_like(w).at[:, cols].add(_weight_grad(x, g_cols, w, cfg))
        for x, w in zip(xs, kernels, strict=True)
    )
    return dxs, dws, g_sparse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _meprop(cfg: _Config, xs, kernels, bias, key):
    return _forward(cfg, xs, kernels, bias)


def _meprop_fwd(cfg: _Config, xs, kernels, bias, key):
    return _forward(cfg, xs, kernels, bias), (xs, kernels, bias, key)


def _meprop_bwd(cfg: _Config, residuals, g: Array):
    xs, kernels, bias, key = residuals
    lead = tuple(range(g.ndim - 1))
    if cfg.mode == "unified":
        dxs, dws, g_cols, cols = _unified_backward(cfg, xs, kernels, g)
        if bias is not None and cfg.sparse_bias:
            db = jnp.zeros_like(bias).at[cols].set(jnp.sum(g_cols, axis=lead).astype(bias.dtype))
    else:
        dxs, dws, g_sparse = _rowwise_backward(cfg, xs, kernels, g, key)
        if bias is not None and cfg.sparse_bias:
            db = jnp.sum(g_sparse, axis=lead).astype(bias.dtype)
    if bias is not None and not cfg.sparse_bias:
        db = jnp.sum(g, axis=lead).astype(bias.dtype)
    if bias is None:
        db = None
    return dxs, dws, db, None


_meprop.defvjp(_meprop_fwd, _meprop_bwd)


def multi_linear(
    xs: Sequence[Array],
    kernels: Sequence[Array],
    bias: Array | None = None,
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    groups: int = 1,
    sparse_bias: bool = False,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> Array:
    """``sum_j xs[j] @ kernels[j] + bias`` with one shared meProp selection in the backward.

    All inputs share the leading axes; the column selection is made once on ``g = dL/dy`` and
    applied to every input's product (an LSTM gate pre-activation ``x W_i + h W_h + b`` is the
    two-input case).

    Args:
      xs: inputs, each ``[..., in_j]``.
      kernels: weights, each ``[in_j, out]``.
      bias: optional ``[out]``.
      k: see :func:`linear`.
      mode: see :func:`linear`.
      key: see :func:`linear`.
      groups: split the ``out`` columns into this many equal blocks and keep ``k`` columns in
        each (``groups * k`` in all).
      sparse_bias: see :func:`linear`.
      precision: passed to the forward and backward products.
      preferred_element_type: accumulation type of the forward products.

    Returns:
      ``[..., out]``.
    """
    xs, kernels = tuple(xs), tuple(kernels)
    if not xs or len(xs) != len(kernels):
        raise ValueError(
            f"xs and kernels must be non-empty and of equal length, got {len(xs)} and "
            f"{len(kernels)}"
        )
    k = _selection.check_k(k)
    mode = _selection.check_mode(mode)
    for i, (x, w) in enumerate(zip(xs, kernels, strict=True)):
        if w.ndim != 2 or x.shape[-1:] != w.shape[:1]:
            raise ValueError(
                f"kernels[{i}] must be [in, out] with in = xs[{i}].shape[-1]; got x "
                f"{x.shape} and kernel {w.shape}"
            )
        if w.shape[1] != kernels[0].shape[1] or x.shape[:-1] != xs[0].shape[:-1]:
            raise ValueError(
                "all kernels need the same out size and all inputs the same leading axes; "
                f"got {[w.shape for w in kernels]} and {[x.shape for x in xs]}"
            )
    out = kernels[0].shape[1]
    groups = _selection.check_groups(groups, out)
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {bias.shape}")
    cfg = _Config(k, mode, groups, bool(sparse_bias), precision, preferred_element_type)
    if _selection.is_dense(k, out, groups):
        # Plain JAX ops: autodiff gives exactly the stock gradient, and forward mode works.
        return _forward(cfg, xs, kernels, bias)
    if mode == "random" and key is None:
        raise ValueError("mode='random' needs a PRNG key: pass key=jax.random.key(...)")
    return _meprop(cfg, xs, kernels, bias, key if mode == "random" else None)


def linear(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    sparse_bias: bool = False,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> Array:
    """``x @ kernel + bias`` whose backward pass keeps only the top-k output gradients.

    The forward pass is exactly the dense one. In the backward pass the cotangent
    ``g = dL/dy``, ``[..., out]``, is sparsified and ``dx`` and ``dkernel`` are computed from
    the kept entries alone (meProp, Sun et al. 2017):

    * ``mode="unified"``: the ``k`` columns with the largest ``sum |g|`` over all leading axes
      are kept for every row; ``dx`` and ``dkernel`` come from two small dense products
      ``[N, k] x [k, in]`` and ``[in, N] x [N, k]``. No product ever spans all ``out`` columns.
    * ``mode="per_example"``: every row keeps its own ``k`` largest ``|g|``. The products run
      over the union of selected columns (at most ``N * k``) when that is smaller than
      ``out``; otherwise they cost what dense backprop costs.
    * ``mode="random"``: every row keeps ``k`` distinct uniformly random columns, without
      rescaling (needs ``key``).

    The bias gradient is the dense ``sum g`` (as in the authors' code) unless ``sparse_bias``.
    ``k = 0`` or ``k >= out`` is ordinary dense backprop. A NaN or infinity in ``g`` always
    ranks first, so it propagates to ``dx`` and ``dkernel`` as it would in dense backprop.
    Forward-mode differentiation (``jax.jvp``) of a sparsified call is not defined and raises
    JAX's ``custom_vjp`` error; reverse mode, ``jit``, ``vmap``, ``scan``, ``checkpoint`` and
    higher-order reverse derivatives work.

    Args:
      x: ``[..., in]`` inputs.
      kernel: ``[in, out]`` weights.
      bias: optional ``[out]``.
      k: columns to keep, a static non-negative Python int; ``0`` means dense.
      mode: ``"unified"``, ``"per_example"`` (or ``"per-example"``) or ``"random"``.
      key: PRNG key, required for ``mode="random"`` and ignored otherwise.
      sparse_bias: also restrict the bias gradient to the kept entries.
      precision: passed to the products.
      preferred_element_type: accumulation type of the forward product.

    Returns:
      ``[..., out]``, equal to ``x @ kernel + bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((4, 3)); w = jnp.arange(6.0).reshape(3, 2)
      >>> loss = lambda w: linear(x, w, k=1).sum(axis=0) @ jnp.array([1.0, 10.0])
      >>> jax.grad(loss)(w).tolist()  # only the column with the larger gradient survives
      [[0.0, 40.0], [0.0, 40.0], [0.0, 40.0]]
    """
    return multi_linear(
        (x,),
        (kernel,),
        bias,
        k=k,
        mode=mode,
        key=key,
        sparse_bias=sparse_bias,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
