"""Per-row weight gradients kept as factors (:class:`meprop_jax.FactoredGrad`).

In a per-row mode the weight gradient is a sum of ``N * S`` outer products, ``g[n, c] x[n]``
for every kept entry. Writing them out as the union's ``[K, in]`` block (a
:class:`CompactGrad`) costs as much memory traffic as the rest of the backward pass at the
paper's minibatches of 10. Kept as factors, the backward pass is selection and ``dx`` alone
(:func:`rowwise_backward`); :func:`meprop_jax.optim.sparse_adam` sums each row as it updates it
(natively for a kernel stored ``[out, in]``), and every other compact optimizer gets the block,
built in the step by :func:`factored_rows`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from meprop_jax._src import native, products
from meprop_jax._src.rowwise import (
    gathered_input_grad,
    kept_gradient,
    row_top_k,
    selection_mask,
    union_columns,
    wanted_inputs,
)
from meprop_jax._src.taps import FactoredGrad, factored_ok

Array = jax.Array


def _uses(g: Array, values: Array) -> Array:
    """1, or NaN when a row has more non-finite entries than it keeps (the factors cannot hold
    the rest: see :class:`meprop_jax.FactoredGrad`)."""
    out = g.shape[-1]
    lost = jnp.sum(~jnp.isfinite(g.reshape(-1, out)), -1) > jnp.sum(~jnp.isfinite(values), -1)
    return jnp.where(jnp.any(lost), jnp.nan, 1.0).astype(jnp.float32)


def _factored_xla(spec, xs, kernels, g: Array, scores: Array):
    k, groups, layout, input_grads, precision, _ = spec
    out = g.shape[-1]
    idx = row_top_k(scores, k, groups).reshape(-1, groups * k)
    values = jnp.take_along_axis(g.reshape(-1, out), idx, axis=-1)
    wanted = wanted_inputs(input_grads, len(xs))
    dxs = tuple(
        gathered_input_grad(values, idx, w, layout, precision, x.dtype).reshape(x.shape)
        if want
        else None
        for x, w, want in zip(xs, kernels, wanted, strict=True)
    )
    return dxs, idx, values, _uses(g, values)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _factored_native(spec, xs, kernels, g: Array, scores: Array):
    """``_factored_xla`` through the native kernels: their selection and ``dx`` alone.
    Differentiating it (higher-order derivatives) differentiates the XLA path."""
    k, groups, layout, input_grads, _, by_magnitude = spec
    out = g.shape[-1]
    g2 = g.reshape(-1, out)
    if by_magnitude:  # the scores are |g|: one pass for indices, values and uses
        idx, values, uses = native.select_factors(g2, k, groups)
    else:
        ranked = jnp.where(jnp.isnan(scores), jnp.inf, scores).astype(jnp.float32)
        idx = native.select(ranked.reshape(-1, out), k, groups)
        values = jnp.take_along_axis(g2, idx, axis=-1)
        uses = _uses(g, values)

    def input_grad(x, w):  # dx alone: no block
        x2 = x.reshape(-1, x.shape[-1])
        return native.products(g2, idx, x2, w, layout == "out_in", False)[0].reshape(x.shape)

    wanted = wanted_inputs(input_grads, len(xs))
    dxs = tuple(
        input_grad(x, w) if want else None for x, w, want in zip(xs, kernels, wanted, strict=True)
    )
    return dxs, idx, values, uses


@_factored_native.defjvp
def _factored_native_jvp(spec, primals, tangents):
    return jax.jvp(functools.partial(_factored_xla, spec), primals, tangents)


def factored_backward(xs, kernels, g: Array, scores: Array, spec, use_native: bool):
    """``(dxs, idx, values, uses)`` of a per-row selection whose weight gradient stays factored.

    ``idx`` and ``values`` ``[N, S]`` are each row's kept columns and entries of ``g``; ``dx``
    comes from each row's own kernel rows as in the other per-row paths, and no weight-gradient
    product runs (see :class:`meprop_jax.FactoredGrad`, which defines ``uses``). ``spec``:
    ``(k, groups, kernel_layout, input_grads, precision, by_magnitude)``, ``by_magnitude``
    when ``scores`` are ``|g|`` (per-example mode); an input whose ``dx`` is not wanted gets
    None.
    """
    if use_native:
        return _factored_native(spec, xs, kernels, g, scores)
    return _factored_xla(spec, xs, kernels, g, scores)


def factored_rows(values: Array, cols: Array, inputs: Array, out: int) -> tuple[Array, Array]:
    """A factored gradient as the union's compact block: ``(block [N*S, in], cols [N*S])``.

    The columns are those of :func:`union_columns` (padding ``>= out``), and block row ``p``
    sums ``values[n, s] * inputs[n]`` over every slot that selected its column.

    Args:
      values: ``[N, S]`` kept entries.
      cols: ``[N, S]`` int32 their columns, distinct within a row, in ``[0, out)``.
      inputs: ``[N, in]`` input rows.
      out: the kernel's number of columns.
    """
    n = values.shape[0]
    mask = selection_mask(cols, out)
    union = union_columns(cols, mask)
    dense = jnp.zeros((n, out), values.dtype).at[jnp.arange(n)[:, None], cols].set(values)
    g_cols = jnp.take(dense, union, axis=-1, mode="fill", fill_value=0)
    return jnp.einsum("nk,ni->ki", g_cols, inputs.astype(g_cols.dtype)), union


def rowwise_backward(cfg, xs, kernels, g: Array, scores: Array):
    """The per-row backward with factored weight gradients: selection and ``dx`` only.

    ``cfg``: the layer's ``_Config``. Returns ``_rowwise_backward``'s results, with the masked
    dense weight gradients as blocks (compiled away unless the kernels are differentiated),
    and the factors appended: ``(idx, values, uses)``.
    """
    spec = (
        cfg.k,
        cfg.groups,
        cfg.kernel_layout,
        cfg.input_grads,
        cfg.precision,
        cfg.mode == "per_example",
    )
    use_native = native.runs(g, *xs, *kernels)
    dxs, idx, values, uses = factored_backward(xs, kernels, g, scores, spec, use_native)
    mask, g_sparse = kept_gradient(g, idx)
    dws = tuple(products.weight_grad(x, g_sparse, w, cfg) for x, w in zip(xs, kernels, strict=True))
    return dxs, dws, None, g_sparse, mask.reshape(g.shape), (idx, values, uses)


class Factors(NamedTuple):
    """A checked :class:`FactoredGrad`: ``values`` ``[N, S]``, int32 ``cols`` ``[N, S]`` and
    ``inputs`` ``[N, in]``."""

    values: Array
    cols: Array
    inputs: Array


def as_rows(entry, out: int) -> tuple[Array, Array]:
    """A decoded gradient as ``(block [K, in], cols [K])`` (factors summed into the block)."""
    if isinstance(entry, Factors):
        return factored_rows(entry.values, entry.cols, entry.inputs, out)
    return entry


def decode_factored(tap: FactoredGrad, out: int, after: Array) -> tuple[Factors, Array]:
    """``(factors, ok)`` of a tap gradient; bad factors poison their kernel's first columns as a
    bad compact gradient does (``after``: see ``meprop_jax._src.compact._after``)."""
    ok = factored_ok(tap, out)
    # Bad factors poison the first columns (distinct within a row, as S < out).
    first = (jnp.arange(tap.cols.size, dtype=jnp.int32) % out).reshape(tap.cols.shape)
    cols = jnp.where(ok, jnp.round(tap.cols).astype(jnp.int32), first)
    cols = jnp.minimum(cols, out + after)  # a no-op bound that orders the update; see _after
    values = jnp.where(ok, tap.values, jnp.asarray(jnp.nan, tap.values.dtype))
    return Factors(values, cols, tap.inputs), ok


def tap_grads(xs, kernels, idx: Array, values: Array, uses: Array) -> tuple[FactoredGrad, ...]:
    """The taps' gradients of one backward pass, one per kernel (``values``, ``idx`` shared)."""
    cols = _unsharded(idx.astype(jnp.float32))
    values = _unsharded(values)
    return tuple(
        FactoredGrad(
            values.astype(w.dtype),
            cols,
            _unsharded(x.reshape(-1, x.shape[-1]).astype(w.dtype)),
            uses,
        )
        for x, w in zip(xs, kernels, strict=True)
    )


def _unsharded(a: Array) -> Array:
    """``a`` replicated over its mesh, as the tap it is the cotangent of was made (a batch
    sharded along a mesh axis shards the rows of the factors); unchanged without a mesh."""
    spec = getattr(jax.typeof(a).sharding, "spec", None)
    if spec is None or all(s is None for s in spec):
        return a
    return jax.sharding.reshard(a, jax.sharding.PartitionSpec())
