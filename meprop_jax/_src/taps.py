"""Taps: zero-valued inputs of the meProp ops whose cotangents carry data out of the backward.

A :class:`CompactGrad` tap receives a layer's compact weight gradient (the selected columns'
``[K, in]`` block and their indices, see :mod:`meprop_jax.optim`); a :class:`RecordTap` receives
meSimp's activity record (how many examples updated each unit, see :mod:`meprop_jax.mesimp`).
Both are ordinary arrays to ``jax.grad``, so a jitted step gets them without side effects.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from meprop_jax._src import selection as _selection

Array = jax.Array

#: Column indices travel as float32 cotangents, exact below this bound.
_MAX_COLUMNS = 2**24


class CompactGrad(NamedTuple):
    """A kernel gradient that is zero outside a few columns: ``dW[:, cols[j]] = block[j]``.

    As a *tap* (an input of :func:`linear`), the arrays are zeros of the right shape and their
    values are ignored; their cotangents, taken by ``jax.grad``, are the compact gradient.

    Attributes:
      block: ``[K, in]`` gradient of the selected columns, one row per column, in the
        kernel's dtype. Rows rather than ``[in, K]`` columns: on a CPU the product
        ``g_cols^T x`` runs about twice as fast in this orientation, and the row-major state of
        :mod:`meprop_jax.optim` consumes it without a transpose.
      cols: ``[K]`` float32 column indices, all distinct. An entry ``>= out`` is padding (its
        ``block`` row is zero) and names no column. Float rather than int because autodiff
        gives integer inputs no cotangent; float32 is exact for ``out + K < 2**24``.
      selected: ``[out]`` float32, 1 at every column in ``cols`` and 0 elsewhere. Autodiff adds
        up the cotangents of a tap used twice (and ``lax.pmean`` averages them), which adds
        up the indices too; this channel lets :func:`decode_columns` tell a sum or mean of
        gradients that selected the same columns (still exact) from one of gradients that
        selected different ones (meaningless).
    """

    block: Array
    cols: Array
    selected: Array


class FactoredGrad(NamedTuple):
    """A per-row kernel gradient as factors: ``dW[:, cols[n, s]] += values[n, s] * inputs[n]``.

    The weight gradient of a per-row mode (``"per_example"``, ``"random"``) is a sum of ``N * S``
    outer products, one per kept entry of ``dL/dy``. A :class:`CompactGrad` writes them out as
    the union's ``[K, in]`` block; this form keeps the factors (``N * S`` values and indices and
    the ``N`` input rows), so the backward pass costs selection and ``dx`` alone, and
    :func:`meprop_jax.optim.sparse_adam` sums each selected row as it updates it (natively, for
    a kernel stored ``[out, in]``). Every other consumer of compact gradients (any
    :func:`meprop_jax.optim.compact` optimizer, ``optax.MultiSteps``) gets the block, built
    from the factors in the step.

    Attributes:
      values: ``[N, S]`` each row's kept entries of ``dL/dy``, in the kernel's dtype.
      cols: ``[N, S]`` float32 their columns (see :class:`CompactGrad` for why float).
      inputs: ``[N, in]`` the layer's input rows, in the kernel's dtype.
      uses: ``[]`` float32, 1 for one backward pass. Autodiff adds the cotangents of a tap used
        twice, which makes the factors meaningless; a sum shows as ``uses != 1``. It is NaN
        when a row had more non-finite entries than it keeps (the factors cannot hold the
        rest): the whole gradient is then poisoned, as a compact one that fails its check.
    """

    values: Array
    cols: Array
    inputs: Array
    uses: Array


def factored_ok(grad: FactoredGrad, out: int) -> Array:
    """Whether a factored tap gradient is one backward pass's, with columns in ``[0, out)``."""
    c = grad.cols
    return (grad.uses == 1) & jnp.all((c == jnp.round(c)) & (c >= 0) & (c < out))


def decode_columns(grad: CompactGrad, out: int) -> tuple[Array, Array]:
    """The int32 column indices of a compact gradient, and whether they can be trusted.

    A tap gradient is the sum (or, after ``lax.pmean``, the mean) of ``n >= 1`` backward
    passes' compact gradients. It stands for the sum of their dense gradients exactly when all
    of them had the same ``cols``; then ``selected`` is ``s`` times an indicator (``s = n``
    for a sum, 1 for a mean) and ``cols / s`` are the columns. The check: ``cols / s`` are
    non-negative integers, and scattering ``s`` at each of them (padding dropped) rebuilds
    ``selected``. That holds only if every pass selected the same set of columns in the same
    slots: the largest column of the set is the mean of a slot only where every pass has it
    there, and so on down the set.

    Returns:
      ``(cols [K] int32, ok [] bool)``: with ``ok`` false the columns are meaningless.
    """
    _, cols, selected = grad
    scale = jnp.max(selected, initial=0.0)
    c = cols / jnp.where(scale > 0, scale, 1.0)
    whole = jnp.round(c)
    idx = jnp.where(jnp.isfinite(whole), whole, -1.0).astype(jnp.int32)
    rebuilt = jnp.zeros((out,), jnp.float32).at[idx].add(scale, mode="drop")
    ok = jnp.all(c == whole) & jnp.all(c >= 0) & jnp.all(rebuilt == selected)
    return jnp.minimum(idx, out + jnp.arange(idx.shape[0], dtype=jnp.int32)), ok


def compact_grads(blocks, cols: Array | None, out: int) -> tuple[CompactGrad, ...]:
    """One backward pass's tap gradients: ``blocks`` ``[K, in]`` of the columns ``cols``.

    ``cols`` (int ``[K]``, padding ``>= out``) is shared by every block; None means all
    ``out`` columns in order.
    """
    if cols is None:
        cols = jnp.arange(out, dtype=jnp.int32)
    selected = jnp.zeros((out,), jnp.float32).at[cols].set(1.0, mode="drop")
    cols = cols.astype(jnp.float32)
    return tuple(CompactGrad(block, cols, selected) for block in blocks)


class RecordTap(NamedTuple):
    """Per-unit selection counts of one backward pass, carried out as a tap's cotangent.

    As an input of :func:`linear` both arrays are zeros and their values are ignored; their
    cotangents, taken by ``jax.grad``, are the counts of that backward pass. A row (one
    position of the input's leading axes) whose output gradient is entirely zero, such as a
    padding position or an example the loss ignores, took no part in the step and is not
    counted. Every other row is one example, and it counts for a unit when the unit's column
    was selected for it *and* its gradient there is nonzero, i.e. when the example updated the
    unit's weights:

    * ``"per_example"`` and ``"random"``: the example's own ``k`` columns.
    * ``"unified"``: the batch's ``k`` shared columns.
    * dense (``k = 0`` or ``k >= out``): every column.

    A selected zero updates nothing and is not counted. In a ReLU net a row with fewer than
    ``k`` active units fills its top-k with zeros (ties go to the lowest indices); counting
    those fillers would credit them to whichever surviving units come first. (The authors' C#
    counts them, but there pruned units keep their place in the layer and take part of them.)

    With ``groups`` (an LSTM's four gates) column ``j`` of every group belongs to unit ``j``,
    and a unit counts when any of its group columns does. A tap shared
    by several calls (a ``scan`` over time steps) sums their counts, which is what a record
    wants: each time step of each sequence is one example.

    Attributes:
      hits: ``[units]`` float32 (``units = out // groups``): examples that updated the unit.
      examples: ``[]`` float32: examples counted.
    """

    hits: Array
    examples: Array


def record_tap(units: int) -> RecordTap:
    """The zero-valued :class:`RecordTap` to pass to :func:`linear` for ``units`` units."""
    return RecordTap(jnp.zeros((units,), jnp.float32), jnp.zeros((), jnp.float32))


def _record_counts(g: Array, selected: Array, groups: int) -> RecordTap:
    """Counts of one backward pass.

    ``selected`` is the shared ``[K]`` column indices (unified) or a ``[..., out]`` bool mask
    (per row). An entry counts only where its gradient is nonzero: a selected zero (an inactive
    ReLU unit filling a row's top-k) updates nothing.
    """
    if jnp.issubdtype(selected.dtype, jnp.integer):
        selected = jnp.zeros(g.shape[-1:], bool).at[selected].set(True)
    nonzero = g != 0
    active = jnp.any(nonzero, axis=-1)  # [...]: rows that received any gradient
    updated = (selected & nonzero).reshape((*g.shape[:-1], groups, -1))
    hits = jnp.any(updated, axis=-2)  # [..., units]
    examples = jnp.sum(active.astype(jnp.float32))
    return RecordTap(jnp.sum(hits.astype(jnp.float32), axis=tuple(range(g.ndim - 1))), examples)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _record_dense(groups: int, y: Array, record: RecordTap) -> Array:
    """Identity on ``y``; the backward counts every column (where its gradient is nonzero)."""
    return y


def _record_dense_fwd(groups: int, y: Array, record: RecordTap):
    return y, None


def _record_dense_bwd(groups: int, residuals, g: Array):
    del residuals
    return g, _record_counts(g, jnp.ones(g.shape[-1:], bool), groups)


_record_dense.defvjp(_record_dense_fwd, _record_dense_bwd)


def compact_width(
    out_features: int,
    *,
    k: int,
    mode: str = "unified",
    groups: int = 1,
    batch_shape: Sequence[int] | None = None,
) -> int:
    """Number of columns ``K`` of a meProp layer's compact weight gradient.

    ``groups * k`` in unified mode. A per-row mode (``"per_example"``, ``"random"``) touches
    the union of its rows' selections, padded to the static size
    ``min(rows * groups * k, out)``, so it needs the leading (batch) shape of the input.
    """
    mode = _selection.check_mode(mode)
    if mode == "unified":
        return groups * k
    if batch_shape is None:
        raise ValueError(
            f"mode={mode!r} needs batch_shape (the input's leading axes): its compact "
            "gradient spans the union of every row's columns"
        )
    return min(math.prod(batch_shape) * groups * k, out_features)


def compact_tap(
    in_features: int,
    out_features: int,
    *,
    k: int,
    mode: str = "unified",
    groups: int = 1,
    batch_shape: Sequence[int] | None = None,
    dtype: jnp.dtype = jnp.float32,
    factored: bool = False,
) -> CompactGrad | FactoredGrad:
    """The zero-valued tap to pass to :func:`linear` for a ``[in_features, out_features]`` kernel.

    ``dtype`` is the kernel's dtype; for ``"per_example"`` and ``"random"`` the tap's width
    depends on ``batch_shape`` (see :func:`compact_width`), so it fits one batch shape only.
    ``factored``: a :class:`FactoredGrad` tap instead (per-row modes only).
    """
    if factored:
        mode = _selection.check_mode(mode)
        if mode == "unified" or batch_shape is None:
            raise ValueError(
                f"factored=True needs a per-row mode ('per_example' or 'random') and its "
                f"batch_shape, got mode={mode!r}, batch_shape={batch_shape!r}"
            )
        rows = math.prod(batch_shape)
        return FactoredGrad(
            jnp.zeros((rows, groups * k), dtype),
            jnp.zeros((rows, groups * k), jnp.float32),
            jnp.zeros((rows, in_features), dtype),
            jnp.zeros((), jnp.float32),
        )
    width = compact_width(out_features, k=k, mode=mode, groups=groups, batch_shape=batch_shape)
    return CompactGrad(
        jnp.zeros((width, in_features), dtype),
        jnp.zeros((width,), jnp.float32),
        jnp.zeros((out_features,), jnp.float32),
    )


def _misfits(arrays: Sequence[jax.Array], want: Sequence[tuple[tuple[int, ...], object]]) -> bool:
    """Whether any of ``arrays`` lacks its ``(shape, dtype)`` in ``want``."""
    return any(
        a.shape != shape or a.dtype != dtype for a, (shape, dtype) in zip(arrays, want, strict=True)
    )


def _as_got(names: Sequence[str], arrays: Sequence[jax.Array]) -> str:
    """``"block float32[4, 3], cols float32[4] and selected float32[5]"``."""
    parts = [f"{n} {a.dtype}{list(a.shape)}" for n, a in zip(names, arrays, strict=True)]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _check_record(record, units: int) -> RecordTap:
    hits, examples = record
    if _misfits(record, [((units,), jnp.float32), ((), jnp.float32)]):
        raise ValueError(
            f"record must be RecordTap(hits float32[{units}], examples float32[]) (one entry "
            f"per unit, out // groups); got {_as_got(RecordTap._fields, record)}. Build it "
            "with record_tap()."
        )
    return RecordTap(hits, examples)


def _check_taps(taps, xs, kernels, *, k: int, mode: str, groups: int) -> tuple[CompactGrad, ...]:
    taps = tuple(taps)
    out = kernels[0].shape[1]
    if _selection.is_dense(k, out, groups):
        raise ValueError(
            f"taps need a sparsified layer (0 < groups * k < out), got k={k}, groups={groups}, "
            f"out={out}: a dense layer's gradient is the ordinary kernel gradient"
        )
    if len(taps) != len(kernels):
        raise ValueError(f"need one tap per kernel, got {len(taps)} for {len(kernels)} kernels")
    if any(isinstance(tap, FactoredGrad) for tap in taps):
        return _check_factored(taps, xs, kernels, k=k, mode=mode, groups=groups)
    width = compact_width(out, k=k, mode=mode, groups=groups, batch_shape=xs[0].shape[:-1])
    if out + width >= _MAX_COLUMNS:
        raise ValueError(f"compact gradients need out + K < 2**24, got out={out}, K={width}")
    for i, (tap, w) in enumerate(zip(taps, kernels, strict=True)):
        if not isinstance(tap, CompactGrad):
            raise ValueError(
                f"taps[{i}] must be a CompactGrad, got {type(tap).__name__}. Build it with "
                "compact_tap()."
            )
        want = [((width, w.shape[0]), w.dtype), ((width,), jnp.float32), ((out,), jnp.float32)]
        if _misfits(tap, want):
            hint = "" if mode == "unified" else f" (mode={mode!r}: K depends on the batch shape)"
            raise ValueError(
                f"taps[{i}] must be CompactGrad(block {w.dtype}[{width}, {w.shape[0]}], cols "
                f"float32[{width}], selected float32[{out}]){hint}; got "
                f"{_as_got(CompactGrad._fields, tap)}. Build it with compact_tap()."
            )
    return tuple(CompactGrad(*tap) for tap in taps)


def _check_factored(taps, xs, kernels, *, k: int, mode: str, groups: int):
    if mode == "unified":
        raise ValueError(
            "FactoredGrad taps need a per-row mode ('per_example' or 'random'), got "
            "mode='unified': its k shared columns already give a small [k, in] CompactGrad"
        )
    out = kernels[0].shape[1]
    if out >= _MAX_COLUMNS:
        raise ValueError(f"factored gradients need out < 2**24, got out={out}")
    rows, width = math.prod(xs[0].shape[:-1]), groups * k
    for i, (tap, w) in enumerate(zip(taps, kernels, strict=True)):
        if not isinstance(tap, FactoredGrad):
            raise ValueError(
                f"taps[{i}] must be a FactoredGrad like the other taps, got "
                f"{type(tap).__name__}. Build every tap with compact_tap(..., factored=True)."
            )
        want = [
            ((rows, width), w.dtype),
            ((rows, width), jnp.float32),
            ((rows, w.shape[0]), w.dtype),
            ((), jnp.float32),
        ]
        if _misfits(tap, want):
            raise ValueError(
                f"taps[{i}] must be FactoredGrad(values {w.dtype}[{rows}, {width}], cols "
                f"float32[{rows}, {width}], inputs {w.dtype}[{rows}, {w.shape[0]}], uses "
                f"float32[]) for this batch shape; got {_as_got(FactoredGrad._fields, tap)}. "
                "Build it with compact_tap(..., factored=True)."
            )
    return tuple(FactoredGrad(*tap) for tap in taps)
